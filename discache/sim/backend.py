"""The "simulated" segment kind: page spans of discache.sim's simulated kernel, deterministic on
any machine, behind the same segment protocol as discache._core.Segment."""
from __future__ import annotations

import threading
import weakref
from typing import Any, Optional

from .. import forking, validate
from ._sim import STATE_PURGED
from .kernel import MADV_DONTNEED, MADV_NONVOLATILE, MADV_VOLATILE, VA_BASE, SimulatedKernel

SIM_RAM_PAGES = 1 << 18  # 1 GiB of simulated RAM, allocated by the simulator as it is touched

_kernel: Optional[SimulatedKernel] = None
_process: Any = None
_lock = threading.RLock()  # one simulated machine per process, driven by one thread at a time
# Segments collected without close(): (process, addr, nbytes), unmapped at the next operation
_unmapped_later: list[tuple[Any, int, int]] = []


def _reset_lock_in_child() -> None:
    global _lock
    _lock = threading.RLock()


# No other thread is inside the simulated kernel when a child is forked.
forking.hold_across_fork(forking.SIMULATED_KERNEL, lambda: [_lock], _reset_lock_in_child)


def _unmap_collected() -> None:
    """munmap the simulated memory of segments collected without close() (under _lock)."""
    while _unmapped_later:
        process, addr, nbytes = _unmapped_later.pop()
        process.munmap(addr, nbytes)


def simulated_kernel() -> SimulatedKernel:
    """The process-wide simulated kernel that "simulated" memory lives in."""
    global _kernel, _process
    with _lock:
        if _kernel is None:
            _kernel = SimulatedKernel(ram_pages=SIM_RAM_PAGES, swap_pages=0)
            _process = _kernel.spawn()
        return _kernel


