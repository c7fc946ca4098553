from libc.stdint cimport uint64_t


cdef class DiscardableSharedMemory:
    cdef Segment segment            # the shared memfd segment: header page, then the data
    cdef int life_fd                # this instance's own open file description of the memfd:
                                    # it write-locks byte `holder` while the instance lives
    cdef uint64_t holder            # this instance's id, unique in the segment; the state word
                                    # carries it while this instance holds the lock
    cdef bint can_recover           # life_fd is private, so a free holder byte means a dead one
    cdef char *base                 # the segment's mapping (NULL once closed)
    cdef size_t page
    cdef uint64_t *state            # the shared state word: lock bit | timestamp << 1
    cdef readonly Py_ssize_t nbytes
    cdef readonly Py_ssize_t npages
    cdef unsigned char *page_locked # per page: locked by this instance
    cdef Py_ssize_t locked_pages    # how many pages this instance holds locked
    cdef uint64_t last_usage        # microseconds; 0 is Chromium's null time
    cdef Py_ssize_t exports
    cdef bint busy                  # a punch-hole runs without the GIL; close() must wait
    cdef Py_ssize_t lockers         # lock() calls in progress: purge() yields to them
    cdef object __weakref__

    cdef int _map(self, int fd, Py_ssize_t nbytes, bint create) except -1
    cdef int _check_open(self) except -1
    cdef int _check_range(self, object offset, object length,
                          Py_ssize_t *first, Py_ssize_t *end) except -1
    cdef int _punch(self) except -1
    cdef int _join_segment(self) except -1
    cdef object _lock(self, object offset, object length)
    cdef bint _holder_alive(self, uint64_t state)
    cdef bint _take_over(self, uint64_t found) except -1
