"""SharedCache under SIGKILL: writers, purgers and readers killed at random instants, many times.

Every value is self-describing (its key, a version, its length, key-derived content and a
checksum), so a reader can tell a torn, stale-for-another-key or zeroed value from a good one.
"""
from __future__ import annotations

import hashlib
import os
import random
import signal
import struct
import time
import uuid

import pytest

from discache import PinnedError, SharedCache
from discache.sharedcache import shm_path

PAGE = os.sysconf("SC_PAGE_SIZE")
MAXSIZE = 6 << 20
KEYS = [f"key-{i}" for i in range(48)] + [f"long-key-{i}-" + "x" * 80 for i in range(8)]
SIZES = [0, 1, 100, 4000, PAGE, 9000, 70_000, 300_000]
HEADER = struct.Struct("<QI")
RUN_SECONDS = 12.0  # at least; longer until MIN_KILLS, but never past MAX_SECONDS
MIN_KILLS = 100
MAX_SECONDS = 25.0
CORRUPT = 3  # a worker's exit code when it read a bad value


def make_value(key: str, version: int, size: int) -> bytes:
    """A value that proves its own integrity: header, key-derived body, checksum."""
    seed = hashlib.blake2b(f"{key}:{version}".encode()).digest()
    body = (seed * (size // len(seed) + 1))[:size]
    head = HEADER.pack(version, size)
    return head + body + hashlib.blake2b(head + body + key.encode(), digest_size=16).digest()


def check_value(key: str, value: bytes) -> str:
    """'' when value is one make_value(key, ...) made, else what is wrong."""
    if len(value) < HEADER.size + 16:
        return f"{len(value)} bytes: too short"
    version, size = HEADER.unpack_from(value)
    if len(value) != HEADER.size + size + 16:
        return f"length {len(value)} but the header says {size}"
    if value != make_value(key, version, size):
        return f"content of version {version} ({size} bytes) does not match"
    return ""


def writer(name: str, rng: random.Random, big: bool) -> None:
    cache = SharedCache(name, MAXSIZE, create=False)
    while True:
        key = rng.choice(KEYS)
        roll = rng.random()
        try:
            if roll < 0.08:
                cache.pop(key, None)
            elif roll < 0.10:
                cache.purge(older_than=rng.choice([0.0, 0.01, 0.1]))
            else:
                size = rng.choice([1 << 20, 2 << 20]) if big else rng.choice(SIZES)
                cache[key] = make_value(key, rng.getrandbits(63), size)
        except PinnedError:
            pass  # a reader's view holds the entry: replacing or deleting it is refused


def reader(name: str, rng: random.Random) -> None:
    cache = SharedCache(name, MAXSIZE, create=False, verify=rng.random() < 0.5)
    while True:
        key = rng.choice(KEYS)
        if rng.random() < 0.1:
            try:
                with cache.view(key) as mv:
                    value = bytes(mv)
            except KeyError:
                continue
        else:
            value = cache.get(key)
            if value is None:
                continue
        problem = check_value(key, value)
        if problem:
            os.write(2, f"reader: {key}: {problem}\n".encode())
            os._exit(CORRUPT)


def spawn(name: str, role: str, seed: int) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            rng = random.Random(seed)
            if role == "reader":
                reader(name, rng)
            else:
                writer(name, rng, big=role == "big")
        except BaseException as exc:  # anything but SIGKILL ending a worker is a failure
            os.write(2, f"{role}: {exc!r}\n".encode())
            code = 1
        os._exit(code)
    return pid


def reap(pid: int, role: str, failures: list) -> None:
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return
    failures.append(f"{role} {pid} ended with status {status:#x}")


def usable_within(name: str, seconds: float, maxsize: int = MAXSIZE) -> bool:
    """Can another process set and get within `seconds` (the writer lock is not left taken)?"""
    pid = os.fork()
    if pid == 0:
        try:
            cache = SharedCache(name, maxsize, create=False)
            cache["probe"] = b"probe"
            os._exit(0 if cache["probe"] == b"probe" else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


@pytest.fixture
def name():
    name = f"test-kill-{uuid.uuid4().hex[:10]}"
    yield name
    try:
        SharedCache.unlink(name)
    except FileNotFoundError:
        pass


def test_random_sigkills_lose_nothing_else(name):
    rng = random.Random(int.from_bytes(os.urandom(8), "little"))
    cache = SharedCache(name, MAXSIZE)
    roles = ["writer", "writer", "big", "reader", "reader", "reader"]
    running = {spawn(name, role, rng.getrandbits(64)): role for role in roles}
    failures: list[str] = []
    kills = 0
    start = time.monotonic()
    while not failures and time.monotonic() - start < MAX_SECONDS and (
            time.monotonic() - start < RUN_SECONDS or kills < MIN_KILLS):
        time.sleep(rng.uniform(0.002, 0.04))
        victim = rng.choice(list(running))
        role = running.pop(victim)
        os.kill(victim, signal.SIGKILL)
        kills += 1
        reap(victim, role, failures)
        for pid, other in list(running.items()):  # a worker that ended by itself failed
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                running.pop(pid)
                failures.append(f"{other} {pid} ended with status {status:#x}")
        running[spawn(name, role, rng.getrandbits(64))] = role
        assert usable_within(name, 10) if kills % 50 == 0 else True, "the cache stayed locked"
    for pid, role in running.items():
        os.kill(pid, signal.SIGKILL)
        reap(pid, role, failures)
    assert not failures, (kills, failures)
    assert kills >= MIN_KILLS, f"only {kills} kills in {MAX_SECONDS} s"

    # survivors: never locked, never corrupt, the counts agree with what is there
    assert usable_within(name, 10), f"the cache stayed locked after {kills} kills"
    present = 0
    pages = 0
    for key in KEYS:
        value = cache.get(key)
        if value is not None:
            assert check_value(key, value) == "", (key, check_value(key, value), kills)
            present += 1
            pages += -(-(len(value) + (len(key) if len(key) > 64 else 0)) // PAGE)
    assert cache["probe"] == b"probe"
    # a policy purge (none is idle an hour) also punches every free page: readers that raced a
    # purge may have faulted zero pages back into freed ranges
    assert cache.purge(older_than=3600) == 0
    stats = cache.stats()
    said = f"{kills} kills; {present} entries, {pages} pages found; stats {stats}"
    assert stats["entries"] == present + 1, said
    assert stats["allocated_bytes"] == (pages + 1) * PAGE, said
    # a big set killed half-way happened (the repair ran) and its pages were punched again
    assert stats["recoveries"] >= 1, said
    metadata = stats["file_bytes"] - stats["data_pages"] * PAGE
    held = os.stat(shm_path(name)).st_blocks * 512
    assert held <= metadata + stats["allocated_bytes"], (held, said)
    print(f"{kills} kills in {time.monotonic() - start:.1f} s, {stats['recoveries']} repairs, "
          f"{present} entries checked")
    cache["after"] = make_value("after", 1, 5000)
    assert check_value("after", cache["after"]) == ""
    cache.close()


F_OFD_GETLK = 36


def writer_lock_held(path: str) -> bool:
    """Does some open file description hold the cache's writer lock (byte 0) now?"""
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        return struct.unpack("hhqqi4x", fcntl.fcntl(fd, F_OFD_GETLK, query))[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def test_a_writer_killed_inside_its_critical_section(name):
    """SIGKILL a writer while it holds the lock (copying 32 MiB into the cache): the next
    process repairs the index; every other entry and the killed key's old value are intact."""
    cache = SharedCache(name, 80 << 20)
    for key in KEYS[:20]:
        cache[key] = make_value(key, 1, 5000)
    cache["big"] = make_value("big", 1, 32 << 20)
    path = shm_path(name)
    repaired = 0
    for attempt in range(20):
        pid = os.fork()
        if pid == 0:
            child = SharedCache(name, 80 << 20, create=False)
            value = make_value("big", 2 + attempt, 32 << 20)
            while True:
                child["big"] = value
        deadline = time.monotonic() + 10
        while not writer_lock_held(path) and time.monotonic() < deadline:
            time.sleep(0.0005)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert usable_within(name, 10, 80 << 20), "the dead writer left the cache locked"
        repaired = cache.stats()["recoveries"]
        if repaired:
            break
    assert repaired >= 1, "no kill landed inside a critical section in 20 attempts"
    for key in KEYS[:20]:
        assert cache[key] == make_value(key, 1, 5000)
    big = cache.get("big")  # the old value, a new one whole, or gone: never a torn one
    assert big is None or check_value("big", big) == ""
    stats = cache.stats()
    held = os.stat(path).st_blocks * 512
    assert held == stats["file_bytes"] - stats["data_pages"] * PAGE + stats["allocated_bytes"]
    cache.close()
