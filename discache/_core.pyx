# cython: language_level=3
"""discache's compiled core: page bookkeeping, generation tokens, and the kernel calls."""

include "_pagetable.pyx"
include "_kernel.pyx"
include "_freemap.pyx"
include "_simpager.pyx"
include "_simcore.pyx"
include "_mapped.pyx"
include "_madvfree.pyx"
include "_ashmem.pyx"
include "_sharedmem.pyx"
include "_segment.pyx"
