"""Trace files, the replayer and the `discache simulate` command."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from discache.cli import main
from discache.sim.replay import DESIGNS, Replayer, TraceError, parse_trace, read_trace
from discache.sim.workload import image_cache

DOCS = Path(__file__).resolve().parent.parent / "docs" / "sim.md"

SMALL = """\
# one process caches an 8-page object, goes idle, and is squeezed
spawn app
mmap app obj 8
write app obj 0 8
unlock app obj 0 8      # idle: discardable
reclaim 4               # memory pressure takes 4 pages (by CLOCK: pages 0-3)
read app obj 0 1        # an unlocked peek at a lost page
lock app obj 0 8        # reports the loss; the replayer regenerates the object
read app obj 0 8
"""


def replay(text, design, ram_pages=64, swap_pages=0):
    return Replayer(DESIGNS[design], ram_pages, swap_pages, 4096).run(read_trace(io.StringIO(text)))


def test_parse_trace_reads_operations_and_comments():
    ops = list(parse_trace(io.StringIO(SMALL)))
    assert ops[0] == ("spawn", "app")
    assert ops[1] == ("mmap", "app", "obj", 8)
    assert ops[4] == ("reclaim", 4)
    assert len(ops) == 8
    assert list(parse_trace(["mmapfd p r f 2"])) == [("mmapfd", "p", "r", "f", 2, 0)]


@pytest.mark.parametrize("line, message", [
    ("frobnicate app", "unknown operation 'frobnicate'"),
    ("mmap app obj", "mmap takes 3 arguments"),
    ("write app obj zero 8", "first must be an integer"),
    ("read app obj 0 0", "count must be positive"),
    ("reclaim -1", "pages must be positive"),
])
def test_parse_trace_errors_name_the_line(line, message):
    with pytest.raises(TraceError, match=f"t.txt:2: {message}"):
        list(parse_trace(["spawn app", line], "t.txt"))


@pytest.mark.parametrize("design, visits, sigbus, zero_reads", [
    ("walk+sigbus", 8, 1, 0),
    ("token+sigbus", 0, 1, 0),
    ("token+zerofill", 0, 0, 1),
    ("madv_free", 8, 0, 1),
])
def test_small_trace_under_each_design(design, visits, sigbus, zero_reads):
    r = replay(SMALL, design)
    row = r.row()
    assert r.unmark_calls == 1 and r.unmark_visits == visits
    assert r.mark_visits == (8 if design == "madv_free" else 0)
    assert r.purged_locks == 1
    assert row["SIGBUS"] == sigbus
    assert r.zero_reads == zero_reads
    assert row["pages purged"] == 4
    assert row["reclaimed"] == 4


def test_fork_and_shared_file_trace():
    trace = """\
