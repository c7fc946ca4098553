# Declarations of the compiled real memory; one .pxd per cdef class, included here.
include "_kernel.pxd"
include "_segment.pxd"
include "_span.pxd"
include "_sharedmem.pxd"
