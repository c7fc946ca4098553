"""One of the processes of test_stress_shared.py: locks, unlocks and purges shared segments at
random for a bounded time, checking the invariants on every step; prints its counts as JSON."""
from __future__ import annotations

import json
import mmap
import random
import socket
import struct
import sys
import time
from collections import Counter

import discache
from discache import LockResult

PAGE = discache._core.page_size()
LEDGER_SLOT = 16  # per segment: the stamp its pages carry, written by the lock holder
STATE_LOCKED = 1


class InvariantError(AssertionError):
    """An invariant of shared discardable memory was broken."""


def stamp(worker: int, epoch: int, segment: int, npages: int) -> bytes:
    """The contents a worker writes while it holds a segment: says who, when, which page."""
    pages = []
    for page in range(npages):
        word = struct.pack("<BBHI", worker + 1, segment + 1, page + 1, epoch)
        pages.append(word * (PAGE // len(word)))
    return b"".join(pages)


class Worker:
    """Drives every segment from this process."""

    def __init__(self, worker: int, segments: list, ledger: mmap.mmap, started_us: int,
                 seed: int) -> None:
        self.worker = worker
        self.segments = segments
        self.ledger = ledger
        self.started_us = started_us
        self.random = random.Random(seed)
        self.held: dict[int, bytes] = {}  # segment -> the contents written under our lock
        self.epoch = 0
        self.counts: Counter = Counter()

    def fail(self, message: str) -> None:
        raise InvariantError(f"worker {self.worker}: {message}")

    def check_state(self, index: int, *, held: bool) -> int:
        """The state word, read atomically, decodes to a lock bit and a plausible time."""
        state = self.segments[index]._state_word()
        self.counts["state_reads"] += 1
        now_us = time.time_ns() // 1000
        if state & STATE_LOCKED:
            if state != STATE_LOCKED:
                self.fail(f"segment {index}: torn state {state:#x} (locked with a timestamp)")
        elif state and not self.started_us <= state >> 1 <= now_us + 1_000_000:
            self.fail(f"segment {index}: torn state {state:#x} (timestamp {state >> 1} outside "
                      f"[{self.started_us}, {now_us}])")
        if held and state != STATE_LOCKED:
            self.fail(f"segment {index}: state {state:#x} while this process holds the lock "
                      "(a purge or unlock happened under a lock)")
        return state

    def contents(self, index: int) -> bytes:
        with self.segments[index].data as view:
            return bytes(view)

    def take(self, index: int) -> None:
        shm = self.segments[index]
        result = shm.lock()
        self.counts["locks"] += 1
        self.counts[f"lock_{result.name}"] += 1
        if result == LockResult.FAILED:
            if shm.locked_page_count:
                self.fail(f"segment {index}: FAILED lock left pages locked")
            self.check_state(index, held=False)
            return
        self.check_state(index, held=True)
        found = self.contents(index)
        if result == LockResult.PURGED:
            if found != bytes(len(found)):
                self.fail(f"segment {index}: lock said PURGED but the pages are not zeros")
        else:
            slot = self.ledger[index * LEDGER_SLOT:(index + 1) * LEDGER_SLOT]
            writer, segment, epoch = struct.unpack("<QII", slot)
            expected = stamp(writer - 1, epoch, segment - 1, shm.npages)
            if found != expected:
                zeroed = sum(found[p * PAGE:(p + 1) * PAGE] == bytes(PAGE)
                             for p in range(shm.npages))
                self.fail(f"segment {index}: lock said SUCCESS but the pages are not what "
                          f"worker {writer - 1} wrote at epoch {epoch} ({zeroed} pages zeroed)")
        self.epoch += 1
        written = stamp(self.worker, self.epoch, index, shm.npages)
        with shm.data as view:
            view[:] = written
        self.ledger[index * LEDGER_SLOT:(index + 1) * LEDGER_SLOT] = struct.pack(
            "<QII", self.worker + 1, index + 1, self.epoch)
        self.held[index] = written
        # Now and then give part of the lock back and take it again: the shared bit must stay.
        if shm.npages > 1 and self.random.random() < 0.2:
            shm.unlock(PAGE, PAGE)
            if shm.lock(PAGE, PAGE) != LockResult.SUCCESS:
                self.fail(f"segment {index}: relocking a page under our own lock failed")
            self.counts["partial_relocks"] += 1

    def give_back(self, index: int) -> None:
        shm = self.segments[index]
        self.check_state(index, held=True)
        if self.contents(index) != self.held[index]:
            self.fail(f"segment {index}: our pages changed while we held the lock")
        shm.unlock()
        del self.held[index]
        self.counts["unlocks"] += 1

    def purge(self, index: int) -> None:
        shm = self.segments[index]
        fresh = shm.last_known_usage is not None
        purged = shm.purge()
        self.counts["purges"] += 1
        if purged:
            # A purge from a known unlock time is a real transition to "purged"; from a null
            # time it purges a segment already purged (Chromium's semantics).
            self.counts["purges_done" if fresh else "purges_repeated"] += 1
        else:
            self.counts["purges_refused"] += 1
        self.check_state(index, held=False)

    def step(self) -> None:
        index = self.random.randrange(len(self.segments))
        self.counts["operations"] += 1
        if index in self.held:
            if self.random.random() < 0.6:
                self.give_back(index)
            else:
                self.check_state(index, held=True)
            return
        roll = self.random.random()
        if roll < 0.5:
            self.take(index)
        elif roll < 0.85:
            self.purge(index)
        else:
            self.check_state(index, held=False)

    def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(64):
                self.step()
        for index in list(self.held):
            self.give_back(index)


def main() -> None:
    worker, nsegments, nbytes, seconds, started_us, seed = (
        int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]),
        int(sys.argv[6]), int(sys.argv[7]))
    channel = socket.socket(fileno=int(sys.argv[1]))
    _, fds, _, _ = socket.recv_fds(channel, 16, nsegments + 1)
    segments = [discache.DiscardableSharedMemory.open(fd, nbytes) for fd in fds[:nsegments]]
    ledger = mmap.mmap(fds[nsegments], nsegments * LEDGER_SLOT)
    channel.sendall(b"ready\n")
    assert channel.recv(3) == b"go\n"
    runner = Worker(worker, segments, ledger, started_us, seed)
    error = None
    try:
        runner.run(seconds)
    except Exception as failure:  # reported to the test, which fails on it
        error = f"{type(failure).__name__}: {failure}"
    channel.sendall((json.dumps({"counts": runner.counts, "error": error}) + "\n").encode())
    for shm in segments:
        shm.close()


if __name__ == "__main__":
    main()
