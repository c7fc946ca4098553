"""A DiscardableSharedMemory holder that dies holding the lock (issue 11, item 9) is recovered
from: its open-file-description lock goes with it, and a survivor takes the segment over as
PURGED.  A live holder is never taken over.  Also item 12: a lock() of an instance is not starved
by a purge loop on the same instance in another thread."""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import discache
from discache import LockResult, _core

PAGE = _core.page_size()
NBYTES = 8 * PAGE

pytestmark = pytest.mark.skipif(not _core.probe_memfd()[0], reason=_core.probe_memfd()[1])

# A peer that opens the segment, locks it, writes, says so, then does what it is told: wait
# (to be killed), exit without unlocking, or crash.
HOLDER = """
import os, sys, discache
shm = discache.DiscardableSharedMemory.open(int(sys.argv[1]), int(sys.argv[2]))
result = shm.lock()
if result.name != "SUCCESS":
    print("lock", result.name, flush=True); sys.exit(3)
shm.data[:5] = b"held!"
print("locked", shm.instance_id, flush=True)
how = sys.stdin.readline().strip()
if how == "exit":
    os._exit(0)            # no close(), no unlock(), no finalizers
if how == "abort":
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.abort()             # a crash (SIGABRT), without a core file
if how == "unlock":
    shm.unlock(); print("unlocked", flush=True); sys.stdin.readline()
"""


class Holder:
    """Another process holding the segment's lock."""

    def __init__(self, shm: discache.DiscardableSharedMemory) -> None:
        env = dict(os.environ, PYTHONPATH=os.getcwd())
        self.process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(HOLDER), str(shm.fileno()), str(shm.nbytes)],
            pass_fds=[shm.fileno()], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)
        line = self.process.stdout.readline().split()
        assert line[0] == "locked", line
        self.instance_id = int(line[1])

    def tell(self, how: str) -> None:
        self.process.stdin.write(how + "\n")
        self.process.stdin.flush()

    def end(self, how: str) -> int:
        if how == "SIGKILL":
            self.process.kill()
        else:
            self.tell(how)
        return self.process.wait(timeout=30)


@pytest.fixture
def shm():
    """A new segment holding data, unlocked by this process (the creator)."""
    shm = discache.DiscardableSharedMemory.create(NBYTES)
    shm.data[:] = b"\x42" * NBYTES
    shm.unlock()
    yield shm
    shm.close()


def test_each_instance_has_its_own_id(shm):
    other = discache.DiscardableSharedMemory.open(shm.fileno(), NBYTES)
    third = discache.DiscardableSharedMemory.open(other.fileno(), NBYTES)
    try:
        ids = {shm.instance_id, other.instance_id, third.instance_id}
        assert len(ids) == 3 and 0 not in ids
        assert other.lock() == LockResult.SUCCESS
        assert shm._holder_id() == other.instance_id
        assert shm._state_word() == 1  # Chromium's view of the word: locked, null time
    finally:
        third.close()
        other.close()


def test_a_live_holder_in_another_process_is_never_taken_over(shm):
    holder = Holder(shm)
    try:
        for _ in range(20):
            assert shm.lock() == LockResult.FAILED
            assert shm.purge() is False
            assert shm.is_memory_locked()
        assert shm._holder_id() == holder.instance_id
        assert bytes(shm.data[:5]) == b"held!"
        holder.tell("unlock")
        assert holder.process.stdout.readline() == "unlocked\n"
        assert not shm.is_memory_locked()
        assert shm.lock() == LockResult.FAILED   # unlocked since this instance last looked
        assert shm.lock() == LockResult.SUCCESS  # Chromium's two-step; the data is intact
        assert bytes(shm.data[:6]) == b"held!\x42"
        shm.unlock()
    finally:
        holder.process.kill()
        holder.process.wait(timeout=30)


@pytest.mark.parametrize("how", ["SIGKILL", "exit", "abort"])
def test_a_holder_that_dies_is_taken_over_as_purged(shm, how):
    holder = Holder(shm)
    assert shm.lock() == LockResult.FAILED
    status = holder.end(how)
    assert status != 0 if how != "exit" else status == 0
    assert shm._state_word() == 1 and shm._holder_id() == holder.instance_id  # still marked
    assert not shm.is_memory_locked()                                        # but not held
    assert shm.lock() == LockResult.PURGED
    assert shm._holder_id() == shm.instance_id
    assert bytes(shm.data) == bytes(NBYTES)  # the dead holder's pages are dropped, not trusted
    shm.data[:4] = b"mine"
    shm.unlock()
    assert shm.lock() == LockResult.SUCCESS and bytes(shm.data[:4]) == b"mine"
    shm.unlock()


