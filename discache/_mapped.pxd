cdef class MappedMemory:
    cdef char *base                 # the mapping, npages pages
    cdef size_t mapped              # bytes mapped
    cdef size_t page                # page size
    cdef readonly Py_ssize_t nbytes
    cdef readonly Py_ssize_t npages
    cdef bint locked
    cdef bint closed_
    cdef bint busy                  # a page loop runs without the GIL; other calls must wait
    cdef readonly Py_ssize_t purged_pages   # pages the last lock() found purged
    cdef Py_ssize_t exports         # live buffer exports of the mapping
    cdef object view                # the memoryview handed out by .data during this lock
    cdef object __weakref__

    cdef int _init_size(self, object nbytes) except -1
    cdef int _unmap(self) except -1
    cdef int _check_open(self) except -1
    cdef int _release_views(self) except -1
    cdef int _check_access(self, Py_ssize_t offset, Py_ssize_t size) except -1
    cdef int _check_unlocked_access(self) except -1
    cdef int _raise_purged(self, size_t address) except -1
