# Declarations of the simulator's compiled core; one .pxd per cdef class, included here.
include "_pagetable.pxd"
include "_freemap.pxd"
include "_simpager.pxd"
include "_simcore.pxd"
