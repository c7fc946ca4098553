# One simulated address space or shared file: its page slots and its PageTable.
# Included by _sim.pyx; declared in _simpager.pxd.

from libc.stdint cimport uint32_t
from libc.stdlib cimport calloc, free


cdef class Pager:
    """The pages of one simulated address space or shared file, for discache.sim."""

    def __cinit__(self, npages, uint32_t owner, bint shared=False, str strategy="token"):
        self.table = PageTable(npages, strategy)
        self.npages = self.table.npages
        self.slots = <uint32_t *>calloc(self.npages, sizeof(uint32_t))
        if self.slots == NULL:
            raise MemoryError(f"cannot allocate {self.npages} page slots")
        self.owner = owner
        self.shared = shared

    def __dealloc__(self):
        free(self.slots)

    @property
    def nbytes(self) -> int:
        """Bytes of bookkeeping: page slots plus the PageTable's."""
        return self.npages * sizeof(uint32_t) + self.table.nbytes

    @property
    def nbytes_used(self) -> int:
        """Bookkeeping bytes of pages [0, top), the ones ever mapped; pages past top only have
        address space reserved (calloc'd zero memory the host never backs until touched)."""
        return self.top * 2 * sizeof(uint32_t) + self.table.nbytes - self.npages * sizeof(uint32_t)

    def slot(self, page) -> int:
        """Raw slot of a page: 0, a frame number, or SIM_SWAPPED | swap slot."""
        cdef uint32_t p = self.table._check_page(page)
        return self.slots[p]

    def __repr__(self) -> str:
        return f"Pager(npages={self.npages}, owner={self.owner}, shared={self.shared})"
