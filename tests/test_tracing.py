"""Recording discardable-memory traffic (discache.record_trace, DISCACHE_TRACE, discache demo
--record) and replaying it under every design (discache simulate --trace)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import discache
from discache import tracing
from discache.demo import run_demo
from discache.sim import MADV_FREE, MADV_NONVOLATILE, MADV_PAGEOUT, MADV_VOLATILE, SimulatedKernel
from discache.sim.backend import simulated_kernel
from discache.sim.replay import DESIGNS, Replayer, TraceError, read_trace

ROOT = Path(__file__).resolve().parent.parent
PAGE = discache._core.page_size()
NAME = re.compile(r"m[0-9]+")


def lines(path: Path) -> list[list[str]]:
    """The trace's operations, each as its words (comments left out)."""
    return [line.split() for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def replay(path: Path, design: str = "token+sigbus", ram_pages: int = 1 << 14):
    """The trace replayed on a fresh simulated kernel under one design."""
    with open(path) as stream:
        ops = read_trace(stream, str(path))
    return Replayer(DESIGNS[design], ram_pages).run(ops)


def simulate_json(*args: str) -> dict:
    """`discache simulate ... --json` as a subprocess, its report."""
    out = subprocess.run([sys.executable, "-m", "discache", "simulate", "--json",
                          "--no-progress", *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    return json.loads(out.stdout)


# ---------------------------------------------------------------------- recording


def test_nothing_is_recorded_unless_asked():
    assert tracing.active is None
    mem = discache.allocate(PAGE, backend="madvfree")
    mem.unlock()
    mem.close()
    assert tracing.active is None


def test_every_event_of_a_manager_span_is_recorded_in_order(tmp_path):
    path = tmp_path / "app.trace"
    manager = discache.DiscardableMemoryManager(1 << 22, "madvfree")
    with discache.record_trace(path) as recorder:
        mem = manager.allocate(3 * PAGE)
        mem.write(b"x" * (3 * PAGE))
        mem.read(PAGE, 10)
        mem.unlock()
        gone = discache.force_reclaim(mem)
        assert mem.lock() is False
        mem.unlock()
        manager.release_free_memory()  # a policy's purge
        assert mem.lock() is False
        mem.close()
    assert recorder.events == len(path.read_text().splitlines())
    assert lines(path) == [
        ["spawn", "app"],
        ["mmap", "app", "m1", "3"],
        ["write", "app", "m1", "0", "3"],
        ["read", "app", "m1", "1", "1"],
        ["unlock", "app", "m1", "0", "3"],
        ["pageout", "app", "m1", "0", "3", str(gone)],
        ["lock", "app", "m1", "0", "3", "3"],
        ["write", "app", "m1", "0", "3"],  # refilled through its address before the unlock
        ["unlock", "app", "m1", "0", "3"],
        ["purge", "app", "m1", "0", "3"],
        ["lock", "app", "m1", "0", "3", "3"],
        ["munmap", "app", "m1"],
    ]
    assert gone == 3
    manager.stop()


def test_names_leak_no_key_or_data(tmp_path):
    path = tmp_path / "cache.trace"
    secret_key, secret_value = "user-4711-passport", b"ssn=078-05-1120 " * 300
    cache = discache.DiscardableCache(1 << 22, "madvfree", idle_unlock=None)
    with discache.record_trace(path):
        cache[secret_key] = secret_value
        cache.sweep(0)
        discache.force_reclaim(cache)
        assert cache.get(secret_key) is None  # reclaimed, found purged
        cache.close()
    text = path.read_text()
    assert "passport" not in text and "078-05" not in text and "4711" not in text
    ops = lines(path)
    assert all(NAME.fullmatch(words[2]) for words in ops if words[0] != "spawn")
    kinds = [w[0] for w in ops]
    assert {"mmap", "write", "unlock", "pageout", "lock", "munmap"} <= set(kinds)
    assert kinds.count("mmap") == kinds.count("munmap") == 1
    assert any(w[0] == "lock" and w[-1] != "0" for w in ops)  # the purge the cache found


def test_a_purge_the_kernel_made_on_its_own_is_placed_before_the_lock_that_found_it(tmp_path):
    """No recorded reclaim explains the loss: a `lost` line puts it just before the lock."""
    path = tmp_path / "sim.trace"
    with discache.record_trace(path):
        mem = discache.allocate(4 * PAGE, backend="simulated")
        mem.write(b"y" * (4 * PAGE))
        mem.unlock()
        kernel = simulated_kernel()
        kernel.reclaim(kernel.volatile_pages())  # memory pressure: nobody asked this memory
        assert mem.lock() is False
        mem.close()
    ops = lines(path)
    lock = next(i for i, w in enumerate(ops) if w[0] == "lock")
    assert ops[lock - 1] == ["lost", "app", ops[lock][2], "0", "4"]
    assert ops[lock][-1] == "4"
    assert replay(path).purged_locks == 1


def test_a_sigbus_on_unlocked_memory_is_a_detected_purge(tmp_path):
    path = tmp_path / "sigbus.trace"
    try:
        mem = discache.allocate(2 * PAGE, backend="madvfree-sigbus")
    except discache.BackendUnavailableError as error:
        pytest.skip(str(error))
    mem.write(b"z" * (2 * PAGE))
    with discache.record_trace(path):
        mem.unlock()
        discache.force_reclaim(mem)
        with pytest.raises(discache.PurgedPageError):
            mem.read(PAGE, 1)
        mem.lock()
        mem.close()
    ops = lines(path)
    # Memory from before the recording is introduced at its first event, filled, locked then.
    assert ops[1:4] == [["mmap", "app", "m1", "2"], ["write", "app", "m1", "0", "2"],
                        ["unlock", "app", "m1", "0", "2"]]
    lost = ops.index(["lost", "app", "m1", "0", "2"])
    assert ops[lost + 1] == ["read", "app", "m1", "1", "1"]
    result = replay(path)
    assert result.stats["sigbus"] == 1 and result.purged_locks == 1


def test_recording_twice_at_once_is_refused_and_the_first_file_stays_whole(tmp_path):
    with discache.record_trace(tmp_path / "a.trace"):
        with pytest.raises(RuntimeError, match="already recording"):
            with discache.record_trace(tmp_path / "b.trace"):
                pass
        discache.allocate(PAGE, backend="madvfree").close()
    assert tracing.active is None
    assert [w[0] for w in lines(tmp_path / "a.trace")] == ["spawn", "mmap", "munmap"]


def test_a_forked_child_is_not_in_the_parents_trace(tmp_path):
    path = tmp_path / "fork.trace"
    with discache.record_trace(path):
        discache.allocate(PAGE, backend="madvfree").close()
        pid = os.fork()
        if pid == 0:
            try:
                for _ in range(5000):  # more than a flush's worth
                    discache.allocate(PAGE, backend="madvfree").close()
            finally:
                os._exit(0 if tracing.active is None else 1)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        discache.allocate(PAGE, backend="madvfree").close()
    assert [w[0] for w in lines(path)] == ["spawn", "mmap", "munmap", "mmap", "munmap"]


def test_memory_collected_without_close_is_released_in_the_trace(tmp_path):
    path = tmp_path / "gc.trace"
    with discache.record_trace(path):
        mem = discache.allocate(PAGE, backend="madvfree")
        del mem
    assert [w[0] for w in lines(path)] == ["spawn", "mmap", "munmap"]


def test_discache_trace_records_a_whole_program(tmp_path):
    path = tmp_path / "whole-{pid}.trace"
    program = ("import discache\n"
               "m = discache.allocate(8192, backend='madvfree')\n"
               "m.unlock(); discache.force_reclaim(m); m.lock(); m.close()\n"
               "import os; print(os.getpid())\n")
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                         check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "DISCACHE_TRACE": str(path)})
    written = tmp_path / f"whole-{out.stdout.strip()}.trace"
    assert [w[0] for w in lines(written)] == ["spawn", "mmap", "write", "unlock", "pageout",
                                              "lock", "munmap"]
    assert replay(written).purged_locks == 1
    unwritable = subprocess.run(
        [sys.executable, "-c", "import discache; print(discache.tracing.active)"],
        capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT),
             "DISCACHE_TRACE": str(tmp_path / "no" / "such" / "dir.trace")})
    assert unwritable.returncode == 0 and unwritable.stdout.strip() == "None"
    assert "DISCACHE_TRACE: cannot record to" in unwritable.stderr


