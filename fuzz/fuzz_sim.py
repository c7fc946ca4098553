#!/usr/bin/env python3
"""Fuzz discache.sim: one operation sequence on a 'token' and a 'walk' kernel must give the same
outcomes, and what process 1 observes of its first mapping must obey the volatile-ranges rules."""
from __future__ import annotations

from _harness import atheris, main

with atheris.instrument_imports():
    from discache import PurgedPageError
    from discache.sim import (MADV_DONTNEED, MADV_FREE, MADV_NONVOLATILE, MADV_VOLATILE,
                              MADV_VOLATILE_ZEROFILL, SimulatedKernel)

PS = 256
NPAGES = 8  # process 1's watched mapping
ZEROS = bytes(8)
ADVICE = (MADV_VOLATILE, MADV_NONVOLATILE, MADV_VOLATILE_ZEROFILL, MADV_FREE, MADV_DONTNEED, 7,
          -1)
COST_KEYS = {"pte_visits", "record_visits", "bookkeeping_bytes"}


def outcome(fn):
    """A call's result, or its exception reduced to what a caller can observe."""
    try:
        return ("ok", fn())
    except PurgedPageError as e:
        return ("sigbus", e.address)
    except OSError as e:
        return ("oserror", e.errno)
    except MemoryError:
        return ("nomem",)
    except (TypeError, ValueError) as e:
        return (type(e).__name__,)


