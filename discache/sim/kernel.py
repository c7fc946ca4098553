"""A deterministic simulated kernel with volatile ranges: processes, madvise, reclaim, fork."""
from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Literal

from ._sim import MAX_PAGES, STRATEGIES, Pager, SimCore
from ..errors import PurgedPageError
from .intervals import IntervalSet

# MADV_VOLATILE/NONVOLATILE are v14's numbers (never merged; 18 and 19 are taken upstream today by
# MADV_WIPEONFORK/KEEPONFORK, which the simulation does not have).  ZEROFILL is the sim's own.
MADV_DONTNEED = 4
MADV_FREE = 8
MADV_VOLATILE = 18
MADV_NONVOLATILE = 19
MADV_COLD = 20
MADV_PAGEOUT = 21
MADV_VOLATILE_ZEROFILL = 1018
ADVICE_NAMES = {
    MADV_DONTNEED: "MADV_DONTNEED",
    MADV_FREE: "MADV_FREE",
    MADV_VOLATILE: "MADV_VOLATILE",
    MADV_NONVOLATILE: "MADV_NONVOLATILE",
    MADV_COLD: "MADV_COLD",
    MADV_PAGEOUT: "MADV_PAGEOUT",
    MADV_VOLATILE_ZEROFILL: "MADV_VOLATILE_ZEROFILL",
}

# Addresses of every simulated process start here (a multiple of every supported page size).
VA_BASE = 1 << 32


def _error(code: int, what: str) -> OSError:
    return OSError(code, f"{errno.errorcode[code]}: {what}")


def _check_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


@dataclass
class Mapping:
    """One VMA: pages [start, end) of an address space, private or a window on a shared file."""

    start: int
    end: int
    file: SharedFile | None = None
    file_page: int = 0

    def pager_page(self, page: int) -> int:
        """The page of the backing Pager (own space or file) that backs virtual page `page`."""
        return page if self.file is None else self.file_page + (page - self.start)


class SharedFile:
    """A memfd_create file: pages shared by every mapping, volatility kept in the file itself."""

    def __init__(self, kernel: SimulatedKernel, fd: int, npages: int) -> None:
        self.kernel = kernel
        self.fd = fd
        self.npages = npages
        self.pager = Pager(npages, kernel.core.new_owner(), True, kernel.strategy)
        self.pager.top = npages
        self.zerofill = IntervalSet()
        self.mappings = 0
        self.open = True
        kernel.core.attach(self.pager)

    def release(self) -> None:
        """Free the file's pages once it is closed and unmapped (tmpfs drops an unlinked file)."""
        if self.open or self.mappings:
            return
        self.kernel.core.discard(self.pager, 0, self.npages)
        self.kernel.retire(self.pager)


