from libc.stdint cimport uint64_t


cdef class MadvFreeMemory(MappedMemory):
    cdef uint64_t *saved            # per page: the first word the cookie stands in for
    cdef unsigned char *residency   # SIGBUS mode: npages bytes for mincore when pages are purged
    cdef readonly bint sigbus
    cdef int uffd                   # userfaultfd in SIGBUS mode, else -1
    cdef bint uffd_lost             # a forked child could not register the mapping again
    cdef readonly int reclaim_attempts  # rounds the last force_reclaim needed

    cdef int _register(self) except -1
    cdef void _after_fork(self) noexcept
    cdef void _free_records(self) noexcept
