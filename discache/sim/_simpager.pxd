from libc.stdint cimport uint32_t


# What a simulated address space or shared file maps at each of its pages: a frame, a swap slot
# or nothing, beside the PageTable that holds the pages' volatility.
cdef class Pager:
    cdef uint32_t *slots              # per page: 0 (nothing) | frame | SIM_SWAPPED | swap slot
    cdef readonly Py_ssize_t npages
    cdef readonly PageTable table
    cdef readonly uint32_t owner      # rmap group: the fork family or the file
    cdef readonly bint shared         # a file's pages: writes never copy
    cdef public Py_ssize_t top        # pages at or past top were never used (fork copies [0, top))
