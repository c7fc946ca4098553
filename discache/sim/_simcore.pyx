# The physical side of discache.sim: frames, swap, page faults and CLOCK reclaim.
# Included by _sim.pyx; declared in _simcore.pxd.  Volatility itself lives in each Pager's
# PageTable; this file only asks it (_find, _lower, _state) and tells it (populate, discard, purge).
#
# Reclaim keeps no per-frame LRU and no reverse map.  Each access sets a frame's referenced bit;
# reclaim moves a clock hand over the page tables of every address space and file (over their
# volatile ranges only, unless pages were lazily freed or always_age is set), clears the bit of a
# candidate that has it (its second chance) and frees a candidate that does not, as Linux's
# page_referenced()/CLOCK does.  A frame shared after fork sits at the same page of every Pager of
# its fork family, so those Pagers are its reverse map.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset
from libc.errno cimport EAGAIN
from cpython.pythread cimport (
    NOWAIT_LOCK, WAIT_LOCK, PyThread_acquire_lock, PyThread_allocate_lock,
    PyThread_free_lock, PyThread_release_lock,
)

cdef extern from *:
    """
    #define SIM_SWAPPED    0x80000000u
    #define SIM_LAZYFREE   0x01u
    #define SIM_PINNED     0x02u
    #define SIM_DATA       0x04u
    #define SIM_REFERENCED 0x08u
    #define SIM_MAX_FRAMES 0x7fffffffu
    """
    const uint32_t SIM_SWAPPED
    const uint8_t SIM_LAZYFREE
    const uint8_t SIM_PINNED
    const uint8_t SIM_DATA
    const uint8_t SIM_REFERENCED
    const uint32_t SIM_MAX_FRAMES

# Direct reclaim frees this many pages at once, as Linux's SWAP_CLUSTER_MAX.
SIM_RECLAIM_BATCH = 32
SWAPPED_BIT = SIM_SWAPPED
cdef Py_ssize_t RECLAIM_BATCH = 32
cdef int SIM_STATE_PURGED = 3      # PageTable's STATE_PURGED

# Reclaim phases: discard volatile pages found through the volatile ranges; discard volatile or
# lazily freed pages found by visiting every page; swap pages out.
cdef enum:
    PHASE_VOLATILE = 0
    PHASE_ALL = 1
    PHASE_SWAP = 2

# Why _scan returned before the end of its span.
cdef enum:
    SCAN_DONE = 0        # it did not: the span is done
    SCAN_ENOUGH = 1      # enough pages freed (or swap is full)
    SCAN_SHARED = 2      # a frame mapped by several processes: decide it with the GIL
    SCAN_NOMEM = 3       # a purge record could not grow
    SCAN_BROKEN = 4      # a resident page its PageTable does not hold: a bug