# ---------------------------------------------------------------------- replay


def test_recorded_lines_are_checked_like_the_others(tmp_path):
    bad = tmp_path / "bad.trace"
    bad.write_text("spawn app\nmmap app m1 2\nlock app m1 0 2 -1\n")
    with pytest.raises(TraceError, match="bad.trace:3: lost must be positive"):
        replay(bad)
    bad.write_text("spawn app\nmmap app m1 2\npageout app m1 0 2 1 7\n")
    with pytest.raises(TraceError, match="pageout takes 5 arguments"):
        replay(bad)


def test_a_policy_purge_is_reported_by_the_next_lock_under_every_design(tmp_path):
    path = tmp_path / "purge.trace"
    path.write_text("spawn app\nmmap app m1 4\nwrite app m1 0 4\nunlock app m1 0 4\n"
                    "purge app m1 0 4\nlock app m1 0 4\nunlock app m1 0 4\nlock app m1 0 4\n")
    for design in DESIGNS:
        result = replay(path, design)
        assert result.purged_locks == 1, design
        assert result.recorded_locks == 0


def test_the_simulators_pageout_purges_volatile_pages_it_alone_maps():
    kernel = SimulatedKernel(ram_pages=64)
    parent = kernel.spawn()
    a = parent.mmap(4 * PAGE)
    parent.touch(a, 4 * PAGE, write=True)
    parent.madvise(a, 4 * PAGE, MADV_VOLATILE)
    child = parent.fork()
    child.touch(a, PAGE, write=True)  # page 0: the child's own copy now
    parent.madvise(a, 4 * PAGE, MADV_PAGEOUT)
    assert kernel.stats()["purged_pages"] == 1  # pages 1-3 are shared with the child
    assert parent.madvise(a, PAGE, MADV_NONVOLATILE) == 1
    assert parent.madvise(a + PAGE, 3 * PAGE, MADV_NONVOLATILE) == 0
    child.exit()
    parent.madvise(a, 4 * PAGE, MADV_FREE)
    parent.madvise(a, 4 * PAGE, MADV_PAGEOUT)
    assert kernel.stats()["lazy_freed"] == 3  # page 0 was dropped by the purge already
    assert parent.read(a + PAGE, 1) == b"\0"


