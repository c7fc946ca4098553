#!/usr/bin/env python3
"""Fuzz DiscardableSharedMemory: lock/unlock(offset, length) sequences and open(fd, nbytes)."""
from __future__ import annotations

import os

from _harness import atheris, checked, main, pick_int, REJECTED

with atheris.instrument_imports():
    from discache import DiscardableSharedMemory, LockResult

PAGE = os.sysconf("SC_PAGE_SIZE")
ERRORS = (ValueError, TypeError, OverflowError, RuntimeError)


def state(shm) -> tuple:
    return (shm.locked_page_count, shm.is_memory_locked(), shm.is_memory_resident(),
            shm.last_known_usage, bytes(shm.data))


def expected_pages(npages: int, offset, length):
    """The pages [first, end) a valid (offset, length) covers, or None if it is refused."""
    if not all(isinstance(v, int) for v in (offset, length)):
        return None
    if offset < 0 or length < 0 or offset % PAGE or length % PAGE:
        return None
    if length == 0:
        length = npages * PAGE - offset
    if offset >= npages * PAGE or length <= 0 or offset + length > npages * PAGE:
        return None
    return range(offset // PAGE, (offset + length) // PAGE)


def fuzz_open(fdp, shm, other) -> None:
    """open() of good and bad fds and sizes: a mapping only for the right pair."""
    r, w = os.pipe()
    devnull = os.open("/dev/null", os.O_RDONLY)
    closed = os.dup(r)
    os.close(closed)
    try:
        fd = fdp.PickValueInList([shm.fileno(), other.fileno(), r, devnull, closed, -1, 1 << 40,
                                  1 << 70, 2.5, "3", None])
        nbytes = fdp.PickValueInList([shm.nbytes, other.nbytes, shm.nbytes + 1, PAGE, 0, -1,
                                      1 << 70, None])
        before = len(os.listdir("/proc/self/fd"))
        try:
            peer = DiscardableSharedMemory.open(fd, nbytes)
        except (ValueError, TypeError, OverflowError):
            assert len(os.listdir("/proc/self/fd")) == before, "a refused open leaked an fd"
            assert (fd, nbytes) not in ((shm.fileno(), shm.nbytes),
                                        (other.fileno(), other.nbytes)), (fd, nbytes)
            return
        assert (fd, nbytes) in ((shm.fileno(), shm.nbytes), (other.fileno(), other.nbytes))
        peer.close()
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(r), os.close(w), os.close(devnull)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    npages = fdp.ConsumeIntInRange(1, 6)
    nbytes = npages * PAGE - fdp.ConsumeIntInRange(0, PAGE - 1)
    shm = DiscardableSharedMemory.create(nbytes)
    other = DiscardableSharedMemory.create(PAGE)
    locked = set(range(npages))  # pages this instance holds
    try:
        for _ in range(fdp.ConsumeIntInRange(1, 30)):
            op = fdp.ConsumeIntInRange(0, 4)
            if op in (0, 1):
                unit = fdp.PickValueInList([PAGE, PAGE, 1, 7])
                offset = pick_int(fdp, -1, npages + 1)
                length = pick_int(fdp, -1, npages + 1)
                offset = offset * unit if isinstance(offset, int) else offset
                length = length * unit if isinstance(length, int) else length
                pages = expected_pages(npages, offset, length)
                if op == 0:
                    got = checked(lambda: shm.lock(offset, length), ERRORS, lambda: state(shm))
                    if pages is None or locked & set(pages):
                        assert got is REJECTED, (offset, length, got)
                    else:
                        assert got is not REJECTED, (offset, length)
                        # this process is the only user: FAILED only right after a purge
                        if got != LockResult.FAILED:
                            locked |= set(pages)
                        else:
                            assert not locked
                else:
                    got = checked(lambda: shm.unlock(offset, length), ERRORS, lambda: state(shm))
                    if pages is None or not set(pages) <= locked:
                        assert got is REJECTED, (offset, length)
                    else:
                        assert got is None
                        locked -= set(pages)
                assert shm.locked_page_count == len(locked)
            elif op == 2:
                purged = shm.purge()
                assert not (purged and locked), "purged while locked"
            elif op == 3:
                fuzz_open(fdp, shm, other)
            elif op == 4:
                bad = fdp.PickValueInList([-5.0, 0, -1, "now"])
                checked(lambda: shm.purge(bad), (ValueError, TypeError), lambda: state(shm))
    finally:
        shm.close()
        other.close()


if __name__ == "__main__":
    main(test_one_input)
