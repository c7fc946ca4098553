"""Replay a workload (built-in or a trace file) on the simulated kernel under one design."""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, TextIO

from ..errors import PurgedPageError
from .kernel import (
    MADV_DONTNEED,
    MADV_FREE,
    MADV_NONVOLATILE,
    MADV_PAGEOUT,
    MADV_VOLATILE,
    MADV_VOLATILE_ZEROFILL,
    SimulatedKernel,
)

Op = tuple


@dataclass(frozen=True)
class Design:
    """One way of making idle memory discardable."""

    name: str
    strategy: str
    advice: int
    summary: str


DESIGNS = {
    d.name: d
    for d in (
        Design("walk+sigbus", "walk", MADV_VOLATILE, "v14: unmark walks every page entry"),
        Design("token+sigbus", "token", MADV_VOLATILE, "generation tokens: O(1) unmark"),
        Design("token+zerofill", "token", MADV_VOLATILE_ZEROFILL, "tokens, ashmem-like zero-fill"),
        Design("madv_free", "token", MADV_FREE, "MADV_FREE + cookie check on lock (Chromium)"),
    )
}

# Operations of a trace: name -> argument names; PAGES/FIRST/COUNT/N are integers (pages).
TRACE_OPS = {
    "spawn": ("proc",),
    "fork": ("parent", "child"),
    "exit": ("proc",),
    "mmap": ("proc", "region", "pages"),
    "memfd": ("file", "pages"),
    "mmapfd": ("proc", "region", "file", "pages", "offset"),
    "munmap": ("proc", "region"),
    "write": ("proc", "region", "first", "count"),
    "read": ("proc", "region", "first", "count"),
    "unlock": ("proc", "region", "first", "count"),
    "lock": ("proc", "region", "first", "count", "lost"),
    "dontneed": ("proc", "region", "first", "count"),
    "reclaim": ("pages",),
    # Recorded traces (discache.record_trace): the real run's forced reclaims, policy purges
    # and the kernel's own purges, placed where the library found them.
    "pageout": ("proc", "region", "first", "count", "gone"),
    "purge": ("proc", "region", "first", "count"),
    "lost": ("proc", "region", "first", "count"),
}
INT_ARGS = {"pages", "first", "count", "offset", "lost", "gone"}
# Trailing arguments that may be left out, and their value then (None: not recorded).
OPTIONAL = {"mmapfd": "0", "lock": None, "pageout": None}


class TraceError(ValueError):
    """A trace file line that cannot be understood; the message names the line."""


def parse_trace(lines: Iterable[str], source: str = "trace") -> Iterator[Op]:
    """Operations of a trace file: one per line, `#` starts a comment (see docs/sim.md)."""
    for lineno, raw in enumerate(lines, 1):
        words = shlex.split(raw, comments=True)
        if not words:
            continue
        name, args = words[0], words[1:]
        spec = TRACE_OPS.get(name)
        if spec is None:
            raise TraceError(f"{source}:{lineno}: unknown operation {name!r}")
        if name in OPTIONAL and len(args) == len(spec) - 1:
            args.append(OPTIONAL[name])
        if len(args) != len(spec):
            raise TraceError(f"{source}:{lineno}: {name} takes {len(spec)} arguments "
                             f"({' '.join(spec)}), got {len(args)}")
        values: list[object] = [name]
        for arg_name, arg in zip(spec, args):
            if arg is None:
                values.append(None)
            elif arg_name in INT_ARGS:
                try:
                    value = int(arg)
                except ValueError:
                    raise TraceError(f"{source}:{lineno}: {arg_name} must be an integer, "
                                     f"got {arg!r}") from None
                if value < 0 or (value == 0 and arg_name in ("pages", "count")
                                 and name != "reclaim"):
                    raise TraceError(f"{source}:{lineno}: {arg_name} must be positive, got {value}")
                values.append(value)
            else:
                values.append(arg)
        yield tuple(values)


def read_trace(stream: TextIO, source: str = "trace") -> list[Op]:
    """All operations of a trace file, checked before anything runs."""
    return list(parse_trace(stream, source))