def test_a_recorded_demo_replays_under_every_design_with_the_real_purges(tmp_path, capsys):
    """The demo's forced reclaims, replayed, make token+sigbus (and every design) find exactly
    the purged locks the real run found."""
    path = tmp_path / "demo.trace"
    with discache.record_trace(path):
        result = run_demo(24, 192, "madvfree", reclaim=0.5, seed=7)  # a slab per bitmap
    assert result.consistent and result.purges_detected == 12
    report = simulate_json("--trace", str(path), "--ram-pages", "16384")
    assert [row["design"] for row in report["designs"]] == list(DESIGNS)
    recorded = report["recorded"]["locks purged"]
    assert recorded > 0
    for row in report["designs"]:
        assert row["locks purged"] == recorded, row["design"]
        assert row["SIGBUS"] == 0 and row["zero reads"] == 0  # the demo never reads unlocked
    assert report["designs"][0]["pages purged"] == sum(
        int(w[-1]) for w in lines(path) if w[0] == "pageout")


def test_demo_record_writes_a_trace_simulate_replays(tmp_path):
    path = tmp_path / "cli.trace"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "discache", "demo", "--images", "8", "--size",
                          "48", "--record", str(path), "--no-progress"], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert f"events recorded to {path}" in out.stdout
    table = subprocess.run([sys.executable, "-m", "discache", "simulate", "--trace", str(path),
                            "--no-progress"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert table.returncode == 0, table.stderr
    assert all(design in table.stdout for design in DESIGNS)
    assert "recorded on the real kernel:" in table.stdout
    bad = subprocess.run([sys.executable, "-m", "discache", "demo", "--record",
                          str(tmp_path / "no" / "such" / "dir.trace")], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    assert bad.returncode == 2 and "cannot record to" in bad.stderr
