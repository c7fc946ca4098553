cdef class AshmemMemory(MappedMemory):
    cdef int fd                     # the /dev/ashmem region, -1 once closed