@dataclass
class Result:
    """What one design did with one workload."""

    design: str
    unmark_calls: int = 0
    unmark_visits: int = 0
    unmark_ns: int = 0
    mark_calls: int = 0
    mark_visits: int = 0
    mark_ns: int = 0
    purged_locks: int = 0
    zero_reads: int = 0
    recorded_locks: int = 0  # locks whose real outcome the trace recorded
    recorded_purged_locks: int = 0  # of them, those that found a purge on the real kernel
    wall_s: float = 0.0
    stats: dict = field(default_factory=dict)

    def row(self) -> dict:
        """The numbers of the summary table."""
        s = self.stats
        return {
            "design": self.design,
            "unmark visits/call": self.unmark_visits / max(self.unmark_calls, 1),
            "unmark us/call": self.unmark_ns / 1000 / max(self.unmark_calls, 1),
            "mark visits/call": self.mark_visits / max(self.mark_calls, 1),
            "mark us/call": self.mark_ns / 1000 / max(self.mark_calls, 1),
            "locks purged": self.purged_locks,
            "pages purged": s["purged_pages"] + s["lazy_freed"],
            "faults": s["faults"],
            "SIGBUS": s["sigbus"],
            "zero reads": self.zero_reads,
            "reclaimed": s["reclaimed"],
            "swapped out": s["swap_outs"],
            "scanned": s["reclaim_scanned"],
            "wall s": self.wall_s,
        }


