# The free sets of discache.sim's frames and swap slots: a bit per number instead of a 4-byte
# free-list link.  Included by _sim.pyx; declared in _freemap.pxd.

from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free

cdef extern from *:
    """
    #define DC_CTZ64(x) ((unsigned)__builtin_ctzll(x))
    """
    unsigned DC_CTZ64(uint64_t x) noexcept nogil


cdef int freemap_init(FreeMap *m, uint32_t size) except -1:
    """Make m hold every number 0..size-1."""
    cdef Py_ssize_t nwords[8]
    cdef Py_ssize_t total = 0, n = size, w
    cdef uint32_t i
    cdef int level = 0
    while True:
        n = (n + 63) >> 6
        nwords[level] = n
        m.start[level] = total
        total += n
        level += 1
        if n == 1:
            break
    m.nlevels = level
    m.size = size
    m.nfree = 0
    m.words = <uint64_t *>calloc(total, sizeof(uint64_t))
    if m.words == NULL:
        raise MemoryError(f"cannot allocate the free set of {size} pages")
    # Level 0 full words at once, the partial last word bit by bit; summaries follow.
    for w in range(size >> 6):
        m.words[w] = ~(<uint64_t>0)
    for i in range(size & ~63u, size):
        m.words[i >> 6] |= (<uint64_t>1) << (i & 63)
    for level in range(1, m.nlevels):
        for w in range(nwords[level - 1]):
            if m.words[m.start[level - 1] + w]:
                m.words[m.start[level] + (w >> 6)] |= (<uint64_t>1) << (w & 63)
    m.nfree = size
    return 0


cdef void freemap_release(FreeMap *m) noexcept:
    free(m.words)
    m.words = NULL


cdef Py_ssize_t freemap_nbytes(FreeMap *m) noexcept:
    return (m.start[m.nlevels - 1] + 1) * sizeof(uint64_t)


cdef inline bint freemap_has(FreeMap *m, uint32_t i) noexcept nogil:
    return (m.words[i >> 6] >> (i & 63)) & 1


cdef void freemap_put(FreeMap *m, uint32_t i) noexcept nogil:
    """Give number i back (it must be taken)."""
    cdef Py_ssize_t w = i
    cdef uint64_t *word
    cdef bint was_empty
    cdef int level
    m.nfree += 1
    for level in range(m.nlevels):
        word = &m.words[m.start[level] + (w >> 6)]
        was_empty = word[0] == 0
        word[0] |= (<uint64_t>1) << (w & 63)
        if not was_empty:
            return
        w >>= 6


cdef uint32_t freemap_take(FreeMap *m) noexcept nogil:
    """Take the lowest free number (there must be one)."""
    cdef Py_ssize_t w = 0
    cdef int level
    cdef uint64_t *word
    for level in range(m.nlevels - 1, -1, -1):
        w = (w << 6) | DC_CTZ64(m.words[m.start[level] + w])
    cdef uint32_t taken = <uint32_t>w
    m.nfree -= 1
    for level in range(m.nlevels):
        word = &m.words[m.start[level] + (w >> 6)]
        word[0] &= ~((<uint64_t>1) << (w & 63))
        if word[0] != 0:
            break
        w >>= 6
    return taken
