# cython: language_level=3
"""discache's compiled real memory: the kernel calls, the segment kinds and the mapped memories.
The simulator's compiled code is discache.sim._sim."""

include "_kernel.pyx"
include "_mapped.pyx"
include "_madvfree.pyx"
include "_ashmem.pyx"
include "_sharedmem.pyx"
include "_segment.pyx"
# The cache's hit path, until it moves to its own extension module (discache._cache); it used
# _pagetable.pyx's declaration of PY_SSIZE_T_MAX, which is now the simulator's.
cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX

include "_cachecore.pyx"