class Process:
    """A simulated process: one address space with private and shared mappings."""

    def __init__(self, kernel: SimulatedKernel, pid: int, owner: int) -> None:
        self.kernel = kernel
        self.pid = pid
        self.pager = Pager(kernel.va_pages, owner, False, kernel.strategy)
        self.mappings: list[Mapping] = []
        self.zerofill = IntervalSet()
        self.alive = True
        kernel.core.attach(self.pager)

    def __repr__(self) -> str:
        state = "alive" if self.alive else "exited"
        return f"<Process pid={self.pid} {state} mappings={len(self.mappings)}>"

    # ------------------------------------------------------------ address arithmetic and checks

    def _live(self) -> None:
        if not self.alive:
            raise ProcessLookupError(errno.ESRCH, f"process {self.pid} has exited")

    def _span(self, addr: object, length: object, call: str) -> tuple[int, int]:
        """Validate an aligned [addr, addr+length) span; return its pages [first, end)."""
        addr = _check_int("addr", addr)
        length = _check_int("length", length)
        ps = self.kernel.page_size
        if addr % ps:
            raise _error(errno.EINVAL, f"{call}: address {addr:#x} is not page-aligned")
        if length < 0 or length % ps:
            raise _error(errno.EINVAL, f"{call}: length {length} is not a multiple of {ps}")
        return (addr - VA_BASE) // ps, (addr - VA_BASE + length) // ps

    def _pieces(self, first: int, end: int, code: int, call: str) -> list[tuple[Mapping, int, int]]:
        """The mappings covering pages [first, end), cut to it; raises `code` on a hole."""
        pieces = []
        pos = first
        for m in self.mappings:
            if m.end <= pos:
                continue
            if m.start >= end:
                break
            if m.start > pos:
                break
            hi = min(end, m.end)
            pieces.append((m, pos, hi))
            pos = hi
            if pos >= end:
                break
        if pos < end:
            addr = VA_BASE + pos * self.kernel.page_size
            raise _error(code, f"{call}: address {addr:#x} is not mapped")
        return pieces

    def _addr(self, page: int) -> int:
        return VA_BASE + page * self.kernel.page_size

    # ------------------------------------------------------------ mmap, munmap

    def mmap(self, nbytes: int, fd: int | None = None, offset: int = 0) -> int:
        """Map nbytes (rounded up to pages) of private anonymous memory, or of file fd shared."""
        self._live()
        nbytes = _check_int("nbytes", nbytes)
        offset = _check_int("offset", offset)
        ps = self.kernel.page_size
        if nbytes <= 0:
            raise _error(errno.EINVAL, f"mmap: length must be positive, got {nbytes}")
        npages = -(-nbytes // ps)
        file = None
        if fd is not None:
            file = self.kernel._file(fd)
            if offset < 0 or offset % ps:
                raise _error(errno.EINVAL, f"mmap: offset {offset} is not page-aligned")
            if offset // ps + npages > file.npages:
                # Linux would map it and SIGBUS on access past the end; the simulation refuses.
                raise _error(errno.EINVAL, f"mmap: {npages} pages at offset {offset} run past "
                                           f"the end of fd {fd} ({file.npages} pages)")
        elif offset:
            raise _error(errno.EINVAL, "mmap: an anonymous mapping takes no offset")
        start = self._find_hole(npages)
        m = Mapping(start, start + npages, file, offset // ps if file else 0)
        self._insert(m)
        if file is not None:
            file.mappings += 1
        self.pager.top = max(self.pager.top, m.end)
        return self._addr(start)

    def _find_hole(self, npages: int) -> int:
        pos = 0
        for m in self.mappings:
            if m.start - pos >= npages:
                return pos
            pos = m.end
        if self.pager.npages - pos >= npages:
            return pos
        raise _error(errno.ENOMEM, f"mmap: no room for {npages} pages in the address space")

    def _insert(self, m: Mapping) -> None:
        k = 0
        while k < len(self.mappings) and self.mappings[k].start < m.start:
            k += 1
        self.mappings.insert(k, m)

    def munmap(self, addr: int, length: int) -> None:
        """Unmap [addr, addr+length): private pages are freed, volatility forgotten."""
        self._live()
        first, end = self._span(addr, length, "munmap")
        if length == 0:
            raise _error(errno.EINVAL, "munmap: length must be positive")
        if first < 0 or end > self.pager.npages:
            raise _error(errno.EINVAL,
                         f"munmap: [{addr:#x}, +{length}) is outside the address space")
        self._unmap(first, end)

    def _unmap(self, first: int, end: int) -> None:
        kept: list[Mapping] = []
        for m in self.mappings:
            if m.end <= first or m.start >= end:
                kept.append(m)
                continue
            lo, hi = max(first, m.start), min(end, m.end)
            if m.start < lo:
                kept.append(Mapping(m.start, lo, m.file, m.file_page))
            if hi < m.end:
                kept.append(Mapping(hi, m.end, m.file, m.pager_page(hi)))
            if m.file is None:
                self.kernel.core.discard(self.pager, lo, hi - lo)
                self.pager.table.unmark(lo, hi - lo)
                self.zerofill.remove(lo, hi)
            else:
                m.file.mappings += (m.start < lo) + (hi < m.end) - 1
                m.file.release()
        self.mappings = sorted(kept, key=lambda m: m.start)

    # ------------------------------------------------------------ madvise

    def madvise(self, addr: int, length: int, advice: int) -> int:
        """Linux's madvise with v14's MADV_VOLATILE/NONVOLATILE; NONVOLATILE returns 1 if any
        page of the range was purged while volatile, every other advice returns 0."""
        self._live()
        advice = _check_int("advice", advice)
        if advice not in ADVICE_NAMES:
            raise _error(errno.EINVAL, f"madvise: unknown advice {advice}")
        first, end = self._span(addr, length, "madvise")
        if length == 0:
            return 0
        if first < 0 or end > self.pager.npages:
            raise _error(errno.ENOMEM,
                         f"madvise: [{addr:#x}, +{length}) is outside the address space")
        pieces = self._pieces(first, end, errno.ENOMEM, "madvise")
        if advice == MADV_FREE and any(m.file is not None for m, _, _ in pieces):
            raise _error(errno.EINVAL, "madvise: MADV_FREE works on private anonymous memory only")
        core = self.kernel.core
        purged = False
        for m, lo, hi in pieces:
            if m.file is None:
                pager, zerofill, a = self.pager, self.zerofill, lo
            else:
                pager, zerofill, a = m.file.pager, m.file.zerofill, m.pager_page(lo)
            n = hi - lo
            if advice in (MADV_VOLATILE, MADV_VOLATILE_ZEROFILL):
                pager.table.mark_volatile(a, n)
                if advice == MADV_VOLATILE_ZEROFILL:
                    zerofill.add(a, a + n)
                else:
                    zerofill.remove(a, a + n)
            elif advice == MADV_NONVOLATILE:
                purged |= pager.table.unmark(a, n)
                zerofill.remove(a, a + n)
            elif advice == MADV_FREE:
                core.lazyfree(pager, a, n)
            elif advice == MADV_PAGEOUT:
                core.pageout(pager, a, n)
            elif advice == MADV_COLD:
                core.cold(pager, a, n)
            elif m.file is None:
                core.discard(pager, a, n)
            # MADV_DONTNEED on a shared mapping only drops this process's page table entries;
            # the file keeps its pages, so nothing is lost (the simulation keeps no such entries).
        return int(purged)

    # ------------------------------------------------------------ access

    def _access(self, addr: int, nbytes: int, write: bool, call: str):
        """Yield (pager, pager_page, offset, count, virtual_page) for each page piece of a span."""
        ps = self.kernel.page_size
        addr = _check_int("addr", addr)
        nbytes = _check_int("nbytes", nbytes)
        if nbytes < 0:
            raise _error(errno.EINVAL, f"{call}: negative length {nbytes}")
        if nbytes == 0:
            return []
        first = (addr - VA_BASE) // ps
        end = (addr - VA_BASE + nbytes + ps - 1) // ps
        if addr < VA_BASE or end > self.pager.npages:
            raise _error(errno.EFAULT,
                         f"{call}: [{addr:#x}, +{nbytes}) is outside the address space")
        return self._pieces(first, end, errno.EFAULT, call)

    def _fault_in(self, m: Mapping, first: int, count: int, write: bool) -> int:
        """Touch pages [first, first+count) of mapping m; raises PurgedPageError on a SIGBUS."""
        kernel = self.kernel
        pager = self.pager if m.file is None else m.file.pager
        zerofill = self.zerofill if m.file is None else m.file.zerofill
        a = m.pager_page(first)
        end = a + count
        fresh = 0
        while a < end:
            done, new = kernel.core.touch(pager, a, end - a, write, True)
            fresh += new
            a += done
            if a < end:
                if a not in zerofill:
                    kernel.sigbus += 1
                    raise PurgedPageError(self._addr(m.start + (a - m.pager_page(m.start))))
                kernel.zero_fills += 1
                fresh += kernel.core.touch(pager, a, 1, write, False)[1]
                a += 1
        return fresh

    def touch(self, addr: int, nbytes: int, write: bool = False) -> int:
        """Access every page of [addr, addr+nbytes) without copying data; returns how many pages
        came in as new zero pages (never touched, dropped, or lost: Chromium's cookie check)."""
        self._live()
        fresh = 0
        for m, lo, hi in self._access(addr, nbytes, write, "touch"):
            fresh += self._fault_in(m, lo, hi - lo, write)
        return fresh

    def read(self, addr: int, nbytes: int) -> bytes:
        """Read nbytes at addr; PurgedPageError if a page was purged while still volatile."""
        self._live()
        out = []
        ps = self.kernel.page_size
        core = self.kernel.core
        pos = _check_int("addr", addr)
        stop = pos + _check_int("nbytes", nbytes)
        for m, lo, hi in self._access(addr, nbytes, False, "read"):
            pager = self.pager if m.file is None else m.file.pager
            for page in range(lo, hi):
                self._fault_in(m, page, 1, False)
                off = pos - self._addr(page)
                n = min(stop, self._addr(page) + ps) - pos
                out.append(core.read(pager, m.pager_page(page), off, n))
                pos += n
        return b"".join(out)

    def write(self, addr: int, data: bytes) -> None:
        """Write data at addr; PurgedPageError if a page was purged while still volatile."""
        self._live()
        view = memoryview(data).cast("B")
        ps = self.kernel.page_size
        core = self.kernel.core
        pos = _check_int("addr", addr)
        done = 0
        for m, lo, hi in self._access(addr, len(view), True, "write"):
            pager = self.pager if m.file is None else m.file.pager
            for page in range(lo, hi):
                self._fault_in(m, page, 1, True)
                off = pos - self._addr(page)
                n = min(len(view) - done, ps - off)
                core.write(pager, m.pager_page(page), off, view[done:done + n])
                pos += n
                done += n

    # ------------------------------------------------------------ fork, exit, accounting

    def fork(self) -> Process:
        """A copy-on-write child with the same mappings and the same volatility marks."""
        self._live()
        child = Process(self.kernel, self.kernel._next_pid(), self.pager.owner)
        try:
            self.kernel.core.fork_into(self.pager, child.pager)
        except BaseException:
            self.kernel.core.detach(child.pager)
            raise
        child.mappings = [Mapping(m.start, m.end, m.file, m.file_page) for m in self.mappings]
        for m in child.mappings:
            if m.file is not None:
                m.file.mappings += 1
        child.zerofill = self.zerofill.copy()
        self.kernel.processes[child.pid] = child
        return child

    def exit(self) -> None:
        """Unmap everything and end the process; later calls raise ProcessLookupError."""
        self._live()
        self._unmap(0, self.pager.npages)
        self.alive = False
        self.kernel.retire(self.pager)
        del self.kernel.processes[self.pid]

    def volatile_pages(self) -> int:
        """Pages of this address space marked volatile, resident or not, private or shared."""
        self._live()
        total = sum(count for _, count, _, _ in self.pager.table.volatile_ranges())
        for m in self.mappings:
            if m.file is None:
                continue
            a, b = m.file_page, m.file_page + (m.end - m.start)
            for first, count, _, _ in m.file.pager.table.volatile_ranges():
                total += max(0, min(b, first + count) - max(a, first))
        return total


class SimulatedKernel:
    """Simulated RAM, swap and processes with v14 volatile ranges, built on discache's core."""

    def __init__(self, ram_pages: int = 1 << 18, swap_pages: int = 0, page_size: int = 4096,
                 strategy: Literal["token", "walk"] = "token", va_pages: int | None = None,
                 always_age: bool = False) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be 'token' or 'walk', got {strategy!r}")
        self.core = SimCore(ram_pages, swap_pages, page_size)
        # Without swap, reclaim scans only while something is volatile or lazily freed, and then
        # only the volatile ranges unless pages are lazily freed; always_age scans every page
        # regardless (what a kernel without the volatile-range count must do).
        self.core.force_aging = bool(always_age)
        self.strategy = strategy
        self.page_size = page_size
        self.ram_pages = ram_pages
        self.swap_pages = swap_pages
        if va_pages is None:
            va_pages = min(max(4 * (ram_pages + swap_pages), 1 << 16), 1 << 31)
        self.va_pages = _check_int("va_pages", va_pages)
        self.processes: dict[int, Process] = {}
        self.files: dict[int, SharedFile] = {}
        self.sigbus = 0
        self.zero_fills = 0
        self._pid = 0
        self._fd = 2
        self._retired_visits = 0
        self._retired_record_visits = 0

    def __repr__(self) -> str:
        return (f"SimulatedKernel(ram_pages={self.ram_pages}, swap_pages={self.swap_pages}, "
                f"page_size={self.page_size}, strategy={self.strategy!r})")

    def _next_pid(self) -> int:
        self._pid += 1
        return self._pid

    def _file(self, fd: object) -> SharedFile:
        file = self.files.get(fd) if isinstance(fd, int) else None
        if file is None:
            raise _error(errno.EBADF, f"fd {fd!r} is not an open memfd")
        return file

    def retire(self, pager: Pager) -> None:
        """Forget an emptied Pager, keeping its counters in the totals."""
        self._retired_visits += pager.table.pte_visits
        self._retired_record_visits += pager.table.record_visits
        self.core.detach(pager)

    def spawn(self) -> Process:
        """A new process with an empty address space."""
        p = Process(self, self._next_pid(), self.core.new_owner())
        self.processes[p.pid] = p
        return p

    def memfd_create(self, nbytes: int) -> int:
        """A shared in-memory file of nbytes (rounded up to pages), like memfd or ashmem; its fd."""
        nbytes = _check_int("nbytes", nbytes)
        if nbytes <= 0:
            raise _error(errno.EINVAL, f"memfd_create: size must be positive, got {nbytes}")
        if -(-nbytes // self.page_size) > MAX_PAGES:
            raise _error(errno.EFBIG, f"memfd_create: {nbytes} bytes is more than {MAX_PAGES} pages")
        self._fd += 1
        self.files[self._fd] = SharedFile(self, self._fd, -(-nbytes // self.page_size))
        return self._fd

    def close(self, fd: int) -> None:
        """Close a memfd; its pages live on while some process maps them."""
        file = self._file(fd)
        file.open = False
        del self.files[fd]
        file.release()

    def reclaim(self, npages: int) -> int:
        """Free up to npages: volatile and lazily freed pages first (CLOCK: a page used since the
        last pass gets a second chance), then, with swap, other pages to swap; returns the pages
        freed."""
        return self.core.reclaim(_check_int("npages", npages))

    def volatile_pages(self) -> int:
        """Resident pages that reclaim may discard now: every mapping of them is volatile."""
        return self.core.discardable_pages()

    def _pagers(self) -> list[Pager]:
        return ([p.pager for p in self.processes.values()]
                + [f.pager for f in self.files.values()]
                + [f.pager for f in self._orphan_files()])

    def _orphan_files(self) -> list[SharedFile]:
        seen = {id(f) for f in self.files.values()}
        out = []
        for p in self.processes.values():
            for m in p.mappings:
                if m.file is not None and id(m.file) not in seen:
                    seen.add(id(m.file))
                    out.append(m.file)
        return out

    def stats(self) -> dict[str, int]:
        """Counters since boot, and the current memory picture."""
        core = self.core
        pagers = self._pagers()
        visits = self._retired_visits + sum(p.table.pte_visits for p in pagers)
        return {
            "pte_visits": visits + core.madv_free_visits,
            "madv_free_visits": core.madv_free_visits,
            "record_visits": (self._retired_record_visits
                              + sum(p.table.record_visits for p in pagers)),
            "faults": core.faults,
            "zero_page_faults": core.zero_page_faults,
            "cow_faults": core.cow_faults,
            "swap_ins": core.swap_ins,
            "swap_outs": core.swap_outs,
            "purged_pages": core.purged_pages,
            "lazy_freed": core.lazy_freed,
            "sigbus": self.sigbus,
            "zero_fills": self.zero_fills,
            "reclaimed": core.reclaimed,
            "reclaim_scanned": core.reclaim_scanned,
            "direct_reclaims": core.direct_reclaims,
            "free_pages": core.nfree,
            "used_pages": core.nframes - core.nfree,
            "swap_used": core.swap_used(),
            "lazyfree_pages": core.nlazyfree,
            "processes": len(self.processes),
            "bookkeeping_bytes": core.nbytes + sum(p.nbytes_used for p in pagers),
        }