cdef class SimCore:
    """Physical memory of a simulated kernel: frames with referenced bits, swap, faults, reclaim."""

    def __cinit__(self, ram_pages, swap_pages=0, page_size=4096):
        cdef Py_ssize_t nram = _as_index(ram_pages), nswap = _as_index(swap_pages)
        cdef Py_ssize_t psize = _as_index(page_size)
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
        self.mapcounts = <uint16_t *>calloc(nram + 1, sizeof(uint16_t))
        self.fflags = <uint8_t *>calloc(nram + 1, sizeof(uint8_t))
        # calloc of a large block maps zero pages lazily: untouched simulated RAM costs no real RAM.
        self.ram = <unsigned char *>calloc(nram, psize)
        if self.mapcounts == NULL or self.fflags == NULL or self.ram == NULL:
            raise MemoryError(f"cannot allocate {nram} simulated frames of {psize} bytes")
        freemap_init(&self.free_frames, <uint32_t>nram)
        if nswap:
            self.swap = <unsigned char *>calloc(nswap, psize)
            self.swap_refs = <uint16_t *>calloc(nswap, sizeof(uint16_t))
            self.swap_dirty = <unsigned char *>calloc(nswap, 1)
            if self.swap == NULL or self.swap_refs == NULL or self.swap_dirty == NULL:
                raise MemoryError(f"cannot allocate {nswap} simulated swap slots")
            freemap_init(&self.free_slots, <uint32_t>nswap)
        self.owners = []
        self.pagers = []
        self.mutex = PyThread_allocate_lock()
        if self.mutex == NULL:
            raise MemoryError("cannot allocate the simulated kernel's lock")

    def __dealloc__(self):
        if self.mutex != NULL:
            PyThread_free_lock(self.mutex)
        free(self.mapcounts)
        free(self.fflags)
        free(self.ram)
        free(self.swap)
        free(self.swap_refs)
        free(self.swap_dirty)
        freemap_release(&self.free_frames)
        freemap_release(&self.free_slots)

    @property
    def nfree(self) -> int:
        """Free frames."""
        return self.free_frames.nfree

    @property
    def nswap_free(self) -> int:
        """Free swap slots."""
        return self.free_slots.nfree

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
        """Add a Pager to its rmap group and to the clock's circle, so reclaim finds its pages."""
        self._lock()
        try:
            self.owners[pg.owner].append(pg)
            self.pagers.append(pg)
        finally:
            self._unlock()

    def detach(self, Pager pg) -> None:
        """Remove a Pager (whose pages are all discarded) from its rmap group and the circle."""
        cdef Py_ssize_t k, h
        self._lock()
        try:
            group = self.owners[pg.owner]
            for k in range(len(group)):
                if group[k] is pg:
                    del group[k]
                    break
            for k in range(len(self.pagers)):
                if self.pagers[k] is pg:
                    del self.pagers[k]
                    for h in range(2):
                        # the hands keep pointing at the same Pager, or at the next one
                        if self.hand_pager[h] > k:
                            self.hand_pager[h] -= 1
                        elif self.hand_pager[h] == k:
                            self.hand_page[h] = 0
                    break
        finally:
            self._unlock()

    # ---------------------------------------------------------------- frames

    cdef unsigned char *_page(self, uint32_t f) noexcept nogil:
        return self.ram + <size_t>(f - 1) * self.page_size

    cdef uint32_t _alloc(self) except 0:
        if self.free_frames.nfree == 0:
            self.direct_reclaims += 1
            self._reclaim(RECLAIM_BATCH)
            if self.free_frames.nfree == 0:
                raise MemoryError(
                    f"simulated RAM is full ({self.nframes} pages) and nothing can be reclaimed: "
                    f"no page is volatile or lazily freed"
                    + (" and swap is full" if self.nswap else " and there is no swap"))
        return self._take_free()

    cdef uint32_t _take_free(self) noexcept nogil:
        cdef uint32_t f = freemap_take(&self.free_frames) + 1
        if self.fflags[f] & SIM_DATA:
            memset(self._page(f), 0, self.page_size)
        self.fflags[f] = 0
        return f

    cdef void _free_frame(self, uint32_t f) noexcept nogil:
        if self.fflags[f] & SIM_LAZYFREE:
            self.nlazyfree -= 1
        # The bytes are zeroed when the frame is reused, only if they were ever written.
        self.fflags[f] &= SIM_DATA
        self.mapcounts[f] = 0
        freemap_put(&self.free_frames, f - 1)

    cdef void _map_new(self, uint32_t f, Pager pg, uint32_t idx) noexcept nogil:
        self.mapcounts[f] = 1
        self.fflags[f] |= SIM_REFERENCED
        pg.slots[idx] = f

    cdef void _swap_put(self, uint32_t slot) noexcept nogil:
        self.swap_refs[slot] -= 1
        if self.swap_refs[slot] == 0:
            if self.swap_dirty[slot]:
                memset(self.swap + <size_t>slot * self.page_size, 0, self.page_size)
                self.swap_dirty[slot] = 0
            freemap_put(&self.free_slots, slot)

    cdef uint32_t _swap_take(self, uint32_t f) noexcept nogil:
        """A swap slot holding a copy of frame f's bytes (a free slot must exist)."""
        cdef uint32_t slot = freemap_take(&self.free_slots)
        if self.fflags[f] & SIM_DATA:
            memcpy(self.swap + <size_t>slot * self.page_size, self._page(f), self.page_size)
            self.swap_dirty[slot] = 1
        self.swap_outs += 1
        return slot

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
                self.fflags[f] |= SIM_DATA
            self._swap_put(slot)
            self._map_new(f, pg, idx)
            self.faults += 1
            self.swap_ins += 1
        else:
            f = s
            if write and self.mapcounts[f] > 1 and not pg.shared:
                # Copy on write; the source is pinned so that direct reclaim cannot take it.
                self.fflags[f] |= SIM_PINNED
                try:
                    g = self._alloc()
                finally:
                    self.fflags[f] &= ~SIM_PINNED
                if self.fflags[f] & SIM_DATA:
                    memcpy(self._page(g), self._page(f), self.page_size)
                    self.fflags[g] |= SIM_DATA
                self.mapcounts[f] -= 1
                self._map_new(g, pg, idx)
                self.faults += 1
                self.cow_faults += 1
                f = g
            else:
                self.fflags[f] |= SIM_REFERENCED
        if write and (self.fflags[f] & SIM_LAZYFREE):
            # A write after MADV_FREE re-dirties the page: the lazy free is cancelled.
            self.fflags[f] &= ~SIM_LAZYFREE
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
                if self.free_frames.nfree == 0:
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
            elif write and self.mapcounts[s] > 1 and not pg.shared:
                return idx
            else:
                self.fflags[s] |= SIM_REFERENCED
            if write and (self.fflags[s] & SIM_LAZYFREE):
                self.fflags[s] &= ~SIM_LAZYFREE
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
        if self.mapcounts[f] > 1 and not pg.shared:
            raise RuntimeError(
                f"page {page} is shared copy-on-write: fault it in for writing first")
        if n:
            self._lock()
            memcpy(self._page(f) + offset, &data[0], n)
            self.fflags[f] |= SIM_DATA
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
                self.mapcounts[s] -= 1
                if self.mapcounts[s] == 0:
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
            elif s and self.mapcounts[s] == 1 and not (self.fflags[s] & SIM_LAZYFREE):
                self.fflags[s] |= SIM_LAZYFREE
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

    def pageout(self, Pager pg, first, count) -> int:
        """MADV_PAGEOUT: reclaim pages [first, first+count) of pg now; returns the pages freed.

        As Linux's madvise, only frames this mapping alone maps are taken (a frame shared after
        fork is left alone): a volatile page is purged, a lazily freed one dropped, any other
        swapped out if a swap slot is free, else kept.  Referenced bits do not matter."""
        cdef Py_ssize_t a = _as_index(first), n = _as_index(count), freed = 0
        cdef uint32_t idx, s, slot
        cdef int done
        pg.table._check_span(a, n)
        self._lock()
        pg.table._acquire()
        try:
            for idx in range(<uint32_t>a, <uint32_t>(a + n)):
                s = pg.slots[idx]
                if s == 0 or (s & SIM_SWAPPED) or (self.fflags[s] & SIM_PINNED):
                    continue
                if self.mapcounts[s] > 1:
                    continue
                if pg.table._find(idx) >= 0:
                    done = pg.table._purge(idx)
                    if done < 0:
                        raise MemoryError("cannot grow a purge record")
                    if done == 0:
                        raise AssertionError(f"page {idx} of {pg!r} was mapped but not purgeable")
                    pg.slots[idx] = 0
                    self.purged_pages += 1
                elif self.fflags[s] & SIM_LAZYFREE:
                    pg.table._discard(idx, idx + 1)
                    pg.slots[idx] = 0
                    self.lazy_freed += 1
                elif self.free_slots.nfree:
                    slot = self._swap_take(s)
                    self.swap_refs[slot] = 1
                    pg.slots[idx] = SIM_SWAPPED | slot
                else:
                    continue
                self._free_frame(s)
                freed += 1
            self.reclaimed += <uint64_t>freed
            return freed
        finally:
            pg.table._release()
            self._unlock()

    def cold(self, Pager pg, first, count) -> int:
        """MADV_COLD: clear the referenced bit of the frames only pg maps among pages
        [first, first+count), so reclaim takes them first; returns how many it cleared."""
        cdef Py_ssize_t a = _as_index(first), n = _as_index(count), cleared = 0
        cdef uint32_t idx, s
        pg.table._check_span(a, n)
        self._lock()
        try:
            for idx in range(<uint32_t>a, <uint32_t>(a + n)):
                s = pg.slots[idx]
                if s == 0 or (s & SIM_SWAPPED) or self.mapcounts[s] > 1:
                    continue
                if self.fflags[s] & SIM_REFERENCED:
                    self.fflags[s] &= ~SIM_REFERENCED
                    cleared += 1
            return cleared
        finally:
            self._unlock()

    cdef void _share(self, Pager parent, Pager child, uint32_t n) noexcept nogil:
        cdef uint32_t idx, s
        for idx in range(n):
            s = parent.slots[idx]
            child.slots[idx] = s
            if s & SIM_SWAPPED:
                self.swap_refs[s & ~SIM_SWAPPED] += 1
            elif s:
                self.mapcounts[s] += 1

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
                elif s and self.mapcounts[s] == 0xffff:
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

    cdef int _family_verdict(self, Pager pg, uint32_t idx, bint need_volatile) except -2:
        """For the frame at page idx of pg, mapped by several Pagers of pg's fork family: -1 if
        another of them maps it first (it decides the frame, once per lap), else 1 if it is
        unpinned and (unless need_volatile is false) volatile in every mapping, 0 if not."""
        cdef uint32_t f = pg.slots[idx]
        cdef Pager other
        cdef bint first = True
        cdef int verdict = 0 if self.fflags[f] & SIM_PINNED else 1
        for other in self.owners[pg.owner]:
            if idx < other.npages and other.slots[idx] == f:
                if first and other is not pg:
                    return -1
                first = False
                if need_volatile and other.table._find(idx) < 0:
                    verdict = 0
        return verdict

    cdef int _unmap_family(self, Pager pg, uint32_t idx, bint purge) except -1:
        """Take the frame at page idx of pg from every mapping in the family: a purge (volatile)
        or a lazy free's discard."""
        cdef uint32_t f = pg.slots[idx]
        cdef uint16_t removed = 0
        cdef Pager other
        cdef int done
        try:
            for other in self.owners[pg.owner]:
                if idx < other.npages and other.slots[idx] == f:
                    other.table._acquire()
                    try:
                        if purge:
                            done = other.table._purge(idx)
                            if done < 0:
                                raise MemoryError("cannot grow a purge record")
                            if done == 0:
                                raise AssertionError(
                                    f"page {idx} of {other!r} was mapped but not purgeable")
                        else:
                            other.table._discard(idx, idx + 1)
                        other.slots[idx] = 0
                        removed += 1
                    finally:
                        other.table._release()
        finally:
            # If a purge record could not grow, the mappings already purged report it and the
            # others keep the frame: the mapcount must say so.
            if removed == self.mapcounts[f]:
                self._free_frame(f)
            else:
                self.mapcounts[f] -= removed
        return 0

    cdef int _swap_out_family(self, Pager pg, uint32_t idx) except -1:
        """Swap the frame at page idx of pg out of every mapping in the family (one slot)."""
        cdef uint32_t f = pg.slots[idx], slot = self._swap_take(f)
        cdef uint16_t refs = 0
        cdef Pager other
        for other in self.owners[pg.owner]:
            if idx < other.npages and other.slots[idx] == f:
                other.slots[idx] = SIM_SWAPPED | slot
                refs += 1
        self.swap_refs[slot] = refs
        self._free_frame(f)
        return 0

    cdef int _visit(self, Pager pg, uint32_t idx, bint volatile, int phase,
                    ScanState *st) noexcept nogil:
        """One step of the clock at page idx of pg (table locked): 0 to go on, 1 to stop with
        st.stop saying why."""
        cdef uint32_t s = pg.slots[idx], slot
        cdef uint8_t flags
        cdef int done
        st.scanned += 1
        if s == 0 or (s & SIM_SWAPPED):
            return 0
        flags = self.fflags[s]
        if flags & SIM_PINNED:
            return 0
        if phase != PHASE_SWAP and not volatile and not (flags & SIM_LAZYFREE):
            return 0
        if self.mapcounts[s] > 1:
            st.scanned -= 1
            st.stop = SCAN_SHARED
            return 1
        if flags & SIM_REFERENCED:
            self.fflags[s] = flags & ~SIM_REFERENCED
            st.cleared += 1
            return 0
        if phase == PHASE_SWAP:
            slot = self._swap_take(s)
            self.swap_refs[slot] = 1
            pg.slots[idx] = SIM_SWAPPED | slot
        elif volatile:
            done = pg.table._purge(idx)
            if done <= 0:
                st.scanned -= 1
                st.stop = SCAN_NOMEM if done < 0 else SCAN_BROKEN
                return 1
            pg.slots[idx] = 0
            self.purged_pages += 1
        else:
            pg.table._discard(idx, idx + 1)
            pg.slots[idx] = 0
            self.lazy_freed += 1
        self._free_frame(s)
        st.freed += 1
        if st.freed >= st.want or (phase == PHASE_SWAP and self.free_slots.nfree == 0):
            st.stop = SCAN_ENOUGH
            return 1
        return 0

    cdef int _visit_shared(self, Pager pg, uint32_t idx, int phase, ScanState *st) except -1:
        """_visit for a frame shared by several processes after fork, decided by the first of
        them in the family so that it gets one chance per lap; 1 if enough was freed."""
        cdef uint32_t f = pg.slots[idx]
        cdef int verdict
        st.scanned += 1
        verdict = self._family_verdict(pg, idx, phase != PHASE_SWAP)
        if verdict < 0 or self.fflags[f] & SIM_PINNED:
            return 0
        if phase != PHASE_SWAP and verdict == 0 and not (self.fflags[f] & SIM_LAZYFREE):
            return 0
        if self.fflags[f] & SIM_REFERENCED:
            self.fflags[f] &= ~SIM_REFERENCED
            st.cleared += 1
            return 0
        if phase == PHASE_SWAP:
            self._swap_out_family(pg, idx)
        else:
            self._unmap_family(pg, idx, verdict == 1)
            if verdict == 1:
                self.purged_pages += 1
            else:
                self.lazy_freed += 1
        st.freed += 1
        return st.freed >= st.want or (phase == PHASE_SWAP and self.free_slots.nfree == 0)

    cdef uint32_t _scan(self, Pager pg, uint32_t lo, uint32_t hi, int phase,
                        ScanState *st) noexcept nogil:
        """Move the clock over pages [lo, hi) of pg: only its volatile ranges in PHASE_VOLATILE,
        every page otherwise.  Returns hi, or where it stopped with st.stop set: the page after
        the one that freed enough, or the page that needs the GIL or failed."""
        cdef Py_ssize_t k
        cdef uint32_t idx = lo, a, b, q
        cdef bint volatile
        PyThread_acquire_lock(pg.table.mutex, WAIT_LOCK)
        k = pg.table._lower(lo)
        while idx < hi:
            if k < pg.table.nranges and pg.table.ranges[k].first <= idx:
                a, b, volatile = idx, _min32(hi, pg.table.ranges[k].end), True
            elif phase == PHASE_VOLATILE:
                if k >= pg.table.nranges or pg.table.ranges[k].first >= hi:
                    break
                a, b, volatile = pg.table.ranges[k].first, _min32(hi, pg.table.ranges[k].end), True
            else:
                b = hi if k >= pg.table.nranges else _min32(hi, pg.table.ranges[k].first)
                a, volatile = idx, False
            for q in range(a, b):
                if self._visit(pg, q, volatile, phase, st):
                    PyThread_release_lock(pg.table.mutex)
                    return q + 1 if st.stop == SCAN_ENOUGH else q
            idx = b
            if volatile and b == pg.table.ranges[k].end:
                k += 1
        PyThread_release_lock(pg.table.mutex)
        return hi

    cdef int _lap(self, int phase, ScanState *st) except -1:
        """One turn of the phase's clock hand over every Pager, from where it last stopped."""
        cdef list pagers = self.pagers
        cdef Py_ssize_t npagers = len(pagers), j, place, start
        cdef int h = 1 if phase == PHASE_SWAP else 0
        cdef uint32_t page, lo, hi, idx
        cdef Pager pg
        if npagers == 0:
            return 0
        start = self.hand_pager[h] if self.hand_pager[h] < npagers else 0
        page = self.hand_page[h] if self.hand_pager[h] < npagers else 0
        for j in range(npagers + 1):
            place = (start + j) % npagers
            pg = pagers[place]
            if phase == PHASE_VOLATILE and pg.table.nranges == 0:
                continue
            lo = page if j == 0 else 0
            hi = <uint32_t>pg.top if j < npagers else _min32(page, <uint32_t>pg.top)
            idx = lo
            while idx < hi:
                st.stop = SCAN_DONE
                if hi - idx >= NOGIL_PAGES:
                    with nogil:
                        idx = self._scan(pg, idx, hi, phase, st)
                else:
                    idx = self._scan(pg, idx, hi, phase, st)
                if st.stop == SCAN_SHARED:
                    if self._visit_shared(pg, idx, phase, st):
                        st.stop = SCAN_ENOUGH
                    idx += 1
                if st.stop == SCAN_ENOUGH:
                    self.hand_pager[h] = place
                    self.hand_page[h] = idx
                    return 0
                if st.stop == SCAN_NOMEM:
                    raise MemoryError("cannot grow a purge record")
                if st.stop == SCAN_BROKEN:
                    raise AssertionError(f"page {idx} of {pg!r} was mapped but not purgeable")
        return 0

    cdef bint _aging_needed(self) noexcept:
        # Swapless aging policy: scan for discardable pages only while some range is volatile or
        # some page lazily freed (counted per range, not per page, so marking stays O(1)).
        cdef Pager pg
        if self.force_aging or self.nlazyfree:
            return True
        for pg in self.pagers:
            if pg.table.nranges:
                return True
        return False

    cdef Py_ssize_t _reclaim(self, Py_ssize_t n) except -1:
        cdef ScanState st
        cdef int phase
        st.want = n
        st.freed = 0
        st.scanned = 0
        try:
            if n > 0 and self._aging_needed():
                # Only volatile ranges hold candidates, unless lazily freed pages (which no range
                # names) must be found too, or always_age asks for the scan of every page.
                phase = PHASE_ALL if self.force_aging or self.nlazyfree else PHASE_VOLATILE
                while True:
                    # A lap that gave no candidate a second chance left none to take next time.
                    st.cleared = 0
                    self._lap(phase, &st)
                    if st.freed >= n or st.cleared == 0:
                        break
            while st.freed < n and self.free_slots.nfree:
                st.cleared = 0
                self._lap(PHASE_SWAP, &st)
                if st.cleared == 0:
                    break
        finally:
            self.reclaim_scanned += st.scanned
            self.reclaimed += <uint64_t>st.freed
        return st.freed

    def reclaim(self, npages) -> int:
        """Free up to npages: discardable pages first, by CLOCK (referenced pages get a second
        chance), then pages to swap, by CLOCK too."""
        cdef Py_ssize_t n = _as_index(npages)
        if n < 0:
            raise ValueError(f"npages must not be negative, got {npages!r}")
        self._lock()
        try:
            return self._reclaim(n)
        finally:
            self._unlock()

    # ---------------------------------------------------------------- inspection

    cdef uint32_t _count_private(self, Pager pg, uint32_t a, uint32_t b,
                                 Py_ssize_t *count) noexcept nogil:
        """Count resident unpinned frames of pages [a, b) that only pg maps; returns b, or the
        first page whose frame is shared."""
        cdef uint32_t q, s
        for q in range(a, b):
            s = pg.slots[q]
            if s == 0 or (s & SIM_SWAPPED) or (self.fflags[s] & SIM_PINNED):
                continue
            if self.mapcounts[s] > 1:
                return q
            count[0] += 1
        return b

    def discardable_pages(self) -> int:
        """Resident frames that reclaim could purge now: every mapping of them is volatile."""
        cdef Py_ssize_t count = 0, k
        cdef uint32_t q, b
        cdef Pager pg
        self._lock()
        try:
            for pg in self.pagers:
                pg.table._acquire()
                try:
                    for k in range(pg.table.nranges):
                        q = pg.table.ranges[k].first
                        b = pg.table.ranges[k].end
                        while q < b:
                            if b - q >= NOGIL_PAGES:
                                with nogil:
                                    q = self._count_private(pg, q, b, &count)
                            else:
                                q = self._count_private(pg, q, b, &count)
                            if q < b:
                                count += self._family_verdict(pg, q, True) == 1
                                q += 1
                finally:
                    pg.table._release()
            return count
        finally:
            self._unlock()

    def resident(self) -> list:
        """Frames in use, lowest first, as (frame, mapcount, referenced, lazily freed)."""
        cdef uint32_t f
        out = []
        self._lock()
        try:
            for f in range(1, self.nframes + 1):
                if self.mapcounts[f]:
                    out.append((f, self.mapcounts[f], bool(self.fflags[f] & SIM_REFERENCED),
                                bool(self.fflags[f] & SIM_LAZYFREE)))
            return out
        finally:
            self._unlock()

    def mapcount(self, uint32_t frame) -> int:
        """How many mappings share a frame (0 if free)."""
        if frame == 0 or frame > self.nframes:
            raise IndexError(f"frame {frame} does not exist (frames 1..{self.nframes})")
        return self.mapcounts[frame]

    def swap_used(self) -> int:
        """Swap slots in use."""
        return self.nswap - self.free_slots.nfree

    @property
    def nbytes(self) -> int:
        """Bytes of bookkeeping of the physical side: per frame a mapcount, a flags byte and a bit
        of the free set; per swap slot a reference count, a dirty byte and a bit."""
        cdef Py_ssize_t total = (self.nframes + 1) * (sizeof(uint16_t) + sizeof(uint8_t))
        total += freemap_nbytes(&self.free_frames)
        if self.nswap:
            total += self.nswap * (sizeof(uint16_t) + 1) + freemap_nbytes(&self.free_slots)
        return total


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
