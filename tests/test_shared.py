"""DiscardableSharedMemory across two real processes, mirroring Chromium's tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import discache
from discache import LockResult, _core

PAGE = _core.page_size()
NBYTES = 4 * PAGE
PEER = os.path.join(os.path.dirname(__file__), "shared_peer.py")

pytestmark = pytest.mark.skipif(not _core.probe_memfd()[0], reason=_core.probe_memfd()[1])


class Peer:
    """The other process, driven line by line; it got the memfd by SCM_RIGHTS."""

    def __init__(self, shm: discache.DiscardableSharedMemory) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.getcwd())
        self.process = subprocess.Popen(
            [sys.executable, PEER, str(theirs.fileno()), str(shm.nbytes)],
            pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        socket.send_fds(ours, [b"x"], [shm.fileno()])
        self.channel = ours
        self.replies = ours.makefile("r")
        assert self.replies.readline() == "ready\n"

    def __call__(self, *command: object) -> str:
        self.channel.sendall((" ".join(map(str, command)) + "\n").encode())
        return self.replies.readline().strip()

    def close(self) -> None:
        self("quit")
        self.process.wait(timeout=30)
        self.channel.close()


@pytest.fixture
def shm():
    """A new segment, locked by this process."""
    shm = discache.DiscardableSharedMemory.create(NBYTES)
    yield shm
    shm.close()


@pytest.fixture
def peer(shm):
    peer = Peer(shm)
    yield peer
    peer.close()
    assert peer.process.returncode == 0


def test_data_and_lock_state_are_visible_in_both_processes(shm, peer):
    shm.data[:5] = b"hello"
    assert peer("read", 0, 5) == b"hello".hex()
    assert peer("write", PAGE, b"from peer".hex()) == "ok"
    assert bytes(shm.data[PAGE:PAGE + 9]) == b"from peer"
    assert peer("locked") == "True"
    shm.unlock()
    assert peer("locked") == "False"
    # The peer opened the segment while it was locked, so it has not seen this unlock yet:
    # its first attempt fails and learns the state, the second takes the lock.
    assert peer("lock") == "FAILED"
    assert peer("lock") == "SUCCESS"
    assert shm.is_memory_locked()
    assert peer("unlock") == "ok"
    assert not shm.is_memory_locked()


def test_lock_fails_while_another_process_holds_it(shm, peer):
    assert peer("lock") == "FAILED"
    assert peer("locked") == "True"
    shm.unlock()
    # The peer last saw "locked": its first attempt learns the new state, the second succeeds.
    assert peer("lock") == "FAILED"
    assert peer("lock") == "SUCCESS"
    assert shm.lock() == LockResult.FAILED
    assert peer("unlock") == "ok"


def test_purge_fails_while_any_process_holds_a_lock(shm, peer):
    shm.unlock()
    assert peer("lock") == "FAILED"
    assert peer("lock") == "SUCCESS"
    assert not shm.purge()
    assert not shm.purge()
    assert shm.is_memory_resident()
    assert peer("unlock") == "ok"
    assert not shm.purge()  # stale: the peer's unlock is newer than what we saw
    assert shm.purge()


def test_two_call_purge_with_a_stale_timestamp(shm, peer):
    shm.unlock()
    seen = shm.last_known_usage
    assert peer("lock") == "FAILED"
    assert peer("lock") == "SUCCESS"
    time.sleep(0.001)
    assert peer("unlock") == "ok"
    assert peer("usage") != repr(seen)
    assert shm.purge() is False  # the state holds the peer's newer timestamp
    assert shm.last_known_usage is not None and shm.last_known_usage > seen
    assert shm.purge() is True
    assert shm.last_known_usage is None


def test_failed_after_a_purge_then_purged_and_zero_filled(shm, peer):
    shm.data[:] = b"\xab" * NBYTES
    shm.unlock()
    assert peer("lock") == "FAILED"
    assert peer("lock") == "SUCCESS"
    assert peer("unlock") == "ok"  # the peer now knows the segment as "unlocked at t"
    assert shm.purge() is False  # stale: we knew our own unlock, not the peer's
    assert shm.purge() is True
    assert not shm.is_memory_resident()
    assert peer("resident") == "False"
    assert peer("read", 0, 8) == bytes(8).hex()
    assert bytes(shm.data) == bytes(NBYTES)
    assert peer("lock") == "FAILED"  # purged since the peer last looked
    assert peer("usage") == "None"
    assert peer("lock") == "PURGED"
    assert peer("resident") == "True"
    assert peer("unlock") == "ok"


def test_the_purging_process_gets_purged_on_its_next_lock(shm):
    shm.unlock()
    assert shm.purge()
    assert shm.lock() == LockResult.PURGED
    assert shm.is_memory_locked()
    shm.unlock()
    assert shm.lock() == LockResult.SUCCESS


def test_last_known_usage_transitions(shm):
    assert shm.last_known_usage is None
    before = time.time()
    shm.unlock()
    unlocked_at = shm.last_known_usage
    assert before <= unlocked_at <= time.time()
    assert shm.lock() == LockResult.SUCCESS
    assert shm.last_known_usage == unlocked_at
    assert shm.purge(now=unlocked_at + 5) is False  # locked: remembers `now`
    assert shm.last_known_usage == pytest.approx(unlocked_at + 5)
    shm.unlock()
    assert shm.last_known_usage > unlocked_at
    assert shm.purge() is True
    assert shm.last_known_usage is None


def test_partial_page_range_locking(shm, peer):
    shm.unlock()
    assert shm.lock(PAGE, 2 * PAGE) == LockResult.SUCCESS
    assert shm.locked_page_count == 2
    assert shm.lock(3 * PAGE) == LockResult.SUCCESS  # length 0: to the end
    assert shm.locked_page_count == 3
    assert peer("locked") == "True"
    assert not shm.purge()
    with pytest.raises(RuntimeError, match="already locked"):
        shm.lock(2 * PAGE, PAGE)
    shm.unlock(PAGE, PAGE)
    assert shm.is_memory_locked()  # pages 2 and 3 still locked
    with pytest.raises(RuntimeError, match="not locked"):
        shm.unlock(PAGE, PAGE)
    shm.unlock(2 * PAGE, 0)
    assert not shm.is_memory_locked()
    assert shm.locked_page_count == 0
    assert peer("locked") == "False"


@pytest.mark.parametrize("offset, length", [(1, 0), (0, 100), (PAGE, PAGE + 1), (-PAGE, 0),
                                            (NBYTES, 0), (0, NBYTES + PAGE), (3 * PAGE, 2 * PAGE)])
def test_bad_ranges_raise_and_change_nothing(shm, offset, length):
    with pytest.raises(ValueError):
        shm.unlock(offset, length)
    assert shm.locked_page_count == 4
    shm.unlock()
    with pytest.raises(ValueError):
        shm.lock(offset, length)
    assert shm.locked_page_count == 0 and not shm.is_memory_locked()


def test_open_rejects_closed_wrong_and_mismatched_fds(shm, tmp_path):
    with pytest.raises(ValueError, match="not an open file descriptor"):
        discache.DiscardableSharedMemory.open(-1, NBYTES)
    read_end, write_end = os.pipe()
    os.close(write_end)
    try:
        with pytest.raises(ValueError, match="not a discache shared memory segment"):
            discache.DiscardableSharedMemory.open(read_end, NBYTES)
    finally:
        os.close(read_end)
    with pytest.raises(ValueError, match="not an open file descriptor"):
        discache.DiscardableSharedMemory.open(read_end, NBYTES)  # now closed
    with open(tmp_path / "plain", "wb+") as plain:
        plain.truncate(NBYTES + PAGE)
        with pytest.raises(ValueError, match="not a discache shared memory segment"):
            discache.DiscardableSharedMemory.open(plain.fileno(), NBYTES)
    with pytest.raises(ValueError, match="not 8192"):
        discache.DiscardableSharedMemory.open(shm.fileno(), 2 * PAGE)
    with pytest.raises(TypeError):
        discache.DiscardableSharedMemory.open("3", NBYTES)
    with pytest.raises(TypeError):
        discache.DiscardableSharedMemory()
    with pytest.raises(ValueError):
        discache.DiscardableSharedMemory.create(0)


def test_the_memfd_is_sealed_against_resizing(shm):
    with pytest.raises(PermissionError):
        os.ftruncate(shm.fileno(), PAGE)
    assert os.fstat(shm.fileno()).st_size == NBYTES + PAGE


def test_closed_segment_raises_but_other_instances_keep_it(shm):
    other = discache.DiscardableSharedMemory.open(shm.fileno(), NBYTES)
    shm.data[:3] = b"abc"
    shm.close()
    shm.close()
    assert shm.closed
    for call in (shm.lock, shm.unlock, shm.purge, shm.fileno, shm.is_memory_locked,
                 lambda: shm.data):
        with pytest.raises(ValueError, match="closed"):
            call()
    assert bytes(other.data[:3]) == b"abc"
    # shm held the lock when it closed: a dead holder's lock is no lock (issue 11, item 9).
    assert not other.is_memory_locked()
    other.close()


def test_close_waits_for_views(shm):
    view = shm.data
    with pytest.raises(BufferError):
        shm.close()
    view.release()
    shm.close()


def test_force_reclaim_purges_only_unlocked_segments(shm, peer):
    assert discache.force_reclaim(shm) == 0
    shm.data[:1] = b"\x01"
    shm.unlock()
    assert peer("lock") == "FAILED"
    assert peer("lock") == "SUCCESS"
    assert discache.force_reclaim(shm) == 0
    assert peer("unlock") == "ok"
    assert discache.force_reclaim(shm) == 4
    assert peer("read", 0, 1) == "00"


def test_no_fd_or_mapping_leaks_after_10000_create_open_close():
    def counts():
        with open("/proc/self/maps") as maps:
            return len(os.listdir("/proc/self/fd")), sum(1 for _ in maps)

    before = counts()
    for _ in range(10_000):
        shm = discache.DiscardableSharedMemory.create(PAGE)
        other = discache.DiscardableSharedMemory.open(shm.fileno(), PAGE)
        shm.unlock()
        other.close()
        shm.close()
    fds, mappings = counts()
    assert fds == before[0] and mappings <= before[1] + 2


def test_a_lock_during_a_purge_waits_for_the_hole_punch():
    # Regression (found by test_stress_shared.py): purge() published "purged" before punching
    # the hole, so a lock elsewhere could get PURGED, write, and have the punch zero its data.
    nbytes = 32 << 20
    purger = discache.DiscardableSharedMemory.create(nbytes)
    other = discache.DiscardableSharedMemory.open(purger.fileno(), nbytes)
    try:
        with purger.data as view:
            view[:] = b"\xaa" * nbytes  # populated: the punch takes milliseconds
        purger.unlock()
        unlocked = other._state_word()
        done = threading.Event()
        thread = threading.Thread(target=lambda: (purger.purge(), done.set()))
        thread.start()
        while other._state_word() == unlocked:  # until the purge's compare-and-swap
            pass
        result = LockResult.FAILED
        while result == LockResult.FAILED:  # the punch runs without the GIL
            result = other.lock()
        last = nbytes - PAGE
        with other.data as view:
            assert bytes(view[last:]) == bytes(PAGE), "PURGED before the pages were zeroed"
            view[last:last + 5] = b"mine!"
        thread.join()
        assert done.is_set()
        with other.data as view:
            assert bytes(view[last:last + 5]) == b"mine!", "a purge zeroed locked pages"
        assert result == LockResult.PURGED
        other.unlock()
    finally:
        other.close()
        purger.close()


def test_the_shared_memory_is_a_shared_memfd_segment():
    """DiscardableSharedMemory sits on the memfd segment kind: a Segment given a file maps it
    shared, and a forked child writes into the same pages (a private memfd segment is re-owned
    by the child instead)."""
    fd = os.memfd_create("probe")
    os.ftruncate(fd, 2 * PAGE)
    try:
        shared = discache._core.Segment(2, "memfd", fd=fd)
        private = discache._core.Segment(2, "memfd")
        assert shared.shared and not private.shared
        pid = os.fork()
        if pid == 0:
            shared.write(0, b"child")
            private.write(0, b"child")
            os._exit(0)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert shared.read(0, 5) == b"child" and private.read(0, 5) == b"\0" * 5
        assert os.pread(fd, 5, 0) == b"child"
        shared.discard_span(0, 1)
        assert os.pread(fd, 5, 0) == b"\0" * 5
        shared.close()
        private.close()
        with pytest.raises(ValueError, match="only a memfd segment"):
            discache._core.Segment(2, "madvfree", fd=fd)
    finally:
        os.close(fd)
