"""Cross-process stress: four processes lock, unlock and purge shared segments at random."""
from __future__ import annotations

import json
import mmap
import os
import socket
import struct
import subprocess
import sys
import time
from collections import Counter

import pytest

import discache
from discache import LockResult, _core

from stress import report, seconds
from stress_shared_worker import LEDGER_SLOT, STATE_LOCKED, stamp

PAGE = _core.page_size()
PROCESSES = 4
SEGMENTS = 3
NPAGES = 4
DURATION_S = seconds(15.0)
WORKER = os.path.join(os.path.dirname(__file__), "stress_shared_worker.py")
PARENT = 9  # the id the creating process stamps its first contents with

pytestmark = pytest.mark.skipif(not _core.probe_memfd()[0], reason=_core.probe_memfd()[1])


def start_worker(worker: int, fds: list[int], started_us: int) -> tuple:
    ours, theirs = socket.socketpair()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.getcwd(), os.path.dirname(__file__)]))
    process = subprocess.Popen(
        [sys.executable, WORKER, str(theirs.fileno()), str(worker), str(SEGMENTS),
         str(NPAGES * PAGE), str(DURATION_S), str(started_us), str(1000 + worker)],
        pass_fds=[theirs.fileno()], env=env)
    theirs.close()
    socket.send_fds(ours, [b"x"], fds)
    ours.settimeout(DURATION_S + 60)  # a hung worker fails the test instead of blocking it
    replies = ours.makefile("r")
    assert replies.readline() == "ready\n"
    return process, ours, replies


def test_four_processes_lock_unlock_and_purge_at_random():
    started_us = time.time_ns() // 1000
    segments = [discache.DiscardableSharedMemory.create(NPAGES * PAGE) for _ in range(SEGMENTS)]
    ledger_fd = os.memfd_create("discache-stress-ledger")
    os.ftruncate(ledger_fd, SEGMENTS * LEDGER_SLOT)
    ledger = mmap.mmap(ledger_fd, SEGMENTS * LEDGER_SLOT)
    for index, shm in enumerate(segments):
        with shm.data as view:
            view[:] = stamp(PARENT, 0, index, NPAGES)
        ledger[index * LEDGER_SLOT:(index + 1) * LEDGER_SLOT] = struct.pack("<QII", PARENT + 1,
                                                                            index + 1, 0)
        shm.unlock()
    fds = [shm.fileno() for shm in segments] + [ledger_fd]
    workers = [start_worker(worker, fds, started_us) for worker in range(PROCESSES)]
    try:
        for _, channel, _ in workers:
            channel.sendall(b"go\n")
        lines = [replies.readline() for _, _, replies in workers]
        for (process, _, _), line in zip(workers, lines):
            assert line, f"a worker died without reporting (exit status {process.wait(10)})"
        results = [json.loads(line) for line in lines]
        for process, _, _ in workers:
            assert process.wait(timeout=60) == 0
    finally:
        for process, channel, _ in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
            channel.close()
    errors = [result["error"] for result in results if result["error"]]
    assert not errors, errors
    totals = sum((Counter(result["counts"]) for result in results), Counter())
    assert all(result["counts"]["operations"] > 1000 for result in results), results

    # Every real purge is seen by exactly one lock as PURGED, or is still there at the end.
    still_purged = 0
    for index, shm in enumerate(segments):
        state = shm._state_word()
        assert not state & STATE_LOCKED, f"segment {index} left locked"
        if state == 0:
            still_purged += 1
            assert shm.lock() in (LockResult.FAILED, LockResult.PURGED)
        shm.close()
    assert totals["purges_done"] == totals["lock_PURGED"] + still_purged, totals
    for kind in ("lock_SUCCESS", "lock_PURGED", "lock_FAILED", "purges_done", "purges_refused"):
        assert totals[kind] > 0, f"the run never saw {kind}: {totals}"
    ledger.close()
    os.close(ledger_fd)
    report("shared", {"processes": PROCESSES, "segments": SEGMENTS, "pages": NPAGES,
                      "seconds": DURATION_S, **dict(sorted(totals.items()))})
