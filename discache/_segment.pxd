from libc.stdint cimport uint64_t, uint8_t


cdef class Segment:
    cdef char *base
    cdef size_t page
    cdef readonly Py_ssize_t npages
    cdef readonly Py_ssize_t nbytes
    cdef readonly str kind          # "madvfree", "memfd" or "ashmem"
    cdef int code                   # the kind as an index of SEGMENT_KINDS
    cdef readonly bint sigbus       # madvfree: discarded pages fault (userfaultfd) instead of
                                    # reading as zeros
    cdef int fd                     # the memfd or ashmem region, or -1
    cdef int uffd                   # SIGBUS mode: the userfaultfd, or -1
    cdef bint uffd_lost             # SIGBUS mode: a forked child could not register the mapping
    cdef uint64_t *saved            # madvfree: each unlocked page's first word (the cookie's place)
    cdef uint8_t *lost              # memfd: pages discarded by discard_span since their last lock
    cdef unsigned char *residency   # SIGBUS mode: a mincore vector of npages
    cdef Py_ssize_t exports         # live buffers of the mapping: close() waits for them
    cdef Py_ssize_t claimed         # pages handed out as spans: close() refuses while any are
    cdef readonly bint shared       # memfd: a file mapped by other processes too (not re-owned
                                    # by a forked child)
    cdef bint orphaned              # a forked child without a memfd of its own: pages all lost
    cdef bint busy                  # a page loop runs without the GIL: other calls must wait
    cdef readonly int reclaim_attempts  # rounds the last reclaim_span needed
    cdef object __weakref__

    cdef int _open_ashmem(self) except -1
    cdef int _register_userfaultfd(self) except -1
    cdef int _fill_missing(self, Py_ssize_t first, Py_ssize_t count) except -1
    cdef int _register(self) except -1
    cdef void _register_after_fork(self) noexcept
    cdef void _close_files(self) noexcept
    cdef int _unmap(self) except -1
    cdef int _check_span(self, Py_ssize_t first, Py_ssize_t count) except -1
    cdef int _check_open(self) except -1
    cdef Py_ssize_t _lock(self, Py_ssize_t first, Py_ssize_t count) except -1
    cdef int _unlock(self, Py_ssize_t first, Py_ssize_t count) except -1
    cdef int _punch(self, Py_ssize_t first, Py_ssize_t count) noexcept nogil
    cdef int _drop(self, Py_ssize_t first, Py_ssize_t count, uint8_t lost) except -1
    cdef int _check_unlocked_access(self) except -1
    cdef bint _copy_data_into(self, int fd) noexcept
    cdef void _own_pages_after_fork(self) noexcept


cdef class SpanBuffer:
    cdef Segment segment            # keeps the mapping alive while views exist
    cdef Py_ssize_t offset
    cdef Py_ssize_t size
    cdef readonly Py_ssize_t exports
