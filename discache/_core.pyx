# cython: language_level=3
"""discache's compiled real memory: the kernel calls, the segment kinds and the mapped memories.
The simulator's compiled code is discache.sim._sim, the cache's discache._cache."""

include "_kernel.pyx"
include "_segment.pyx"
include "_span.pyx"
include "_sharedmem.pyx"
