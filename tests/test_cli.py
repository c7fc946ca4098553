"""`discache info` and the build's refusal to go without Cython."""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import discache
from discache import _core, backends, cli

ROOT = Path(__file__).resolve().parent.parent


def test_info_prints_version_page_size_kernel_and_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"discache {discache.__version__}" in out
    assert f"page size {os.sysconf('SC_PAGE_SIZE')} bytes" in out
    assert platform.release() in out
    for info in backends.available():
        line = next(line for line in out.splitlines() if line.split()[:1] == [info.name])
        assert ("yes" if info.available else "no") in line.split()[1]
        assert info.reason in line


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