class SimSegment:
    """npages of simulated memory whose page spans lock and unlock independently, as
    discache._core.Segment; a locked span's bytes live in a buffer that unlock writes back."""

    kind = "simulated"

    def __init__(self, npages: int) -> None:
        kernel = simulated_kernel()
        self.page = kernel.page_size
        npages = validate.size(npages, "npages", SIM_RAM_PAGES)
        self.npages = npages
        self.nbytes = npages * self.page
        with _lock:
            _unmap_collected()
            self.process = _process
            self.addr = self.process.mmap(self.nbytes)
        self.first_page = (self.addr - VA_BASE) // self.page
        self._locked: dict[int, bytearray] = {}  # locked span first -> its bytes
        self._spans: dict[int, int] = {}  # locked span first -> pages
        self._lost = [False] * npages  # discarded by discard_span since their last lock
        self.closed = False
        # Collected without close(): a GC may run inside the simulated kernel, so the unmap waits
        # for the next segment operation.
        self._finalizer = weakref.finalize(self, _unmapped_later.append,
                                           (self.process, self.addr, self.nbytes))

    @property
    def mutex(self) -> Any:
        """The simulated machine's lock, which a span's state changes happen under too."""
        return _lock

    def _check(self, first: int, count: int) -> None:
        if self.closed:
            raise ValueError("the segment is closed")
        if count <= 0:
            raise ValueError(f"a span needs at least one page, got {count}")
        if first < 0 or first + count > self.npages:
            raise IndexError(f"pages [{first}, {first + count}) are outside the segment's "
                             f"{self.npages} pages")

    def claim_span(self, first: int, count: int) -> None:
        """Hand out pages as a new locked span (zero-filled)."""
        self._check(first, count)
        with _lock:
            self._locked[first] = _SpanBytes(count * self.page)
            self._spans[first] = count
            for i in range(first, first + count):
                self._lost[i] = False

    def release_span(self, first: int, count: int) -> None:
        """Forget a freed span: its bytes, its volatility and its pages."""
        self._check(first, count)
        with _lock:
            self._locked.pop(first, None)
            self._spans.pop(first, None)
            start = self.addr + first * self.page
            self.process.madvise(start, count * self.page, MADV_NONVOLATILE)
            self.process.madvise(start, count * self.page, MADV_DONTNEED)
            for i in range(first, first + count):
                self._lost[i] = False

    def lock_span(self, first: int, count: int) -> int:
        """Lock a span (MADV_NONVOLATILE); returns how many of its pages were purged."""
        self._check(first, count)
        with _lock:
            if first in self._spans:
                raise RuntimeError(f"pages [{first}, {first + count}) are already locked")
            start = self.first_page + first
            states = self.process.pager.table.states(start, count)
            purged = states.count(STATE_PURGED)
            for i in range(first, first + count):
                purged += self._lost[i] and states[i - first] != STATE_PURGED
                self._lost[i] = False
            self.process.madvise(self.addr + first * self.page, count * self.page,
                                 MADV_NONVOLATILE)
            data = _SpanBytes(self.process.read(self.addr + first * self.page, count * self.page))
            self._spans[first] = count
            self._locked[first] = data
            return purged

    def unlock_span(self, first: int, count: int) -> None:
        """Write the span back to the simulated memory and mark it volatile (MADV_VOLATILE)."""
        self.unlock_spans([(first, count)])

    def unlock_spans(self, spans: Any) -> int:
        """Unlock many spans, one simulated madvise per run of adjacent ones; returns the runs."""
        spans = sorted(spans)
        with _lock:
            for first, count in spans:
                self._check(first, count)
                data = self._locked.get(first)
                if data is None or self._spans.get(first) != count:
                    raise RuntimeError(f"pages [{first}, {first + count}) are not a locked span")
                _check_no_exports(data)
            runs: list[list[int]] = []
            for first, count in spans:
                data = self._locked.pop(first)
                del self._spans[first]
                self.process.write(self.addr + first * self.page, bytes(data))
                if runs and runs[-1][1] == first:
                    runs[-1][1] = first + count
                else:
                    runs.append([first, first + count])
            for first, end in runs:
                self.process.madvise(self.addr + first * self.page, (end - first) * self.page,
                                     MADV_VOLATILE)
            return len(runs)

    def discard_span(self, first: int, count: int) -> None:
        """Discard an unlocked span (a policy's purge): its pages are reported at the next lock."""
        self._check(first, count)
        with _lock:
            if first in self._spans:
                raise RuntimeError("a locked span cannot be discarded")
            for i in range(first, first + count):
                self._lost[i] = True

    def reclaim_span(self, first: int, count: int) -> int:
        """Let the simulated kernel reclaim every volatile page it has (this span's among them);
        returns how many of the span's pages are gone."""
        self._check(first, count)
        with _lock:
            if first in self._spans:
                return 0
            kernel = simulated_kernel()
            kernel.reclaim(kernel.volatile_pages())
            states = self.process.pager.table.states(self.first_page + first, count)
            return states.count(STATE_PURGED)

    def read(self, offset: int, size: int) -> bytes:
        """Copy bytes out of a locked span."""
        with _lock:
            data, at = self._locate(offset, size)
            return bytes(data[at:at + size])

    def write(self, offset: int, data: Any) -> int:
        """Copy bytes into a locked span."""
        with memoryview(data) as source, _lock:
            size = source.nbytes
            buf, at = self._locate(offset, size)
            buf[at:at + size] = source.cast("B")
        return size

    def span_buffer(self, offset: int, size: int) -> _SpanBytes:
        """The bytes of the locked span starting at offset (a buffer with `exports`)."""
        with _lock:
            buf, at = self._locate(offset, size)
        if at:
            raise ValueError("a span buffer starts where its span starts")
        return buf  # type: ignore[return-value]

    def locked_bytes(self, first: int) -> bytearray:
        """The bytes of the locked span that starts at page first."""
        with _lock:
            return self._locked[first]

    def _locate(self, offset: int, size: int) -> tuple[bytearray, int]:
        """(bytes of the locked span holding [offset, offset+size), offset in them); under _lock."""
        page = offset // self.page
        for start, n in self._spans.items():
            if start <= page < start + n:
                at = offset - start * self.page
                if at + size > n * self.page:
                    break
                return self._locked[start], at
        raise RuntimeError(f"bytes [{offset}, {offset + size}) are not in one locked span")

    def close(self) -> None:
        """Unmap the simulated memory; calling it again does nothing."""
        with _lock:
            if self.closed:
                return
            self._finalizer.detach()
            self.process.munmap(self.addr, self.nbytes)
            self.closed = True
            _unmap_collected()


class _SpanBytes(bytearray):
    """A locked span's bytes; `exports` says whether a view of them is still alive."""

    @property
    def exports(self) -> int:
        try:
            self.append(0)  # a bytearray with live exports cannot grow
        except BufferError:
            return 1
        del self[-1]
        return 0


def _check_no_exports(data: bytearray) -> None:
    if isinstance(data, _SpanBytes) and data.exports:
        raise BufferError("a view of the memory is still alive; release it first")


__all__ = ["SimSegment", "simulated_kernel"]
