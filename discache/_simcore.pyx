# The physical side of discache.sim: frames, an exact LRU, swap, page faults and reclaim.
# Included by _core.pyx; declared in _simcore.pxd.  Volatility itself lives in each Pager's
# PageTable; this file only asks it (_find, _state) and tells it (populate, discard, purge).

from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset
from libc.errno cimport EAGAIN
from cpython.pythread cimport (
    NOWAIT_LOCK, WAIT_LOCK, PyThread_acquire_lock, PyThread_allocate_lock,
    PyThread_free_lock, PyThread_release_lock,
)

cdef extern from *:
    """
    #define SIM_SWAPPED   0x80000000u
    #define SIM_LAZYFREE  0x0001u
    #define SIM_PINNED    0x0002u
    #define SIM_DATA      0x0004u
    #define SIM_MAX_FRAMES 0x7fffffffu
    """
    const uint32_t SIM_SWAPPED
    const uint16_t SIM_LAZYFREE
    const uint16_t SIM_PINNED
    const uint16_t SIM_DATA
    const uint32_t SIM_MAX_FRAMES

# Direct reclaim frees this many pages at once, as Linux's SWAP_CLUSTER_MAX.
SIM_RECLAIM_BATCH = 32
SWAPPED_BIT = SIM_SWAPPED
cdef Py_ssize_t RECLAIM_BATCH = 32
cdef int SIM_STATE_PURGED = 3      # PageTable's STATE_PURGED


