# cython: language_level=3
"""discache.sim's compiled core: the page table with generation tokens, the free maps, the pager
and the simulated machine (frames, LRU, swap, reclaim)."""

include "_pagetable.pyx"
include "_freemap.pyx"
include "_simpager.pyx"
include "_simcore.pyx"
