from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from cpython.pythread cimport PyThread_type_lock


# Progress of one reclaim call, shared by the span scans of its laps.
ctypedef struct ScanState:
    Py_ssize_t want                   # pages to free
    Py_ssize_t freed
    Py_ssize_t cleared                # candidates given a second chance in the current lap
    uint64_t scanned                  # page entries visited
    int stop                          # why a span scan returned early (SCAN_* in _simcore.pyx)


# The simulated physical memory and swap of discache.sim: frames, faults and CLOCK reclaim.
# A frame costs 3 bytes (mapcount, flags) and a bit of the free set; it keeps no LRU links and no
# reverse map: reclaim walks the page tables (Pagers), and a frame shared after fork sits at the
# same page of every Pager of its fork family.
cdef class SimCore:
    cdef uint16_t *mapcounts          # per frame (1..nframes): mappings of it; 0 when free
    cdef uint8_t *fflags              # per frame: SIM_DATA, SIM_LAZYFREE, SIM_PINNED, SIM_REFERENCED
    cdef FreeMap free_frames          # bit f-1 set <=> frame f is free
    cdef unsigned char *ram           # nframes * page_size bytes, zero until written
    cdef unsigned char *swap          # nswap * page_size bytes
    cdef uint16_t *swap_refs          # per swap slot: how many slots of Pagers point at it
    cdef unsigned char *swap_dirty    # per swap slot: its bytes may be non-zero
    cdef FreeMap free_slots           # bit s set <=> swap slot s is free
    cdef readonly uint32_t nframes
    cdef readonly uint32_t nswap
    cdef readonly uint32_t page_size
    cdef readonly uint32_t nlazyfree
    cdef PyThread_type_lock mutex
    cdef list owners                  # owner id -> list of the Pagers in that rmap group
    cdef list pagers                  # every attached Pager in attach order: the clock's circle
    cdef Py_ssize_t hand_pager[2]     # clock hands (discard, swap): a Pager's place in pagers...
    cdef uint32_t hand_page[2]        # ...and a page of it
    cdef public bint force_aging      # scan every page for discardable ones, even with none volatile
    cdef readonly uint64_t faults
    cdef readonly uint64_t zero_page_faults
    cdef readonly uint64_t cow_faults
    cdef readonly uint64_t swap_ins
    cdef readonly uint64_t swap_outs
    cdef readonly uint64_t purged_pages
    cdef readonly uint64_t lazy_freed
    cdef readonly uint64_t reclaim_scanned
    cdef readonly uint64_t reclaimed
    cdef readonly uint64_t direct_reclaims
    cdef readonly uint64_t madv_free_visits

    cdef unsigned char *_page(self, uint32_t f) noexcept nogil
    cdef int _lock(self) except -1
    cdef void _unlock(self) noexcept
    cdef uint32_t _alloc(self) except 0
    cdef uint32_t _take_free(self) noexcept nogil
    cdef void _free_frame(self, uint32_t f) noexcept nogil
    cdef void _map_new(self, uint32_t f, Pager pg, uint32_t idx) noexcept nogil
    cdef uint32_t _touch_fast(self, Pager pg, uint32_t a, uint32_t b, bint write,
                              Py_ssize_t *fresh) noexcept nogil
    cdef Py_ssize_t _drop(self, Pager pg, uint32_t a, uint32_t b) noexcept nogil
    cdef Py_ssize_t _lazyfree(self, Pager pg, uint32_t a, uint32_t b) noexcept nogil
    cdef void _share(self, Pager parent, Pager child, uint32_t n) noexcept nogil
    cdef void _swap_put(self, uint32_t slot) noexcept nogil
    cdef uint32_t _swap_take(self, uint32_t f) noexcept nogil
    cdef int _fault(self, Pager pg, uint32_t idx, bint write) except -1
    cdef int _family_verdict(self, Pager pg, uint32_t idx, bint need_volatile) except -2
    cdef int _unmap_family(self, Pager pg, uint32_t idx, bint purge) except -1
    cdef int _swap_out_family(self, Pager pg, uint32_t idx) except -1
    cdef int _visit(self, Pager pg, uint32_t idx, bint volatile, int phase,
                    ScanState *st) noexcept nogil
    cdef int _visit_shared(self, Pager pg, uint32_t idx, int phase, ScanState *st) except -1
    cdef uint32_t _scan(self, Pager pg, uint32_t lo, uint32_t hi, int phase,
                        ScanState *st) noexcept nogil
    cdef int _lap(self, int phase, ScanState *st) except -1
    cdef bint _aging_needed(self) noexcept
    cdef Py_ssize_t _reclaim(self, Py_ssize_t n) except -1
    cdef uint32_t _count_private(self, Pager pg, uint32_t a, uint32_t b,
                                 Py_ssize_t *count) noexcept nogil