class Replayer:
    """Runs trace operations on a fresh SimulatedKernel under one design."""

    def __init__(self, design: Design, ram_pages: int, swap_pages: int = 0,
                 page_size: int = 4096) -> None:
        self.design = design
        self.kernel = SimulatedKernel(ram_pages, swap_pages, page_size, design.strategy)
        self.ps = page_size
        self.procs: dict[str, object] = {}
        self.regions: dict[tuple[str, str], tuple[int, int]] = {}
        self.files: dict[str, int] = {}
        self.policy_purged: set[tuple[str, str]] = set()  # regions a `purge` line discarded
        self.result = Result(design.name)

    def run(self, ops: Iterable[Op]) -> Result:
        """Apply every operation, then collect the counters."""
        start = time.perf_counter()
        for op in ops:
            getattr(self, "op_" + op[0])(*op[1:])
        self.result.wall_s = time.perf_counter() - start
        self.result.stats = self.kernel.stats()
        return self.result

    def _span(self, proc: str, region: str, first: int, count: int) -> tuple[object, int, int]:
        try:
            addr, npages = self.regions[proc, region]
        except KeyError:
            raise TraceError(f"process {proc!r} has no region {region!r}") from None
        if first + count > npages:
            raise TraceError(f"pages [{first}, {first + count}) run past region {region!r} "
                             f"of {npages} pages")
        return self.procs[proc], addr + first * self.ps, count * self.ps

    def _touch(self, p, addr: int, nbytes: int, write: bool) -> int:
        """Touch a span; a SIGBUS is counted and the access goes on at the next page, as a
        handler that skips the lost page would."""
        end = addr + nbytes
        fresh = 0
        while addr < end:
            try:
                fresh += p.touch(addr, end - addr, write)
                break
            except PurgedPageError as e:
                addr = e.address + self.ps
        return fresh

    def op_spawn(self, proc: str) -> None:
        self.procs[proc] = self.kernel.spawn()

    def op_fork(self, parent: str, child: str) -> None:
        self.procs[child] = self.procs[parent].fork()
        for (owner, region), span in list(self.regions.items()):
            if owner == parent:
                self.regions[child, region] = span

    def op_exit(self, proc: str) -> None:
        self.procs.pop(proc).exit()
        for key in [key for key in self.regions if key[0] == proc]:
            del self.regions[key]

    def op_mmap(self, proc: str, region: str, pages: int) -> None:
        self.regions[proc, region] = (self.procs[proc].mmap(pages * self.ps), pages)

    def op_memfd(self, file: str, pages: int) -> None:
        self.files[file] = self.kernel.memfd_create(pages * self.ps)

    def op_mmapfd(self, proc: str, region: str, file: str, pages: int, offset: int) -> None:
        addr = self.procs[proc].mmap(pages * self.ps, fd=self.files[file], offset=offset * self.ps)
        self.regions[proc, region] = (addr, pages)

    def op_munmap(self, proc: str, region: str) -> None:
        addr, pages = self.regions.pop((proc, region))
        self.policy_purged.discard((proc, region))
        self.procs[proc].munmap(addr, pages * self.ps)

    def op_write(self, proc: str, region: str, first: int, count: int) -> None:
        p, addr, nbytes = self._span(proc, region, first, count)
        self._touch(p, addr, nbytes, True)

    def op_read(self, proc: str, region: str, first: int, count: int) -> None:
        p, addr, nbytes = self._span(proc, region, first, count)
        before = self.kernel.core.zero_page_faults
        self._touch(p, addr, nbytes, False)
        self.result.zero_reads += self.kernel.core.zero_page_faults - before

    def op_dontneed(self, proc: str, region: str, first: int, count: int) -> None:
        p, addr, nbytes = self._span(proc, region, first, count)
        p.madvise(addr, nbytes, MADV_DONTNEED)

    def op_unlock(self, proc: str, region: str, first: int, count: int) -> None:
        p, addr, nbytes = self._span(proc, region, first, count)
        r = self.result
        before = self.kernel.stats()["pte_visits"]
        t0 = time.perf_counter_ns()
        p.madvise(addr, nbytes, self.design.advice)
        r.mark_ns += time.perf_counter_ns() - t0
        r.mark_visits += self.kernel.stats()["pte_visits"] - before
        r.mark_calls += 1

    def op_lock(self, proc: str, region: str, first: int, count: int,
                lost: int | None = None) -> None:
        """Make the span non-volatile; if anything was lost, regenerate (rewrite) all of it,
        unless the trace recorded the loss (its next lines are the app's own refill)."""
        p, addr, nbytes = self._span(proc, region, first, count)
        r = self.result
        before = self.kernel.stats()["pte_visits"]
        t0 = time.perf_counter_ns()
        if self.design.advice == MADV_FREE:
            # Chromium's check: a lost page reads back as zero; the write cancels the lazy free.
            purged = self._touch(p, addr, nbytes, True) > 0
        else:
            purged = p.madvise(addr, nbytes, MADV_NONVOLATILE) == 1
        r.unmark_ns += time.perf_counter_ns() - t0
        visits = self.kernel.stats()["pte_visits"] - before
        if self.design.advice == MADV_FREE:
            visits = count  # the user-space cookie check reads every page once
        r.unmark_visits += visits
        r.unmark_calls += 1
        if (proc, region) in self.policy_purged:
            self.policy_purged.discard((proc, region))
            purged = True  # the app's own policy discarded it: reported whatever the design
        if lost is not None:
            r.recorded_locks += 1
            r.recorded_purged_locks += lost > 0
        if purged:
            r.purged_locks += 1
            if not lost:
                self._touch(p, addr, nbytes, True)

    def op_reclaim(self, pages: int) -> None:
        self.kernel.reclaim(pages)

    def op_pageout(self, proc: str, region: str, first: int, count: int,
                   gone: int | None = None) -> None:
        """discache.force_reclaim: the kernel reclaims the span's discardable pages now."""
        p, addr, nbytes = self._span(proc, region, first, count)
        p.madvise(addr, nbytes, MADV_PAGEOUT)

    def op_lost(self, proc: str, region: str, first: int, count: int) -> None:
        """The kernel took the span's pages on its own, found by the library at the next
        operation: placed there, as a reclaim of the span."""
        self.op_pageout(proc, region, first, count)

    def op_purge(self, proc: str, region: str, first: int, count: int) -> None:
        """A policy of the app discarded the unlocked span: gone in every design, and the next
        lock reports it (the app's books say so, not the kernel)."""
        p, addr, nbytes = self._span(proc, region, first, count)
        p.madvise(addr, nbytes, MADV_DONTNEED)
        self.policy_purged.add((proc, region))
