
cdef class DiscardableMemory:
    cdef readonly object owner      # the SpanOwner that handed the span out (a manager), or None:
                                    # the memory is a segment of one span
    cdef object segment_            # the segment holding the span
    cdef Segment seg                # the same, when it is a compiled Segment (else None)
    cdef readonly Py_ssize_t first
    cdef readonly Py_ssize_t npages
    cdef readonly Py_ssize_t nbytes
    cdef readonly str backend
    cdef public object ticket       # the owner's record of the span
    cdef readonly Py_ssize_t purged_pages   # pages the last lock() found purged
    cdef bint locked
    cdef bint closed_
    cdef Py_ssize_t exports         # live buffer exports (mem.data and its slices, memoryview(mem))
    cdef object view                # the memoryview handed out by .data during this lock
    cdef object buffer              # what exports the locked span's bytes (and counts its
                                    # exports) during this lock: views hold it, not the memory
    cdef object __weakref__
    cdef dict __dict__              # a caller's own attributes, as on any Python object

    cdef object _mutex(self)
    cdef int _check_open(self) except -1
    cdef int _check_locked(self) except -1
    cdef object _exporter(self)
    cdef int _lock_now(self) except -1
    cdef int _unlock_now(self) except -1
    cdef int _prepare_unlock(self) except -1
    cdef int _release_views(self) except -1
    cdef int _check_access(self, Py_ssize_t offset, Py_ssize_t size) except -1
    cdef int _raise_purged(self, size_t address) except -1
    cdef Py_ssize_t _own_pages(self, Py_ssize_t first, Py_ssize_t count, str what) except -1
