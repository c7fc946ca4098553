#!/usr/bin/env python3
"""Fuzz discache.allocate and DiscardableMemory on every backend: sizes, offsets, lock sequences."""
from __future__ import annotations

from _harness import atheris, checked, is_int, main, pick_int, REJECTED

with atheris.instrument_imports():
    import discache
    from discache import PurgedPageError

BACKENDS = ("madvfree", "madvfree-sigbus", "memfd", "simulated")
ERRORS = (ValueError, IndexError, TypeError, OverflowError, RuntimeError, BufferError)


def allocate(fdp, backend):
    size = fdp.ConsumeIntInRange(1, 3 * 4096 + 5)
    if fdp.ConsumeIntInRange(0, 9) == 0:  # bad sizes only: a valid huge one would be slow
        size = fdp.PickValueInList([0, -1, -(1 << 64), 1 << 50, 1 << 64, True, 2.0, "8", None])
    try:
        mem = discache.allocate(size, backend)
    except (ValueError, TypeError, OverflowError):
        assert not (is_int(size) and 1 <= size <= 1 << 30), size
        return None
    assert (is_int(size) or size is True) and size >= 1, size  # True is index 1, as in range()
    return mem


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    backend = fdp.PickValueInList(list(BACKENDS))
    mem = allocate(fdp, backend)
    if mem is None:
        return
    content = bytearray(mem.nbytes)  # what the memory holds unless a lock reports a purge

    def snapshot():
        state = (mem.closed, mem.is_locked)
        if mem.is_locked and not mem.closed:
            state += (mem.read(),)
        return state

    try:
        for _ in range(fdp.ConsumeIntInRange(1, 30)):
            op = fdp.ConsumeIntInRange(0, 8)
            offset = pick_int(fdp, -2, mem.nbytes + 2)
            if op == 0:
                size = pick_int(fdp, -2, mem.nbytes + 2)
                got = checked(lambda: mem.read(offset, size), ERRORS + (PurgedPageError,),
                              snapshot)
                if got is not REJECTED and mem.is_locked:
                    end = mem.nbytes if size < 0 else offset + size
                    assert got == bytes(content[offset:end]), (offset, size)
            elif op == 1:
                buf = bytearray(fdp.ConsumeIntInRange(0, mem.nbytes + 3))
                got = checked(lambda: mem.readinto(buf, offset), ERRORS + (PurgedPageError,),
                              snapshot)
                if got is not REJECTED and mem.is_locked:
                    assert bytes(buf[:got]) == bytes(content[offset:offset + got])
            elif op == 2:
                payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, mem.nbytes + 3))
                source = payload if fdp.ConsumeBool() else memoryview(payload)
                got = checked(lambda: mem.write(source, offset), ERRORS + (PurgedPageError,),
                              snapshot)
                if got is not REJECTED:  # SIGBUS mode writes unlocked memory too
                    assert got == len(payload)
                    content[offset:offset + got] = payload
            elif op == 3:
                was_locked = mem.is_locked
                got = checked(mem.lock, (RuntimeError, ValueError), snapshot)
                assert (got is REJECTED) == (was_locked or mem.closed), (got, was_locked)
                if got is not REJECTED:
                    assert got in (True, False)
                    if got:
                        assert mem.read() == bytes(content), (backend, "lost while reported intact")
                    else:
                        content[:] = mem.read()
            elif op == 4:
                was_locked = mem.is_locked
                got = checked(mem.unlock, (RuntimeError, ValueError), snapshot)
                assert (got is REJECTED) == (not was_locked or mem.closed)
            elif op == 5:
                if not mem.closed:
                    discache.force_reclaim(mem)
            elif op == 6:
                got = checked(lambda: mem.data, (RuntimeError, ValueError), snapshot)
                if got is not REJECTED:
                    assert got.nbytes == mem.nbytes
                    got.release()
            elif op == 7:
                bad = fdp.PickValueInList([None, 5, "abc", [1, 2], object()])
                checked(lambda: mem.write(bad, offset), ERRORS, snapshot)
                checked(lambda: mem.readinto(bad, 0), ERRORS, snapshot)
                checked(lambda: mem.readinto(b"immutable", 0), ERRORS, snapshot)
            elif op == 8 and fdp.ConsumeIntInRange(0, 3) == 0:
                mem.close()
                mem.close()
                assert mem.closed
    finally:
        mem.close()


if __name__ == "__main__":
    main(test_one_input)
