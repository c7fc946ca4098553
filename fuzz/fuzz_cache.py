#!/usr/bin/env python3
"""Fuzz DiscardableCache: values of every type, pins, sweeps and reclaim; never a wrong value."""
from __future__ import annotations

import array

from _harness import atheris, checked, main, REJECTED

with atheris.instrument_imports():
    from discache import DiscardableCache, DiscardableMemoryManager, PinnedError, force_reclaim

BACKENDS = ["madvfree", "memfd", "simulated"]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    backend = fdp.PickValueInList(BACKENDS)
    manager = DiscardableMemoryManager(1 << 20, backend)
    evicted: list = []
    cache = DiscardableCache(fdp.ConsumeIntInRange(0, 40000), backend, manager=manager,
                             idle_unlock=fdp.PickValueInList([None, 0, 0.001]),
                             on_evict=lambda key, reason: evicted.append((key, reason)))
    model: dict = {}  # key -> bytes the cache may hold
    pins: dict = {}

    def picture():
        return sorted(map(repr, cache)), cache.currsize, {k: v for k, v in pins.items() if v}

    try:
        for _ in range(fdp.ConsumeIntInRange(1, 40)):
            op = fdp.ConsumeIntInRange(0, 6)
            key = fdp.ConsumeIntInRange(0, 6)
            if op == 0:
                kind = fdp.ConsumeIntInRange(0, 7)
                raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 9000))
                value = [raw, bytearray(raw), memoryview(raw), array.array("B", raw),
                         raw.decode("latin-1"), len(raw), None, [1, 2]][kind]
                got = checked(lambda: cache.__setitem__(key, value),
                              (TypeError, ValueError, PinnedError), picture)
                if got is REJECTED:
                    # pinned entries never push currsize past maxsize: a value that does not fit
                    # beside the other pinned ones is refused
                    pinned = sum(len(model[k]) for k, n in pins.items() if n and k != key)
                    assert kind >= 4 or len(raw) > cache.maxsize - pinned or pins.get(key), \
                        (kind, len(raw), pinned)
                else:
                    assert kind < 4, kind
                    model[key] = bytes(raw)
                    pins[key] = 0
            elif op == 1:
                got = cache.get(key)
                if got is not None:
                    assert key in model and got == model[key], "a wrong value was returned"
                elif key in model and key not in cache:
                    model.pop(key)
                    pins.pop(key, None)
            elif op == 2 and key in cache:
                try:
                    cache.pin(key)
                    pins[key] += 1
                except KeyError:
                    pass  # purged: reported through on_evict
            elif op == 3:
                got = checked(lambda: cache.unpin(key), (KeyError, ValueError), picture)
                if got is REJECTED:
                    assert not pins.get(key) or key not in cache
                else:
                    pins[key] -= 1
            elif op == 4:
                cache.sweep(idle=0)
                if fdp.ConsumeBool():
                    force_reclaim(cache)
            elif op == 5 and key in cache:
                got = checked(lambda: cache.__delitem__(key), (KeyError, PinnedError), picture)
                if got is REJECTED:
                    assert pins.get(key) or key not in cache
                else:
                    model.pop(key, None)
                    pins.pop(key, None)
            elif op == 6:
                try:
                    with cache.view(key) as view:
                        assert bytes(view) == model[key], "a wrong view"
                except KeyError:
                    pass
            for key in list(model):
                if key not in cache:
                    model.pop(key)
                    pins.pop(key, None)
            # pinned entries are never purged nor evicted
            for key, n in pins.items():
                if n:
                    assert key in cache, "a pinned entry was dropped"
            assert cache.currsize <= cache.maxsize or any(pins.values())
        for key, reason in evicted:
            assert reason in ("size", "purged", "explicit")
    finally:
        cache.close()
        manager.stop()
    assert manager.segment_count == 0


if __name__ == "__main__":
    main(test_one_input)