cdef class SimCore:
    """Physical memory of a simulated kernel: frames on an LRU, swap slots, faults and reclaim."""

    def __cinit__(self, ram_pages, swap_pages=0, page_size=4096):
        cdef Py_ssize_t nram = _as_index(ram_pages), nswap = _as_index(swap_pages)
        cdef Py_ssize_t psize = _as_index(page_size)
        cdef uint32_t f
        if nram <= 0 or <uint64_t>nram > SIM_MAX_FRAMES:
            raise ValueError(f"ram_pages must be between 1 and {SIM_MAX_FRAMES}, got {ram_pages!r}")
        if nswap < 0 or <uint64_t>nswap > SIM_MAX_FRAMES:
            raise ValueError(
                f"swap_pages must be between 0 and {SIM_MAX_FRAMES}, got {swap_pages!r}")
        if psize < 64 or psize > (1 << 21) or (psize & (psize - 1)):
            raise ValueError(
                f"page_size must be a power of two from 64 to 2 MiB, got {page_size!r}")
        self.nframes = <uint32_t>nram
        self.nswap = <uint32_t>nswap
        self.page_size = <uint32_t>psize
        self.frames = <SimFrame *>calloc(nram + 1, sizeof(SimFrame))
        # calloc of a large block maps zero pages lazily: untouched simulated RAM costs no real RAM.
        self.ram = <unsigned char *>calloc(nram, psize)
        if self.frames == NULL or self.ram == NULL:
            raise MemoryError(f"cannot allocate {nram} simulated frames of {psize} bytes")
        if nswap:
            self.swap = <unsigned char *>calloc(nswap, psize)
            self.swap_refs = <uint16_t *>calloc(nswap, sizeof(uint16_t))
            self.swap_dirty = <unsigned char *>calloc(nswap, 1)
            self.swap_free = <uint32_t *>malloc(nswap * sizeof(uint32_t))
            if (self.swap == NULL or self.swap_refs == NULL or self.swap_dirty == NULL
                    or self.swap_free == NULL):
                raise MemoryError(f"cannot allocate {nswap} simulated swap slots")
            for f in range(<uint32_t>nswap):
                self.swap_free[f] = <uint32_t>nswap - 1 - f
            self.nswap_free = <uint32_t>nswap
        for f in range(1, self.nframes):
            self.frames[f].next = f + 1
        self.free_head = 1
        self.nfree = self.nframes
        self.owners = []
        self.mutex = PyThread_allocate_lock()
        if self.mutex == NULL:
            raise MemoryError("cannot allocate the simulated kernel's lock")

    def __dealloc__(self):
        if self.mutex != NULL:
            PyThread_free_lock(self.mutex)
        free(self.frames)
        free(self.ram)
        free(self.swap)
        free(self.swap_refs)
        free(self.swap_dirty)
        free(self.swap_free)

    # ---------------------------------------------------------------- locking

    cdef int _lock(self) except -1:
        # Page loops run without the GIL, so the simulated machine needs its own lock.
        if not PyThread_acquire_lock(self.mutex, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self.mutex, WAIT_LOCK)
        return 0

    cdef void _unlock(self) noexcept:
        PyThread_release_lock(self.mutex)

    # ---------------------------------------------------------------- rmap groups

    def new_owner(self) -> int:
        """A new reverse-map group (a fork family or a file); returns its id."""
        self.owners.append([])
        return len(self.owners) - 1

    def attach(self, Pager pg) -> None:
        """Add a Pager to its rmap group, so that reclaim finds its pages."""
        self.owners[pg.owner].append(pg)

    def detach(self, Pager pg) -> None:
        """Remove a Pager (whose pages are all discarded) from its rmap group."""
        group = self.owners[pg.owner]
        for k in range(len(group)):
            if group[k] is pg:
                del group[k]
                return

    # ---------------------------------------------------------------- frames and LRU

    cdef unsigned char *_page(self, uint32_t f) noexcept nogil:
        return self.ram + <size_t>(f - 1) * self.page_size

    cdef void _lru_add(self, uint32_t f) noexcept nogil:
        self.frames[f].prev = 0
        self.frames[f].next = self.lru_head
        if self.lru_head:
            self.frames[self.lru_head].prev = f
        else:
            self.lru_tail = f
        self.lru_head = f

    cdef void _lru_del(self, uint32_t f) noexcept nogil:
        cdef uint32_t p = self.frames[f].prev, n = self.frames[f].next
        if p:
            self.frames[p].next = n
        else:
            self.lru_head = n
        if n:
            self.frames[n].prev = p
        else:
            self.lru_tail = p

    cdef uint32_t _alloc(self) except 0:
        cdef uint32_t f
        if self.free_head == 0:
            self.direct_reclaims += 1
            self._reclaim(RECLAIM_BATCH)
            if self.free_head == 0:
                raise MemoryError(
                    f"simulated RAM is full ({self.nframes} pages) and nothing can be reclaimed: "
                    f"no page is volatile or lazily freed"
                    + (" and swap is full" if self.nswap else " and there is no swap"))
        return self._take_free()

    cdef uint32_t _take_free(self) noexcept nogil:
        cdef uint32_t f = self.free_head
        self.free_head = self.frames[f].next
        self.nfree -= 1
        if self.frames[f].flags & SIM_DATA:
            memset(self._page(f), 0, self.page_size)
        memset(&self.frames[f], 0, sizeof(SimFrame))
        return f

    cdef void _free_frame(self, uint32_t f) noexcept nogil:
        self._lru_del(f)
        if self.frames[f].flags & SIM_LAZYFREE:
            self.nlazyfree -= 1
        # The bytes are zeroed when the frame is reused, only if they were ever written.
        self.frames[f].flags &= SIM_DATA
        self.frames[f].mapcount = 0
        self.frames[f].next = self.free_head
        self.free_head = f
        self.nfree += 1

    cdef void _map_new(self, uint32_t f, Pager pg, uint32_t idx) noexcept nogil:
        self.frames[f].owner = pg.owner
        self.frames[f].index = idx
        self.frames[f].mapcount = 1
        pg.slots[idx] = f
        self._lru_add(f)

    cdef void _swap_put(self, uint32_t slot) noexcept nogil:
        self.swap_refs[slot] -= 1
        if self.swap_refs[slot] == 0:
            if self.swap_dirty[slot]:
                memset(self.swap + <size_t>slot * self.page_size, 0, self.page_size)
                self.swap_dirty[slot] = 0
            self.swap_free[self.nswap_free] = slot
            self.nswap_free += 1

    # ---------------------------------------------------------------- faults

    cdef int _fault(self, Pager pg, uint32_t idx, bint write) except -1:
        """Make page idx resident (and private, for a write); 1 if it came in as a new page."""
        cdef uint32_t s = pg.slots[idx], f, g, slot
        cdef int fresh = 0
        if s == 0:
            f = self._alloc()
            self._map_new(f, pg, idx)
            pg.table._acquire()
            pg.table._populate(idx, idx + 1)
            pg.table._release()
            self.faults += 1
            self.zero_page_faults += 1
            fresh = 1
        elif s & SIM_SWAPPED:
            slot = s & ~SIM_SWAPPED
            f = self._alloc()
            if self.swap_dirty[slot]:
                memcpy(self._page(f), self.swap + <size_t>slot * self.page_size, self.page_size)
                self.frames[f].flags |= SIM_DATA
            self._swap_put(slot)
            self._map_new(f, pg, idx)
            self.faults += 1
            self.swap_ins += 1
        else:
            f = s
            if write and self.frames[f].mapcount > 1 and not pg.shared:
                # Copy on write; the source is pinned so that direct reclaim cannot take it.
                self.frames[f].flags |= SIM_PINNED
                try:
                    g = self._alloc()
                finally:
                    self.frames[f].flags &= ~SIM_PINNED
                if self.frames[f].flags & SIM_DATA:
                    memcpy(self._page(g), self._page(f), self.page_size)
                    self.frames[g].flags |= SIM_DATA
                self.frames[f].mapcount -= 1
                self._map_new(g, pg, idx)
                self.faults += 1
                self.cow_faults += 1
                f = g
            elif self.lru_head != f:
                self._lru_del(f)
                self._lru_add(f)
        if write and (self.frames[f].flags & SIM_LAZYFREE):
            # A write after MADV_FREE re-dirties the page: the lazy free is cancelled.
            self.frames[f].flags &= ~SIM_LAZYFREE
            self.nlazyfree -= 1
        return fresh

    cdef uint32_t _touch_fast(self, Pager pg, uint32_t a, uint32_t b, bint write,
                              Py_ssize_t *fresh) noexcept nogil:
        """Touch pages from a on while no page needs the GIL (reclaim, swap-in, copy on write or a
        purged volatile page); returns the first page not handled."""
        cdef uint32_t idx, s, e
        cdef Py_ssize_t k
        for idx in range(a, b):
            s = pg.slots[idx]
            if s == 0:
                if self.free_head == 0:
                    return idx
                k = pg.table._find(idx)
                if k >= 0:
                    e = pg.table.entries[idx]
                    if (e & DC_LOST) and (e & pg.table.token_mask) == pg.table.ranges[k].token:
                        return idx
                self._map_new(self._take_free(), pg, idx)
                pg.table._populate(idx, idx + 1)
                self.faults += 1
                self.zero_page_faults += 1
                fresh[0] += 1
                s = pg.slots[idx]
            elif s & SIM_SWAPPED:
                return idx
            elif write and self.frames[s].mapcount > 1 and not pg.shared:
                return idx
            elif self.lru_head != s:
                self._lru_del(s)
                self._lru_add(s)
            if write and (self.frames[s].flags & SIM_LAZYFREE):
                self.frames[s].flags &= ~SIM_LAZYFREE
                self.nlazyfree -= 1
        return b

    def touch(self, Pager pg, first, count, bint write=False, bint stop_on_purged=True) -> tuple:
        """Access pages [first, first+count) in order, faulting them in; (done, fresh).

        With stop_on_purged, stops before the first page that was purged while volatile and is
        still volatile (the SIGBUS page), so done < count; fresh counts pages that came in new."""
        cdef Py_ssize_t a = _as_index(first), n = _as_index(count), fresh = 0
        cdef uint32_t idx, end, stop
        pg.table._check_span(a, n)
        idx = <uint32_t>a
        end = <uint32_t>(a + n)
        self._lock()
        try:
            while idx < end:
                if end - idx >= NOGIL_PAGES:
                    pg.table._acquire()
                    with nogil:
                        stop = self._touch_fast(pg, idx, end, write, &fresh)
                    pg.table._release()
                    idx = stop
                    if idx == end:
                        break
                if (stop_on_purged and pg.slots[idx] == 0
                        and pg.table._state(idx) == SIM_STATE_PURGED):
                    break
                fresh += self._fault(pg, idx, write)
                idx += 1
            return idx - <uint32_t>a, fresh
        finally:
            self._unlock()

    def read(self, Pager pg, page, Py_ssize_t offset, Py_ssize_t n) -> bytes:
        """Bytes [offset, offset+n) of a resident page."""
        cdef uint32_t p = pg.table._check_page(page), f = pg.slots[p]
        if f == 0 or (f & SIM_SWAPPED):
            raise RuntimeError(f"page {page} is not resident: fault it in first")
        if offset < 0 or n < 0 or offset + n > self.page_size:
            raise ValueError(f"bytes [{offset}, {offset + n}) are outside a page")
        self._lock()
        try:
            return (<char *>self._page(f))[offset:offset + n]
        finally:
            self._unlock()

    def write(self, Pager pg, page, Py_ssize_t offset, const unsigned char[:] data) -> None:
        """Store data at offset in a resident page that is private (faulted in for writing)."""
        cdef uint32_t p = pg.table._check_page(page), f = pg.slots[p]
        cdef Py_ssize_t n = data.shape[0]
        if f == 0 or (f & SIM_SWAPPED):
            raise RuntimeError(f"page {page} is not resident: fault it in first")
        if offset < 0 or offset + n > self.page_size:
            raise ValueError(f"bytes [{offset}, {offset + n}) are outside a page")
        if self.frames[f].mapcount > 1 and not pg.shared:
            raise RuntimeError(
                f"page {page} is shared copy-on-write: fault it in for writing first")
        if n:
            self._lock()
            memcpy(self._page(f) + offset, &data[0], n)
            self.frames[f].flags |= SIM_DATA
            self._unlock()

    # ---------------------------------------------------------------- madvise helpers

    cdef Py_ssize_t _drop(self, Pager pg, uint32_t a, uint32_t b) noexcept nogil:
        cdef Py_ssize_t dropped = 0
        cdef uint32_t idx, s
        for idx in range(a, b):
            s = pg.slots[idx]
            if s == 0:
                continue
            dropped += 1
            pg.slots[idx] = 0
            if s & SIM_SWAPPED:
                self._swap_put(s & ~SIM_SWAPPED)
            else:
                self.frames[s].mapcount -= 1
                if self.frames[s].mapcount == 0:
                    self._free_frame(s)
        pg.table._discard(a, b)
        return dropped

    def discard(self, Pager pg, first, count) -> int:
        """Unmap pages without a purge (MADV_DONTNEED, munmap); returns frames and slots dropped."""
        cdef Py_ssize_t a = _as_index(first), n = _as_index(count), dropped
        pg.table._check_span(a, n)
        self._lock()
        pg.table._acquire()
        try:
            if n < NOGIL_PAGES:
                return self._drop(pg, <uint32_t>a, <uint32_t>(a + n))
            with nogil:
                dropped = self._drop(pg, <uint32_t>a, <uint32_t>(a + n))
            return dropped
        finally:
            pg.table._release()
            self._unlock()

    cdef Py_ssize_t _lazyfree(self, Pager pg, uint32_t a, uint32_t b) noexcept nogil:
        cdef Py_ssize_t made = 0
        cdef uint32_t idx, s
        for idx in range(a, b):
            s = pg.slots[idx]
            if s & SIM_SWAPPED:
                pg.slots[idx] = 0
                self._swap_put(s & ~SIM_SWAPPED)
                pg.table._discard(idx, idx + 1)
            elif s and self.frames[s].mapcount == 1 and not (self.frames[s].flags & SIM_LAZYFREE):
                self.frames[s].flags |= SIM_LAZYFREE
                self.nlazyfree += 1
                made += 1
        # Linux's MADV_FREE visits every page table entry of the range.
        self.madv_free_visits += b - a
        return made

    def lazyfree(self, Pager pg, first, count) -> int:
        """MADV_FREE: make exclusive resident pages lazily freeable, drop swapped ones; returns
        pages made lazy.  Pages shared copy-on-write are left alone, as Linux does."""
        cdef Py_ssize_t a = _as_index(first), n = _as_index(count), made
        pg.table._check_span(a, n)
        self._lock()
        pg.table._acquire()
        try:
            if n < NOGIL_PAGES:
                return self._lazyfree(pg, <uint32_t>a, <uint32_t>(a + n))
            with nogil:
                made = self._lazyfree(pg, <uint32_t>a, <uint32_t>(a + n))
            return made
        finally:
            pg.table._release()
            self._unlock()

    cdef void _share(self, Pager parent, Pager child, uint32_t n) noexcept nogil:
        cdef uint32_t idx, s
        for idx in range(n):
            s = parent.slots[idx]
            child.slots[idx] = s
            if s & SIM_SWAPPED:
                self.swap_refs[s & ~SIM_SWAPPED] += 1
            elif s:
                self.frames[s].mapcount += 1

    def fork_into(self, Pager parent, Pager child) -> None:
        """Make child a copy-on-write copy of parent's pages [0, top), volatility included."""
        cdef Py_ssize_t n = parent.top
        cdef uint32_t idx, s
        if (child.npages < n or child.owner != parent.owner or child.top
                or child.table.walk != parent.table.walk):
            raise ValueError(
                "the child must be a fresh Pager of the parent's size, group and strategy")
        self._lock()
        try:
            for idx in range(<uint32_t>n):
                s = parent.slots[idx]
                if s & SIM_SWAPPED:
                    if self.swap_refs[s & ~SIM_SWAPPED] == 0xffff:
                        raise OSError(EAGAIN, "too many processes share a swapped page")
                elif s and self.frames[s].mapcount == 0xffff:
                    raise OSError(EAGAIN, "too many processes share a page")
            parent.table._acquire()
            try:
                _clone_pagetable(parent.table, child.table, n)
            finally:
                parent.table._release()
            with nogil:
                self._share(parent, child, <uint32_t>n)
            child.top = n
        finally:
            self._unlock()

    # ---------------------------------------------------------------- reclaim

    cdef int _discardable(self, uint32_t f) except -1:
        """1 if every mapping of frame f is volatile (and it is mapped at all)."""
        cdef uint32_t idx = self.frames[f].index
        cdef Pager pg
        cdef int found = 0
        if self.frames[f].flags & SIM_PINNED:
            return 0
        for pg in self.owners[self.frames[f].owner]:
            if idx < pg.npages and pg.slots[idx] == f:
                if pg.table._find(idx) < 0:
                    return 0
                found += 1
        return 1 if found else 0

    cdef int _unmap_all(self, uint32_t f, bint purge) except -1:
        """Take frame f from every mapping: a purge (volatile) or a lazy free's discard."""
        cdef uint32_t idx = self.frames[f].index
        cdef Pager pg
        for pg in self.owners[self.frames[f].owner]:
            if idx < pg.npages and pg.slots[idx] == f:
                pg.slots[idx] = 0
                if purge:
                    if not pg.table.purge(idx):
                        raise AssertionError(f"page {idx} of {pg!r} was mapped but not purgeable")
                else:
                    pg.table._acquire()
                    pg.table._discard(idx, idx + 1)
                    pg.table._release()
        self._free_frame(f)
        return 0

    cdef int _swap_out(self, uint32_t f) except -1:
        cdef uint32_t idx = self.frames[f].index, slot
        cdef uint16_t refs = 0
        cdef Pager pg
        self.nswap_free -= 1
        slot = self.swap_free[self.nswap_free]
        if self.frames[f].flags & SIM_DATA:
            memcpy(self.swap + <size_t>slot * self.page_size, self._page(f), self.page_size)
            self.swap_dirty[slot] = 1
        for pg in self.owners[self.frames[f].owner]:
            if idx < pg.npages and pg.slots[idx] == f:
                pg.slots[idx] = SIM_SWAPPED | slot
                refs += 1
        self.swap_refs[slot] = refs
        self._free_frame(f)
        self.swap_outs += 1
        return 0

    cdef bint _aging_needed(self) noexcept:
        # Swapless aging policy: scan for discardable pages only while some range is volatile or
        # some page lazily freed (counted per range, not per page, so marking stays O(1)).
        cdef Pager pg
        if self.force_aging or self.nlazyfree:
            return True
        for group in self.owners:
            for pg in group:
                if pg.table.nranges:
                    return True
        return False

    cdef Py_ssize_t _reclaim(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t freed = 0
        cdef uint32_t f, prev
        cdef int discardable
        if self._aging_needed():
            f = self.lru_tail
            while f and freed < n:
                prev = self.frames[f].prev
                self.reclaim_scanned += 1
                discardable = self._discardable(f)
                if discardable:
                    self._unmap_all(f, True)
                    self.purged_pages += 1
                    freed += 1
                elif (self.frames[f].flags & SIM_LAZYFREE
                      and not (self.frames[f].flags & SIM_PINNED)):
                    self._unmap_all(f, False)
                    self.lazy_freed += 1
                    freed += 1
                f = prev
        if freed < n and self.nswap_free:
            f = self.lru_tail
            while f and freed < n and self.nswap_free:
                prev = self.frames[f].prev
                self.reclaim_scanned += 1
                if not (self.frames[f].flags & SIM_PINNED):
                    self._swap_out(f)
                    freed += 1
                f = prev
        self.reclaimed += <uint64_t>freed
        return freed

    def reclaim(self, npages) -> int:
        """Free up to npages: discardable pages first, least recently used first, then swap."""
        cdef Py_ssize_t n = _as_index(npages)
        if n < 0:
            raise ValueError(f"npages must not be negative, got {npages!r}")
        self._lock()
        try:
            return self._reclaim(n)
        finally:
            self._unlock()

    # ---------------------------------------------------------------- inspection

    def discardable_pages(self) -> int:
        """Resident frames that reclaim could purge now: every mapping of them is volatile."""
        cdef uint32_t f
        cdef Py_ssize_t count = 0
        self._lock()
        try:
            f = self.lru_head
            while f:
                count += self._discardable(f)
                f = self.frames[f].next
            return count
        finally:
            self._unlock()

    def lru(self) -> list:
        """Frames from least to most recently used, as (owner, index, mapcount)."""
        cdef uint32_t f
        out = []
        self._lock()
        try:
            f = self.lru_tail
            while f:
                out.append((self.frames[f].owner, self.frames[f].index, self.frames[f].mapcount))
                f = self.frames[f].prev
            return out
        finally:
            self._unlock()

    def mapcount(self, uint32_t frame) -> int:
        """How many mappings share a frame (0 if free)."""
        if frame == 0 or frame > self.nframes:
            raise IndexError(f"frame {frame} does not exist (frames 1..{self.nframes})")
        return self.frames[frame].mapcount

    def swap_used(self) -> int:
        """Swap slots in use."""
        return self.nswap - self.nswap_free

    @property
    def nbytes(self) -> int:
        """Bytes of bookkeeping of the physical side (frame table and swap tables)."""
        return ((self.nframes + 1) * sizeof(SimFrame)
                + self.nswap * (sizeof(uint16_t) + 1 + sizeof(uint32_t)))


cdef int _clone_pagetable(PageTable src, PageTable dst, Py_ssize_t npages) except -1:
    """Copy pages [0, npages) and every volatile range of src into the empty table dst (fork)."""
    cdef Py_ssize_t k
    cdef VolatileRange *r
    if dst.nranges or dst.npages < npages or dst.token_bits != src.token_bits:
        raise ValueError("fork needs an empty PageTable of the same size and token width")
    dst._reserve(src.nranges)
    for k in range(src.nranges):
        dst.ranges[k] = src.ranges[k]
        dst.ranges[k].purged = NULL
        dst.ranges[k].cap = 0
        dst.ranges[k].npurged = 0
    try:
        for k in range(src.nranges):
            r = &src.ranges[k]
            if r.npurged:
                dst.ranges[k].purged = <uint32_t *>malloc(r.npurged * sizeof(uint32_t))
                if dst.ranges[k].purged == NULL:
                    raise MemoryError("cannot copy a purge record")
                memcpy(dst.ranges[k].purged, r.purged, r.npurged * sizeof(uint32_t))
                dst.ranges[k].cap = r.npurged
                dst.ranges[k].npurged = r.npurged
    except MemoryError:
        for k in range(src.nranges):
            free(dst.ranges[k].purged)
        raise
    dst.nranges = src.nranges
    memcpy(dst.entries, src.entries, npages * sizeof(uint32_t))
    dst.next_token = src.next_token
    return 0
