from libc.stdint cimport uint16_t, uint32_t, uint64_t
from cpython.pythread cimport PyThread_type_lock


# One simulated physical page.  Allocated frames sit on the LRU list (prev/next, most recent at
# the head); free frames are chained through `next`.  (owner, index) is the reverse map: the page
# `index` of every Pager of group `owner` whose slot holds this frame maps it.
ctypedef struct SimFrame:
    uint32_t prev
    uint32_t next
    uint32_t owner
    uint32_t index
    uint16_t mapcount
    uint16_t flags


# The simulated physical memory and swap of discache.sim: frames, LRU, faults and reclaim.
cdef class SimCore:
    cdef SimFrame *frames             # frames[1..nframes]; 0 means "no frame"
    cdef unsigned char *ram           # nframes * page_size bytes, zero until written
    cdef unsigned char *swap          # nswap * page_size bytes
    cdef uint16_t *swap_refs          # per swap slot: how many slots of Pagers point at it
    cdef unsigned char *swap_dirty    # per swap slot: its bytes may be non-zero
    cdef uint32_t *swap_free          # stack of free swap slots
    cdef readonly uint32_t nframes
    cdef readonly uint32_t nswap
    cdef readonly uint32_t page_size
    cdef readonly uint32_t nfree
    cdef readonly uint32_t nswap_free
    cdef readonly uint32_t nlazyfree
    cdef uint32_t free_head
    cdef uint32_t lru_head
    cdef uint32_t lru_tail
    cdef PyThread_type_lock mutex
    cdef list owners                  # owner id -> list of the Pagers in that rmap group
    cdef public bint force_aging      # scan for discardable pages even with nothing volatile
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
    cdef void _lru_add(self, uint32_t f) noexcept nogil
    cdef void _lru_del(self, uint32_t f) noexcept nogil
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
    cdef int _fault(self, Pager pg, uint32_t idx, bint write) except -1
    cdef int _discardable(self, uint32_t f) except -1
    cdef int _unmap_all(self, uint32_t f, bint purge) except -1
    cdef int _swap_out(self, uint32_t f) except -1
    cdef bint _aging_needed(self) noexcept
    cdef Py_ssize_t _reclaim(self, Py_ssize_t n) except -1
