"""`discache info`, the build's refusal to go without Cython, and the command line as a user meets
it: errors in one line with exit status 2, the subcommand's usage, tables within 100 columns, help
texts, progress, missing packages named with the command that installs them."""
import itertools
import os
import pty
import re
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import discache
from discache import _core, backends, cli

ROOT = Path(__file__).resolve().parent.parent


def test_info_prints_version_page_size_kernel_and_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"discache {discache.__version__}" in out
    assert f"page size {os.sysconf('SC_PAGE_SIZE')} bytes" in out
    assert platform.release() in out
    lines = out.splitlines()
    for info in backends.available():
        at = next(i for i, line in enumerate(lines) if line.split()[:1] == [info.name])
        assert ("yes" if info.available else "no") in lines[at].split()[1]
        wrapped = [lines[at]] + [line for line in
                                 itertools.takewhile(lambda l: l.startswith(" " * 24),
                                                     lines[at + 1:])]
        assert " ".join(" ".join(wrapped).split()[2:]) == " ".join(info.reason.split())


def test_backends_report_a_reason_either_way():
    infos = backends.available()
    assert {i.name for i in infos} >= {"madvfree", "memfd", "ashmem"}
    for info in infos:
        assert isinstance(info.available, bool) and info.reason


def test_ashmem_probe_agrees_with_the_device_node():
    ok, reason = _core.probe_ashmem()
    assert ok == os.path.exists("/dev/ashmem")
    if not ok:
        assert "memfd" in reason, "the reason must say what to use instead"


def test_console_script_runs():
    exe = shutil.which("discache")
    assert exe, "the console script is installed by pip install"
    result = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "backends:" in result.stdout


def test_core_is_compiled():
    assert Path(_core.__file__).suffix in (".so", ".pyd")