spawn a
memfd f 4
mmapfd a shm f 4
mmap a priv 4
write a priv 0 4
write a shm 0 4
fork a b
unlock a priv 0 4
reclaim 8              # the child's copy is not volatile: nothing private can go
unlock b shm 0 4       # the file's volatility is shared: a's view is volatile too
reclaim 8
lock a shm 0 4
lock a priv 0 4
exit b
"""
    r = replay(trace, "token+sigbus")
    assert r.purged_locks == 1  # the shared pages were purged, the private ones were not
    assert r.stats["purged_pages"] == 4
    assert r.stats["processes"] == 1


def test_trace_errors_at_replay_name_the_region():
    with pytest.raises(TraceError, match="no region 'nope'"):
        replay("spawn app\nread app nope 0 1\n", "token+sigbus")
    with pytest.raises(TraceError, match="run past region"):
        replay("spawn app\nmmap app r 2\nread app r 1 2\n", "token+sigbus")


def test_image_cache_is_deterministic():
    assert list(image_cache(steps=50, seed=3)) == list(image_cache(steps=50, seed=3))
    assert list(image_cache(steps=50, seed=3)) != list(image_cache(steps=50, seed=4))


def test_simulate_command_default_run_reproduces_the_claims(capsys):
    assert main(["simulate", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {row["design"]: row for row in report["designs"]}
    assert set(rows) == set(DESIGNS)
    # unmark: flat with tokens, one visit per page with the walk
    assert rows["token+sigbus"]["unmark visits/call"] == 0
    assert rows["walk+sigbus"]["unmark visits/call"] == 256
    # SIGBUS vs zero-fill on the same workload
    assert rows["token+sigbus"]["SIGBUS"] > 0 and rows["token+sigbus"]["zero reads"] == 0
    assert rows["token+zerofill"]["SIGBUS"] == 0 and rows["token+zerofill"]["zero reads"] > 0
    # identical answers from both strategies
    for key in ("locks purged", "pages purged", "faults", "SIGBUS", "reclaimed", "scanned"):
        assert rows["token+sigbus"][key] == rows["walk+sigbus"][key]
    sweep = report["unmark_sweep"]
    assert [row["token visits"] for row in sweep] == [0] * len(sweep)
    assert [row["walk visits"] for row in sweep] == [row["pages"] for row in sweep]
    fork = {row["marked by"]: row for row in report["fork_accounting"]}
    assert fork["all"]["sum"] == 3 * 1024 and fork["all"]["physical discardable"] == 1024
    assert fork["parent only"]["sum"] == 1024 and fork["parent only"]["physical discardable"] == 0
    swapless = report["swapless_reclaim"]
    assert swapless[0]["scanned"] == 262144 and swapless[0]["freed"] == 0
    assert swapless[1]["scanned"] == 0 and swapless[1]["freed"] == 0
    assert all(row["freed"] == 4096 for row in swapless[2:])


def test_simulate_command_prints_tables(capsys):
    assert main(["simulate", "--workload-only", "--steps", "300", "--designs",
                 "token+sigbus,madv_free", "--wide"]) == 0
    out = capsys.readouterr().out
    assert "token+sigbus" in out and "madv_free" in out and "walk+sigbus" not in out
    assert "unmark visits/call" in out


def test_simulate_command_replays_a_trace_file(tmp_path, capsys):
    path = tmp_path / "small.trace"
    path.write_text(SMALL)
    assert main(["simulate", "--trace", str(path), "--ram-pages", "64", "--workload-only",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {row["design"]: row["SIGBUS"] for row in report["designs"]} == {
        "walk+sigbus": 1, "token+sigbus": 1, "token+zerofill": 0, "madv_free": 0}


def test_simulate_command_reports_bad_input(tmp_path, capsys):
    path = tmp_path / "bad.trace"
    path.write_text("spawn app\nmmap app\n")
    assert main(["simulate", "--trace", str(path)]) == 2
    assert "bad.trace:2: mmap takes 3 arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        main(["simulate", "--designs", "fastest"])
    assert exit.value.code == 2
    assert "argument --designs: expected a comma-separated list of walk+sigbus" in \
        capsys.readouterr().err
    assert main(["simulate", "--trace", str(tmp_path / "missing.trace")]) == 2
    assert "No such file" in capsys.readouterr().err
    path.write_text("spawn app\nmmap app big 100\nwrite app big 0 100\n")
    assert main(["simulate", "--trace", str(path), "--ram-pages", "16", "--workload-only"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "simulated RAM is full (16 pages)" in err, "said once"


def test_the_trace_example_of_the_docs(tmp_path):
    text = DOCS.read_text(encoding="utf-8")
    example = text.split("```\n# two processes share")[1].split("```")[0]
    example = "# two processes share" + example
    rows = {}
    for design in DESIGNS:
        if design == "madv_free":
            continue  # MADV_FREE does not apply to shared memory (EINVAL)
        r = replay(example, design, ram_pages=128)
        rows[design] = (r.row()["SIGBUS"], r.zero_reads, r.purged_locks, r.stats["purged_pages"])
    assert rows == {"walk+sigbus": (1, 0, 1, 32), "token+sigbus": (1, 0, 1, 32),
                    "token+zerofill": (0, 1, 1, 32)}
    with pytest.raises(OSError, match="MADV_FREE works on private anonymous memory only"):
        replay(example, "madv_free", ram_pages=128)


def test_simulate_command_runs_the_designs_that_apply(tmp_path, capsys):
    path = tmp_path / "shared.trace"
    path.write_text("spawn a\nmemfd f 4\nmmapfd a m f 4\nwrite a m 0 4\nunlock a m 0 4\n")
    assert main(["simulate", "--trace", str(path), "--workload-only", "--json"]) == 1
    captured = capsys.readouterr()
    assert "madv_free: the workload failed" in captured.err
    designs = [row["design"] for row in json.loads(captured.out)["designs"]]
    assert designs == ["walk+sigbus", "token+sigbus", "token+zerofill"]


def test_the_quick_start_of_the_docs_runs(capsys):
    text = DOCS.read_text(encoding="utf-8")
    code = text.split("```python\n")[1].split("```")[0]
    exec(compile(code, str(DOCS), "exec"), {})
    assert capsys.readouterr().out.strip() == hex(0x100000000)