class World:
    """Two kernels driven alike, and the oracle of process 1's watched mapping."""

    def __init__(self, ram: int, swap: int) -> None:
        self.kernels = [SimulatedKernel(ram_pages=ram, swap_pages=swap, page_size=PS,
                                        strategy=s, va_pages=128) for s in ("token", "walk")]
        for k in self.kernels:
            k.spawn()
        self.watched = self.both(lambda k: k.processes[1].mmap(NPAGES * PS))[1]
        self.maps = [(1, self.watched, NPAGES)]
        self.fds: list[tuple[int, int]] = []
        self.content = [ZEROS] * NPAGES
        self.mode: list = [None] * NPAGES  # None (locked), "sigbus" or "zero"
        self.seen_lost = [False] * NPAGES
        self.maybe_zero = [False] * NPAGES
        self.stamp = 0

    def both(self, fn):
        results = [outcome(lambda k=k: fn(k)) for k in self.kernels]
        assert results[0] == results[1], results
        return results[0]

    def proc(self, k, i):
        procs = k.processes
        return procs[sorted(procs)[i % len(procs)]]

    def check_same_picture(self) -> None:
        views = []
        for k in self.kernels:
            stats = {key: v for key, v in k.stats().items() if key not in COST_KEYS}
            procs = [(p.pid, p.volatile_pages(), [(m.start, m.end) for m in p.mappings])
                     for p in k.processes.values()]
            views.append((stats, k.volatile_pages(), procs, k.core.resident()))
        assert views[0] == views[1], views

    # -------------------------------------------------- the oracle of the watched mapping

    def observe(self, page: int, result) -> None:
        if result[0] == "sigbus":
            assert self.mode[page] == "sigbus", f"SIGBUS on a {self.mode[page]} page {page}"
            self.seen_lost[page] = True
            self.content[page] = ZEROS
            return
        if result[0] != "ok":
            return
        content = result[1]
        if content == self.content[page]:
            self.maybe_zero[page] = False
            return
        if self.maybe_zero[page] and content == ZEROS:
            self.content[page], self.maybe_zero[page] = ZEROS, False
            return
        assert self.mode[page] is not None, f"locked page {page} lost its data"
        assert content == ZEROS and self.mode[page] == "zero", (page, content, self.mode[page])
        self.seen_lost[page] = True
        self.content[page] = ZEROS

    def write_watched(self, page: int) -> None:
        self.stamp += 1
        data = self.stamp.to_bytes(8, "little")
        fills = self.kernels[0].stats()["zero_fills"]
        r = self.both(lambda k: k.processes[1].write(self.watched + page * PS, data))
        if r[0] == "sigbus":
            self.observe(page, r)
        elif r[0] == "ok":
            if self.kernels[0].stats()["zero_fills"] > fills:
                assert self.mode[page] == "zero"
                self.seen_lost[page] = True
            self.content[page] = data
            self.maybe_zero[page] = False

    def read_watched(self, page: int) -> None:
        self.observe(page, self.both(lambda k: k.processes[1].read(self.watched + page * PS, 8)))

    def advise_watched(self, first: int, count: int, advice: int) -> None:
        r = self.both(lambda k: k.processes[1].madvise(self.watched + first * PS, count * PS,
                                                        advice))
        if r[0] != "ok":
            return
        pages = range(first, first + count)
        if advice in (MADV_VOLATILE, MADV_VOLATILE_ZEROFILL):
            for q in pages:
                if self.mode[q] is None:
                    self.seen_lost[q] = False
                self.mode[q] = "zero" if advice == MADV_VOLATILE_ZEROFILL else "sigbus"
        elif advice == MADV_NONVOLATILE:
            if any(self.seen_lost[q] and self.mode[q] is not None for q in pages):
                assert r[1] == 1, "a loss the program saw was not reported"
            for q in pages:
                if r[1] and self.mode[q] is not None:
                    self.maybe_zero[q] = True  # may read zeros once: reported
                self.mode[q] = None
                self.seen_lost[q] = False


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    w = World(ram=fdp.PickValueInList([6, 10, 24]), swap=fdp.PickValueInList([0, 0, 8]))
    for _ in range(fdp.ConsumeIntInRange(1, 40)):
        op = fdp.ConsumeIntInRange(0, 12)
        i = fdp.ConsumeIntInRange(0, 7)
        if op == 0:
            w.write_watched(fdp.ConsumeIntInRange(0, NPAGES - 1))
        elif op == 1:
            w.read_watched(fdp.ConsumeIntInRange(0, NPAGES - 1))
        elif op == 2:
            first = fdp.ConsumeIntInRange(0, NPAGES - 1)
            count = fdp.ConsumeIntInRange(1, NPAGES - first)
            w.advise_watched(first, count, fdp.PickValueInList(
                [MADV_VOLATILE, MADV_NONVOLATILE, MADV_VOLATILE_ZEROFILL]))
        elif op == 3:
            n = fdp.ConsumeIntInRange(0, 12)
            r = w.both(lambda k: k.reclaim(n))
            assert r[0] == "ok" and 0 <= r[1] <= n, r
        elif op == 4 and len(w.kernels[0].processes) < 4:
            w.both(lambda k: w.proc(k, i).fork().pid)
        elif op == 5:
            npages = fdp.ConsumeIntInRange(-1, 6)
            r = w.both(lambda k: (w.proc(k, i).pid, w.proc(k, i).mmap(npages * PS)))
            if r[0] == "ok":
                w.maps.append((r[1][0], r[1][1], npages))
        elif op == 6 and len(w.fds) < 3:
            npages = fdp.ConsumeIntInRange(-1, 6)
            r = w.both(lambda k: k.memfd_create(npages * PS))
            if r[0] == "ok":
                w.fds.append((r[1], npages))
        elif op == 7:
            fd = w.fds[i % len(w.fds)][0] if w.fds and i < 6 else fdp.ConsumeIntInRange(-2, 99)
            off, npages = fdp.ConsumeIntInRange(-1, 6), fdp.ConsumeIntInRange(1, 7)
            r = w.both(lambda k: (w.proc(k, i).pid,
                                  w.proc(k, i).mmap(npages * PS, fd=fd, offset=off * PS)))
            if r[0] == "ok":
                w.maps.append((r[1][0], r[1][1], npages))
        elif op == 8 and w.fds:
            fd, _ = w.fds.pop(i % len(w.fds))
            w.both(lambda k: k.close(fd))
        elif op in (9, 10, 11):
            # any process, any mapping (process 1's watched one only from other processes or
            # with calls that keep its data: the oracle follows process 1's own calls)
            pid, addr, npages = w.maps[fdp.ConsumeIntInRange(0, len(w.maps) - 1)]
            page = fdp.ConsumeIntInRange(-1, max(npages, 1))
            proc = (lambda k: w.proc(k, i))
            if pid in w.kernels[0].processes and fdp.ConsumeBool():
                proc = (lambda k, pid=pid: k.processes[pid])
            actor = proc(w.kernels[0]).pid

            def spares_watched(start: int, length: int) -> bool:
                """Process 1's calls reaching its watched pages go through the oracle's ops."""
                end = w.watched + NPAGES * PS
                return actor != 1 or start + max(length, 1) <= w.watched or start >= end

            if op == 9:
                advice = fdp.PickValueInList(list(ADVICE))
                count = fdp.ConsumeIntInRange(0, 8)
                start = addr + page * PS + fdp.PickValueInList([0, 0, 1, PS - 1])
                if spares_watched(start, count * PS):
                    w.both(lambda k: proc(k).madvise(start, count * PS, advice))
            elif op == 10:
                payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
                start = addr + page * PS + 3
                if spares_watched(start, len(payload)):
                    w.both(lambda k: proc(k).write(start, payload))
            else:
                n = fdp.PickValueInList([0, 1, 10, PS, 3 * PS, -1])
                w.both(lambda k: proc(k).read(addr + page * PS, n))
        elif op == 12 and len(w.kernels[0].processes) > 1:
            victim = w.proc(w.kernels[0], i).pid
            if victim != 1:
                w.both(lambda k: k.processes[victim].exit())
        w.check_same_picture()


if __name__ == "__main__":
    main(test_one_input)
