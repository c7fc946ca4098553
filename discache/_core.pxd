# Declarations of the compiled core; one .pxd per cdef class, included here.
include "_pagetable.pxd"
include "_kernel.pxd"
include "_mapped.pxd"
include "_madvfree.pxd"
include "_ashmem.pxd"
include "_sharedmem.pxd"