def test_build_without_cython_fails_loudly():
    code = (
        "import sys; sys.modules['Cython'] = None; sys.modules['Cython.Build'] = None; "
        "sys.argv = ['setup.py', '--version']; exec(open('setup.py').read())"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "Cython >= 3 is required" in result.stderr


def run_cli(*args, timeout=120, prelude=""):
    """`discache ARGS` in a fresh interpreter; prelude runs first (to hide a package)."""
    code = f"{prelude}\nimport sys\nfrom discache.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


BAD = [  # (arguments, the option named, words of what it accepts)
    (["simulate", "--images", "abc"], "--images", "a whole number of 1 or more"),
    (["simulate", "--images", "0"], "--images", "a whole number of 1 or more"),
    (["simulate", "--swap-pages", "-1"], "--swap-pages", "a whole number of 0 or more"),
    (["simulate", "--page-size", "1000"], "--page-size", "a power of two from 64 to 2097152"),
    (["simulate", "--seed", "x"], "--seed", "a whole number"),
    (["simulate", "--designs", "walk+sigbus,nope"], "--designs", "token+sigbus"),
    (["demo", "--reclaim", "2"], "--reclaim", "a number from 0 to 1"),
    (["demo", "--reclaim", "half"], "--reclaim", "a number from 0 to 1"),
    (["demo", "--backend", "ashmem"], "--backend", "one of auto, madvfree, memfd"),
    (["demo", "--metrics-port", "70000"], "--metrics-port", "a TCP port from 1 to 65535"),
    (["demo", "--size", "-3"], "--size", "a whole number of 1 or more"),
    (["bench", "--only", "unmark,bogus"], "--only", "unmark, roundtrip, cache, sim, image"),
]


@pytest.mark.parametrize("args, option, accepted", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_a_bad_value_exits_2_with_one_line_naming_the_option(args, option, accepted, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: discache {args[0]} "), "the subcommand's usage"
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"discache {args[0]}: error: argument {option}: expected ")
    assert accepted in last and repr(args[-1]) in last
    assert not re.search(r"positive_int|_fraction|invalid \w+ value|Traceback", err)


@pytest.mark.parametrize("args, command", [
    (["simulate", "--bogus"], "simulate"), (["demo", "extra"], "demo"),
    (["info", "--wide"], "info"), (["--bogus", "info"], None), ([], None),
])
def test_unknown_options_and_a_missing_command_show_the_right_usage(args, command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    prog = f"discache {command}" if command else "discache"
    assert err.startswith(f"usage: {prog} [-h]")
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"{prog}: error: ")
    if args:
        assert repr(" ".join(a for a in args if a.startswith("-") or a == "extra")) in last
        assert f"{prog} --help" in last
    else:
        assert "choose a command: info, demo, simulate, bench" in last


def test_a_value_a_design_cannot_take_is_said_once_without_a_repr():
    result = run_cli("simulate", "--trace", "-", "--designs", "madv_free")
    assert result.returncode in (0, 1, 2)
    assert "ValueError(" not in result.stderr and "Traceback" not in result.stderr


def test_every_help_text_is_complete():
    parser, commands = cli.build_parser()
    top = parser.format_help()
    assert "`" not in top and "discardable memory" in top.lower()
    for name, sub in commands.items():
        text = sub.format_help()
        assert sub.description and len(sub.description.split()) >= 8, name
        assert "`" not in text, name
        for action in sub._actions:
            assert action.help, f"discache {name} {action.option_strings}: no help"
        first_words = " ".join(sub.description.split()[:4])
        assert name in top and first_words in " ".join(top.split()), name


def widest(text):
    return max((len(line) for line in text.splitlines()), default=0)


def test_info_fits_100_columns(capsys):
    assert cli.main(["info"]) == 0
    assert widest(capsys.readouterr().out) <= 100


def test_simulate_tables_fit_100_columns_and_wide_keeps_them_whole(capsys):
    args = ["simulate", "--steps", "300", "--images", "20", "--image-pages", "16"]
    assert cli.main(args) == 0
    narrow = capsys.readouterr().out
    assert widest(narrow) <= 100
    assert cli.main([*args, "--wide"]) == 0
    wide = capsys.readouterr().out
    assert widest(wide) > 100, "the design table is wider than 100 in one piece"
    for header in ("unmark visits/call", "pages purged", "scanned/freed", "wall s"):
        assert header in wide
        assert all(word in narrow for word in header.split())


def test_a_trace_prints_only_its_own_results(tmp_path, capsys):
    trace = tmp_path / "t.trace"
    trace.write_text("spawn p\nmmap p r 4\nwrite p r 0 4\nunlock p r 0 4\nreclaim 2\n"
                     "lock p r 0 4\n")
    rc = cli.main(["simulate", "--trace", str(trace)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"trace {trace}" in out
    for unrelated in ("MADV_NONVOLATILE (unmark)", "under fork", "Swapless reclaim"):
        assert unrelated not in out


def test_simulate_draws_progress_on_a_terminal():
    """A long run shows progress: on a terminal (a pseudo-terminal here), a bar per design."""
    main_fd, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "discache", "simulate", "--steps", "3000",
                             "--images", "20", "--image-pages", "8", "--workload-only"],
                            stdin=terminal, stdout=terminal, stderr=terminal, cwd=ROOT)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main_fd)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.wait(timeout=120) == 0, text
    assert re.search(r"walk\+sigbus\s+\[#+\.*\] \d+/\d+", text), text[:500]
    assert "\r" in text, "the bar is redrawn in place"


def test_no_progress_and_no_terminal_draw_nothing():
    result = run_cli("simulate", "--steps", "200", "--images", "10", "--image-pages", "4",
                     "--workload-only")
    assert result.returncode == 0 and result.stderr == ""


@pytest.mark.parametrize("hidden, args, command", [
    ("PIL", ["demo", "--images", "2", "--size", "8"], "install Pillow"),
    ("matplotlib", ["bench", "--from-json", "x.json"], "install matplotlib"),
    ("pytest_benchmark", ["bench", "--only", "unmark", "--no-plots"], "install pytest-benchmark"),
    ("cachetools", ["bench", "--only", "cache", "--no-plots"], "install cachetools"),
])
def test_a_missing_package_is_named_with_the_command_that_installs_it(hidden, args, command):
    result = run_cli(*args, prelude=f"import sys; sys.modules[{hidden!r}] = None")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert line.endswith(f"{sys.executable} -m pip {command}"), line
