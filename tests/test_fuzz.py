"""The bounded CI run of the atheris fuzz targets in fuzz/: each runs in its own process for a
few seconds (two at a time on this 2-core machine) and must end without a crash or divergence.

Longer runs: fuzz/fuzz_pagetable.py -max_total_time=3600, in parallel with -jobs=N -workers=N
(see docs/reliability.md)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

# atheris is in the [test] extra where it has wheels (CPython 3.11 and later); below, it builds
# only with clang's libFuzzer, so the extra leaves it out and these tests say why they skip.
# Where it belongs to the extra, a missing atheris is a failure, not a skip.
if sys.version_info < (3, 11):
    pytest.importorskip("atheris", reason="atheris has no wheels for Python < 3.11 and building "
                        "it needs clang's libFuzzer: the [test] extra leaves it out there")

FUZZ_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz")
TARGETS = ("pagetable", "sim", "memory", "shared", "segment", "manager", "cache", "heap")
# Seconds per target (DISCACHE_FUZZ_SCALE multiplies them): the two model comparisons run longest.
SCALE = float(os.environ.get("DISCACHE_FUZZ_SCALE", "1"))
SECONDS = {name: SCALE * (15 if name in ("pagetable", "sim") else 8) for name in TARGETS}
DONE = re.compile(r"^Done (\d+) (?:runs )?in ", re.M)


def run_target(name: str, workdir: str) -> dict:
    """Run one target for SECONDS[name]; its exit code, executions and the tail of its output."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, os.path.join(FUZZ_DIR, f"fuzz_{name}.py"),
         f"-max_total_time={SECONDS[name]:g}", "-timeout=20", "-rss_limit_mb=2048",
         f"-artifact_prefix={workdir}{os.sep}", "-print_final_stats=1"],
        cwd=workdir, capture_output=True, text=True, timeout=SECONDS[name] * 4 + 60)
    found = DONE.findall(proc.stderr + proc.stdout)
    return {"returncode": proc.returncode, "executions": int(found[-1]) if found else 0,
            "seconds": round(time.monotonic() - start, 1), "tail": (proc.stdout + proc.stderr)[-3000:]}


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory, request):
    dirs = {name: str(tmp_path_factory.mktemp(f"fuzz_{name}")) for name in TARGETS}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_target, name, dirs[name]) for name in TARGETS}
        results = {name: f.result() for name, f in futures.items()}
    if getattr(request.config, "cache", None) is not None:  # absent with -p no:cacheprovider
        request.config.cache.set("discache/fuzz_executions",
                                 {name: r["executions"] for name, r in results.items()})
    summary = ", ".join(f"{name} {r['executions']} in {r['seconds']} s"
                        for name, r in results.items())
    print(f"\nfuzz executions: {summary}")
    return results


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_finds_nothing(fuzz_results, target):
    result = fuzz_results[target]
    assert result["returncode"] == 0, f"fuzz_{target} failed:\n{result['tail']}"
    assert result["executions"] > 0, f"fuzz_{target} ran nothing:\n{result['tail']}"


def test_fuzz_target_reports_a_planted_failure(tmp_path):
    """The driver notices a crash: a target whose check fails exits non-zero."""
    target = tmp_path / "fuzz_planted.py"
    target.write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom _harness import atheris, main\n"
        "def one(data):\n    assert len(data) < 3, 'planted'\n"
        "main(one)\n" % FUZZ_DIR)
    proc = subprocess.run([sys.executable, str(target), "-atheris_runs=100000",
                           f"-artifact_prefix={tmp_path}{os.sep}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "planted" in proc.stdout + proc.stderr


def test_every_target_runs_as_a_program():
    """libFuzzer's -jobs/-workers run the target file itself: a shebang and the run bit."""
    targets = sorted(f for f in os.listdir(FUZZ_DIR) if f.startswith("fuzz_") and f.endswith(".py"))
    assert {t[5:-3] for t in targets} == set(TARGETS)
    for name in targets:
        path = os.path.join(FUZZ_DIR, name)
        with open(path) as f:
            assert f.readline() == "#!/usr/bin/env python3\n", name
        assert os.access(path, os.X_OK), f"{name} has no run bit"


def test_parallel_jobs_log_into_the_ignored_directory(tmp_path):
    """fuzz_heap.py CORPUS -jobs=2 -workers=2 run from elsewhere: both workers run, their logs go
    to the log directory (not the current one), the corpus grows where it was named."""
    corpus, logs, here = tmp_path / "corpus", tmp_path / "logs", tmp_path / "here"
    corpus.mkdir()
    here.mkdir()
    env = {**os.environ, "DISCACHE_FUZZ_LOGS": str(logs)}
    proc = subprocess.run([os.path.join(FUZZ_DIR, "fuzz_heap.py"), "../corpus", "-jobs=2",
                           "-workers=2", "-max_total_time=3"], cwd=here, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(os.listdir(logs)) == ["fuzz-0.log", "fuzz-1.log"]
    assert os.listdir(here) == [], "nothing left in the current directory"
    for log in ("fuzz-0.log", "fuzz-1.log"):
        assert DONE.search((logs / log).read_text()), log
    assert os.listdir(corpus), "the workers fed the corpus"


def test_the_default_log_directory_is_ignored_by_git():
    root = os.path.dirname(FUZZ_DIR)
    if not os.path.exists(os.path.join(root, ".git")):
        pytest.skip("not a git checkout")
    proc = subprocess.run(["git", "check-ignore", "fuzz/logs/fuzz-0.log", "fuzz-0.log"],
                          cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["fuzz/logs/fuzz-0.log", "fuzz-0.log"], proc.stderr