def test_purge_takes_over_a_dead_holder(shm):
    holder = Holder(shm)
    assert shm.purge() is False
    holder.end("SIGKILL")
    assert shm.purge() is True
    assert not shm.is_memory_resident()
    assert shm.lock() == LockResult.PURGED


@pytest.mark.parametrize("how", ["close", "gc"])
def test_an_instance_closed_or_collected_while_locked_releases_it(shm, how):
    other = discache.DiscardableSharedMemory.open(shm.fileno(), NBYTES)
    assert other.lock() == LockResult.SUCCESS
    assert shm.lock() == LockResult.FAILED
    if how == "close":
        other.close()
    else:
        del other
        gc.collect()
    assert shm.lock() == LockResult.PURGED
    shm.unlock()


def test_two_survivors_agree_on_one_new_holder(shm):
    holder = Holder(shm)
    survivors = [discache.DiscardableSharedMemory.open(shm.fileno(), NBYTES) for _ in range(3)]
    try:
        holder.end("SIGKILL")
        results = [s.lock() for s in [shm] + survivors]
        assert results.count(LockResult.PURGED) == 1
        assert results.count(LockResult.FAILED) == 3
        winner = ([shm] + survivors)[results.index(LockResult.PURGED)]
        assert shm._holder_id() == winner.instance_id
        winner.unlock()
    finally:
        for s in survivors:
            s.close()


WORKER = """
import os, sys, time, discache
shm = discache.DiscardableSharedMemory.open(int(sys.argv[1]), int(sys.argv[2]))
me = os.getpid().to_bytes(4, "little")
print("id", shm.instance_id, flush=True)
done = 0
deadline = time.monotonic() + 60
while done < int(sys.argv[3]) and time.monotonic() < deadline:
    if shm.lock().name == "FAILED":
        continue
    shm.data[:4] = me
    for _ in range(50):
        if bytes(shm.data[:4]) != me:
            print("someone wrote under my lock", flush=True); sys.exit(2)
    shm.unlock()
    done += 1
print("done", done, flush=True)
"""


def test_lockers_keep_going_when_one_of_them_is_killed_holding_the_lock():
    shm = discache.DiscardableSharedMemory.create(NBYTES)
    shm.unlock()
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    workers = [subprocess.Popen(
        [sys.executable, "-c", WORKER, str(shm.fileno()), str(NBYTES), "100"],
        pass_fds=[shm.fileno()], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)]
    victim = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(shm.fileno()), str(NBYTES), "1000000000"],
        pass_fds=[shm.fileno()], env=env, stdout=subprocess.PIPE, text=True)
    try:
        victim_id = int(victim.stdout.readline().split()[1])
        deadline = time.monotonic() + 30
        while True:  # kill the victim while it holds the lock
            os.kill(victim.pid, signal.SIGSTOP)
            _wait_stopped(victim.pid)
            if shm._holder_id() == victim_id:
                break
            os.kill(victim.pid, signal.SIGCONT)
            assert time.monotonic() < deadline, "the victim never held the lock"
            time.sleep(0.001)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        for worker in workers:
            out, _ = worker.communicate(timeout=90)
            assert worker.returncode == 0, out
            assert out.splitlines()[1:] == ["done 100"], out
    finally:
        for process in workers + [victim]:
            process.kill()
            process.wait(timeout=30)
        shm.close()


def _wait_stopped(pid: int) -> None:
    """Until the process really is stopped (kill() only queues SIGSTOP)."""
    while True:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.0005)


def test_lock_is_not_starved_by_a_purge_loop_in_another_thread():
    # item 12: the memfd backend's lock() raised (or failed twice) while another thread's
    # force_reclaim loop held the instance for its hole punch.
    mem = discache.allocate(4 << 20, "memfd")
    mem.data[:] = b"\x01" * mem.nbytes
    mem.unlock()
    stop = threading.Event()
    purges = []

    def purge_loop():
        while not stop.is_set():
            purges.append(discache.force_reclaim(mem))

    thread = threading.Thread(target=purge_loop)
    thread.start()
    try:
        outcomes = []
        for _ in range(200):
            outcomes.append(mem.lock())
            mem.unlock()
    finally:
        stop.set()
        thread.join()
    assert len(outcomes) == 200
    assert any(purges), "the purge loop never purged: the test proved nothing"
    mem.close()
