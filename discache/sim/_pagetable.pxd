from libc.stdint cimport uint32_t, uint64_t
from cpython.pythread cimport PyThread_type_lock


# One marked (volatile) range: pages [first, end), marked under `token`.
# `purged` lists the pages discarded since the mark (no duplicates), so a whole-range unmark
# answers from `npurged` alone and a sub-range unmark from this list, never from the page entries.
ctypedef struct VolatileRange:
    uint32_t first
    uint32_t end
    uint32_t token
    uint32_t npurged
    uint32_t cap
    uint32_t *purged


cdef class PageTable:
    cdef uint32_t *entries            # per page: PRESENT | LOST | token
    cdef VolatileRange *ranges        # sorted by first, disjoint
    cdef Py_ssize_t nranges
    cdef Py_ssize_t ranges_cap
    cdef readonly Py_ssize_t npages
    cdef readonly int token_bits
    cdef uint32_t token_mask
    cdef uint32_t next_token
    cdef bint walk
    cdef readonly uint64_t pte_visits
    cdef readonly uint64_t record_visits
    cdef readonly uint64_t renumbers
    cdef readonly uint64_t token_wraps
    cdef PyThread_type_lock mutex

    cdef int _acquire(self) except -1
    cdef void _release(self) noexcept
    cdef Py_ssize_t _find(self, uint32_t page) noexcept nogil
    cdef Py_ssize_t _lower(self, uint32_t first) noexcept nogil
    cdef int _reserve(self, Py_ssize_t count) except -1
    cdef void _splice(self, Py_ssize_t i, Py_ssize_t j,
                      VolatileRange *pieces, Py_ssize_t npieces) noexcept
    cdef int _check_span(self, Py_ssize_t first, Py_ssize_t count) except -1
    cdef uint32_t _check_page(self, object page) except? 0xffffffff
    cdef Py_ssize_t _populate(self, uint32_t a, uint32_t b) noexcept nogil
    cdef Py_ssize_t _discard(self, uint32_t a, uint32_t b) noexcept nogil
    cdef int _mark(self, uint32_t a, uint32_t b) except -1
    cdef bint _unmark(self, uint32_t a, uint32_t b) except -1
    cdef bint _walk_clear(self, uint32_t lo, uint32_t hi) noexcept nogil
    cdef int _state(self, uint32_t p) noexcept
    cdef int _purge(self, uint32_t p) noexcept nogil
    cdef uint32_t _new_token(self) noexcept nogil
    cdef void _renumber(self) noexcept nogil
