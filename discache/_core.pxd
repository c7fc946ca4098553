# Declarations of the compiled real memory; one .pxd per cdef class, included here.
include "_kernel.pxd"
include "_mapped.pxd"
include "_madvfree.pxd"
include "_ashmem.pxd"
include "_sharedmem.pxd"
include "_segment.pxd"
