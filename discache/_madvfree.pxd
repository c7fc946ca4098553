from libc.stdint cimport uint64_t


cdef class MadvFreeMemory:
    cdef char *base                 # the private anonymous mapping, npages pages
    cdef size_t mapped              # bytes mapped
    cdef size_t page                # page size
    cdef readonly Py_ssize_t nbytes
    cdef readonly Py_ssize_t npages
    cdef uint64_t *saved            # per page: the first word the cookie stands in for
    cdef bint locked
    cdef bint busy                  # a page loop runs without the GIL; close/lock/unlock must wait
    cdef readonly Py_ssize_t purged_pages   # pages the last lock() found purged
    cdef bint closed_
    cdef readonly bint sigbus
    cdef int uffd                   # userfaultfd in SIGBUS mode, else -1
    cdef bint uffd_lost             # a forked child could not register the mapping again
    cdef Py_ssize_t exports         # live buffer exports of the mapping
    cdef object view                # the memoryview handed out by .data during this lock
    cdef object __weakref__

    cdef int _check_open(self) except -1
    cdef int _release_views(self) except -1
    cdef int _check_access(self, Py_ssize_t offset, Py_ssize_t size) except -1
    cdef int _raise_purged(self, size_t address) except -1
    cdef int _register(self) except -1
    cdef void _after_fork(self) noexcept
