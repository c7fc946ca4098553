#!/usr/bin/env python3
"""Fuzz DiscardableMemoryManager.allocate and its allocations: sizes, limits, lock sequences."""
from __future__ import annotations

from _harness import atheris, checked, is_int, main, REJECTED

with atheris.instrument_imports():
    from discache import DiscardableMemoryManager
    from discache.manager import PAGE

BACKENDS = ["madvfree", "memfd", "simulated"]
ERRORS = (ValueError, TypeError, OverflowError, RuntimeError, MemoryError)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    limit = fdp.ConsumeIntInRange(1, 16) * PAGE
    manager = DiscardableMemoryManager(limit, fdp.PickValueInList(BACKENDS),
                                       segment_bytes=fdp.ConsumeIntInRange(1, 8) * PAGE)
    live: list = []  # (mem, content, reported intact since last write)

    def picture():
        return manager.stats(), [(m.closed, m.is_locked) for m, _ in live]

    try:
        for _ in range(fdp.ConsumeIntInRange(1, 30)):
            op = fdp.ConsumeIntInRange(0, 5)
            if op == 0:
                nbytes = fdp.PickValueInList([fdp.ConsumeIntInRange(1, 3 * PAGE), 0, -1,
                                              limit + 1, 1 << 64, 1.0, "1", None, True])
                got = checked(lambda: manager.allocate(nbytes), ERRORS, picture)
                valid = is_int(nbytes) and 1 <= nbytes <= limit
                assert (got is not REJECTED) == valid, nbytes
                if valid:
                    content = fdp.ConsumeBytes(nbytes).ljust(nbytes, b"\x01")
                    got.write(content)
                    live.append((got, content))
            elif live:
                k = fdp.ConsumeIntInRange(0, len(live) - 1)
                mem, content = live[k]
                if op == 1:
                    was = mem.is_locked
                    got = checked(mem.lock, ERRORS, picture)
                    assert (got is REJECTED) == (was or mem.closed)
                    if got is True:
                        assert mem.read() == content, "reported intact, data changed"
                    elif got is False:
                        live[k] = (mem, mem.read())
                elif op == 2:
                    was = mem.is_locked
                    got = checked(mem.unlock, ERRORS, picture)
                    assert (got is REJECTED) == (not was or mem.closed)
                elif op == 3:
                    mem.close()
                    mem.close()
                    live.pop(k)
                elif op == 4:
                    offset = fdp.ConsumeIntInRange(-2, mem.nbytes + 2)
                    size = fdp.ConsumeIntInRange(-2, mem.nbytes + 2)
                    got = checked(lambda: mem.read(offset, size), ERRORS, picture)
                    if got is not REJECTED:
                        assert mem.is_locked
                        assert got == content[offset:mem.nbytes if size < 0 else offset + size]
                elif op == 5:
                    level = fdp.PickValueInList(["moderate", "critical", "low", None])
                    got = checked(lambda: manager.on_memory_pressure(level), (ValueError,),
                                  picture)
                    assert (got is REJECTED) == (level not in ("moderate", "critical"))
            locked = sum(m.npages for m, _ in live if m.is_locked) * PAGE
            assert manager.bytes_locked == locked
            assert manager.bytes_allocated == sum(m.npages for m, _ in live) * PAGE
            assert manager.bytes_resident <= max(limit, locked)
    finally:
        for mem, _ in live:
            mem.close()
        assert manager.segment_count == 0 and manager.bytes_allocated == 0


if __name__ == "__main__":
    main(test_one_input)
