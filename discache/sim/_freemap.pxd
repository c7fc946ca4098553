from libc.stdint cimport uint32_t, uint64_t


# A set of free numbers 0..size-1 (frames, swap slots): one bit each, plus a summary bit per word
# at every level above, so that taking the lowest free number costs O(log64 size).
ctypedef struct FreeMap:
    uint64_t *words                   # every level, level 0 (one bit per number) first
    Py_ssize_t start[8]               # index in words of each level's first word
    int nlevels
    uint32_t size
    uint32_t nfree
