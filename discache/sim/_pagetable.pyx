# Page-granular bookkeeping of volatile ranges, with v14's O(N) unmark ("walk") and
# generation tokens ("token", the default).  Included by _sim.pyx; declared in _pagetable.pxd.
#
# A page entry is one uint32: PRESENT | LOST | token.  LOST+token is Minchan Kim's purge mark:
# it means "discarded while volatile under the range marked with this token".  A mark whose token
# differs from the token of the range now covering the page is stale and means nothing, so unmark
# never has to clear marks.  Answers to unmark come from the per-range purge records (npurged and
# the list of purged pages), so they never depend on the page entries or on token equality.

from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memmove
from cpython.pythread cimport (
    NOWAIT_LOCK, WAIT_LOCK, PyThread_acquire_lock, PyThread_allocate_lock,
    PyThread_free_lock, PyThread_release_lock,
)

cdef extern from *:
    """
    #define DC_PRESENT 0x80000000u
    #define DC_LOST    0x40000000u
    #define DC_MAX_TOKEN_BITS 30
    #define DC_MAX_PAGES 0x80000000u
    """
    const uint32_t DC_PRESENT
    const uint32_t DC_LOST
    const int DC_MAX_TOKEN_BITS
    const uint32_t DC_MAX_PAGES

# Page loops shorter than this keep the GIL: releasing it costs more than the loop.
cdef Py_ssize_t NOGIL_PAGES = 2048

STATE_ABSENT = 0
STATE_PRESENT = 1
STATE_VOLATILE = 2
STATE_PURGED = 3
STATE_NAMES = ("absent", "present", "volatile", "purged")
STRATEGIES = ("token", "walk")
MAX_TOKEN_BITS = DC_MAX_TOKEN_BITS
MAX_PAGES = DC_MAX_PAGES


cdef inline Py_ssize_t _as_index(object value) except? -1:
    """Convert an int-like to Py_ssize_t; ints too large for C saturate so range checks reject them."""
    try:
        return value
    except OverflowError:
        return PY_SSIZE_T_MAX if value > 0 else PY_SSIZE_T_MIN


cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX
    const Py_ssize_t PY_SSIZE_T_MIN


cdef inline uint32_t _min32(uint32_t a, uint32_t b) noexcept nogil:
    return a if a < b else b


cdef inline uint32_t _max32(uint32_t a, uint32_t b) noexcept nogil:
    return a if a > b else b


cdef class PageTable:
    """Per-page state of one address space: absent, present, volatile or purged."""

    def __cinit__(self, npages, str strategy="token", int token_bits=DC_MAX_TOKEN_BITS):
        cdef Py_ssize_t n = _as_index(npages)
        if n <= 0 or <uint64_t>n > DC_MAX_PAGES:
            raise ValueError(f"npages must be between 1 and {DC_MAX_PAGES}, got {npages!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be 'token' or 'walk', got {strategy!r}")
        if token_bits < 1 or token_bits > DC_MAX_TOKEN_BITS:
            raise ValueError(
                f"token_bits must be between 1 and {DC_MAX_TOKEN_BITS}, got {token_bits}")
        self.mutex = PyThread_allocate_lock()
        if self.mutex == NULL:
            raise MemoryError("cannot allocate the page table's lock")
        self.entries = <uint32_t *>calloc(n, sizeof(uint32_t))
        if self.entries == NULL:
            raise MemoryError(f"cannot allocate a page table of {n} pages")
        self.npages = n
        self.walk = strategy == "walk"
        self.token_bits = token_bits
        self.token_mask = (1u << token_bits) - 1u
        self.next_token = 1

    def __dealloc__(self):
        cdef Py_ssize_t k
        if self.ranges != NULL:
            for k in range(self.nranges):
                free(self.ranges[k].purged)
            free(self.ranges)
        free(self.entries)
        if self.mutex != NULL:
            PyThread_free_lock(self.mutex)

    # ---------------------------------------------------------------- locking and lookup

    cdef int _acquire(self) except -1:
        # Page loops run without the GIL, so the table needs its own lock against other threads.
        if not PyThread_acquire_lock(self.mutex, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self.mutex, WAIT_LOCK)
        return 0

    cdef void _release(self) noexcept:
        PyThread_release_lock(self.mutex)

    cdef Py_ssize_t _find(self, uint32_t page) noexcept nogil:
        """Index of the range containing page, or -1."""
        cdef Py_ssize_t k = self._lower(page)
        if k < self.nranges and self.ranges[k].first <= page:
            return k
        return -1

    cdef Py_ssize_t _lower(self, uint32_t first) noexcept nogil:
        """Index of the first range whose end is past `first` (ends are sorted: ranges are disjoint)."""
        cdef Py_ssize_t lo = 0, hi = self.nranges, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self.ranges[mid].end <= first:
                lo = mid + 1
            else:
                hi = mid
        return lo

    cdef int _reserve(self, Py_ssize_t count) except -1:
        """Make room for count ranges, so that a later splice cannot fail half-way."""
        cdef Py_ssize_t newcap
        cdef VolatileRange *grown
        if count > self.ranges_cap:
            newcap = max(count, 2 * self.ranges_cap, 8)
            grown = <VolatileRange *>realloc(self.ranges, newcap * sizeof(VolatileRange))
            if grown == NULL:
                raise MemoryError("cannot grow the volatile range table")
            self.ranges = grown
            self.ranges_cap = newcap
        return 0

    cdef void _splice(self, Py_ssize_t i, Py_ssize_t j,
                      VolatileRange *pieces, Py_ssize_t npieces) noexcept:
        """Replace ranges[i:j] with pieces (room reserved); the caller owns the old lists."""
        cdef Py_ssize_t newcount = self.nranges - (j - i) + npieces
        if j < self.nranges and npieces != j - i:
            memmove(&self.ranges[i + npieces], &self.ranges[j],
                    (self.nranges - j) * sizeof(VolatileRange))
        if npieces:
            memcpy(&self.ranges[i], pieces, npieces * sizeof(VolatileRange))
        self.nranges = newcount

    cdef uint32_t _new_token(self) noexcept nogil:
        if self.next_token > self.token_mask:
            if <uint64_t>self.nranges < self.token_mask:
                self._renumber()
            else:
                # Too many live ranges to renumber: tokens wrap.  A stale mark may then equal a new
                # range's token, which reads as "purged" (a false SIGBUS), never as "intact".
                self.next_token = 1
                self.token_wraps += 1
        cdef uint32_t token = self.next_token
        self.next_token += 1
        return token

    cdef void _renumber(self) noexcept nogil:
        """Give live ranges tokens 1..nranges and drop every stale mark: one O(npages) sweep per
        2**token_bits marks, so that tokens can be reused without aliasing."""
        cdef Py_ssize_t k
        cdef uint32_t p = 0, q, e
        cdef VolatileRange *r
        for k in range(self.nranges):
            r = &self.ranges[k]
            for q in range(p, r.first):
                self.entries[q] &= DC_PRESENT
            for q in range(r.first, r.end):
                e = self.entries[q]
                if (e & DC_LOST) and (e & self.token_mask) == r.token:
                    self.entries[q] = (e & ~self.token_mask) | <uint32_t>(k + 1)
                else:
                    self.entries[q] = e & DC_PRESENT
            r.token = <uint32_t>(k + 1)
            p = r.end
        for q in range(p, <uint32_t>self.npages):
            self.entries[q] &= DC_PRESENT
        self.next_token = <uint32_t>self.nranges + 1
        self.renumbers += 1
        self.pte_visits += <uint64_t>self.npages

    cdef int _check_span(self, Py_ssize_t first, Py_ssize_t count) except -1:
        if count <= 0:
            raise ValueError(f"count must be a positive number of pages, got {count}")
        if first < 0 or first >= self.npages:
            raise IndexError(f"first page {first} is outside the table (pages 0..{self.npages - 1})")
        if count > self.npages - first:
            raise IndexError(
                f"pages [{first}, {first} + {count}) run past the end of the table "
                f"({self.npages} pages)")
        return 0

    cdef uint32_t _check_page(self, object page) except? 0xffffffff:
        cdef Py_ssize_t p = _as_index(page)
        if p < 0 or p >= self.npages:
            raise IndexError(f"page {page} is outside the table (pages 0..{self.npages - 1})")
        return <uint32_t>p

    # ---------------------------------------------------------------- public API

    @property
    def strategy(self) -> str:
        """'token' (O(1) unmark) or 'walk' (v14's page-table walk)."""
        return "walk" if self.walk else "token"

    @property
    def nbytes(self) -> int:
        """Bytes of bookkeeping: page entries, range table and purge records."""
        cdef Py_ssize_t k, total = self.npages * sizeof(uint32_t)
        total += self.ranges_cap * sizeof(VolatileRange)
        for k in range(self.nranges):
            total += self.ranges[k].cap * sizeof(uint32_t)
        return total

    def populate(self, first, count) -> int:
        """Fault pages in; returns how many were not present before."""
        cdef Py_ssize_t a = _as_index(first), n = _as_index(count)
        self._check_span(a, n)
        self._acquire()
        try:
            if n < NOGIL_PAGES:
                return self._populate(<uint32_t>a, <uint32_t>(a + n))
            with nogil:
                n = self._populate(<uint32_t>a, <uint32_t>(a + n))
            return n
        finally:
            self._release()

    cdef Py_ssize_t _populate(self, uint32_t a, uint32_t b) noexcept nogil:
        cdef Py_ssize_t k = self._lower(a), added = 0
        cdef uint32_t p = a, q, hi, e, token
        while p < b:
            if k < self.nranges and self.ranges[k].first <= p:
                hi = _min32(b, self.ranges[k].end)
                token = self.ranges[k].token
                for q in range(p, hi):
                    e = self.entries[q]
                    if not (e & DC_PRESENT):
                        added += 1
                    # A page lost in this marking stays marked lost: the loss must still be reported.
                    if (e & DC_LOST) and (e & self.token_mask) == token:
                        self.entries[q] = e | DC_PRESENT
                    else:
                        self.entries[q] = DC_PRESENT
                k += 1
            else:
                hi = b if k >= self.nranges else _min32(b, self.ranges[k].first)
                for q in range(p, hi):
                    if not (self.entries[q] & DC_PRESENT):
                        added += 1
                    self.entries[q] = DC_PRESENT
            p = hi
        self.pte_visits += b - a
        return added

    def discard(self, first, count) -> int:
        """Drop pages without a purge (MADV_DONTNEED, munmap); returns how many were present."""
        cdef Py_ssize_t a = _as_index(first), n = _as_index(count)
        self._check_span(a, n)
        self._acquire()
        try:
            if n < NOGIL_PAGES:
                return self._discard(<uint32_t>a, <uint32_t>(a + n))
            with nogil:
                n = self._discard(<uint32_t>a, <uint32_t>(a + n))
            return n
        finally:
            self._release()

    cdef Py_ssize_t _discard(self, uint32_t a, uint32_t b) noexcept nogil:
        cdef Py_ssize_t dropped = 0
        cdef uint32_t q
        for q in range(a, b):
            if self.entries[q] & DC_PRESENT:
                dropped += 1
                self.entries[q] &= ~DC_PRESENT
        self.pte_visits += b - a
        return dropped

    def mark_volatile(self, first, count) -> None:
        """Mark pages volatile; O(ranges overlapped), independent of count.

        Pages already volatile keep their marking, so a purge that happened before is still
        reported by the next unmark."""
        cdef Py_ssize_t a = _as_index(first), n = _as_index(count)
        self._check_span(a, n)
        self._acquire()
        try:
            self._mark(<uint32_t>a, <uint32_t>(a + n))
        finally:
            self._release()

    cdef int _mark(self, uint32_t a, uint32_t b) except -1:
        cdef Py_ssize_t i = self._lower(a), j = i, ngaps = 0, npieces = 0
        cdef uint32_t pos = a, token
        cdef VolatileRange stack_pieces[8]
        cdef VolatileRange *pieces = stack_pieces
        while j < self.nranges and self.ranges[j].first < b:
            if self.ranges[j].first > pos:
                ngaps += 1
            pos = _max32(pos, self.ranges[j].end)
            j += 1
        if pos < b:
            ngaps += 1
        if ngaps == 0:
            return 0
        self._reserve(self.nranges + ngaps)
        if (j - i) + ngaps > 8:
            pieces = <VolatileRange *>malloc(((j - i) + ngaps) * sizeof(VolatileRange))
            if pieces == NULL:
                raise MemoryError("cannot allocate volatile ranges")
        try:
            token = 0 if self.walk else self._new_token()
            pos = a
            for k in range(i, j):
                if self.ranges[k].first > pos:
                    pieces[npieces] = VolatileRange(pos, self.ranges[k].first, token, 0, 0, NULL)
                    npieces += 1
                pieces[npieces] = self.ranges[k]
                npieces += 1
                pos = _max32(pos, self.ranges[k].end)
            if pos < b:
                pieces[npieces] = VolatileRange(pos, b, token, 0, 0, NULL)
                npieces += 1
            self._splice(i, j, pieces, npieces)
        finally:
            if pieces != stack_pieces:
                free(pieces)
        return 0

    def unmark(self, first, count) -> bool:
        """Make pages non-volatile; True if any of them was purged since it was marked.

        token: O(log ranges) when the unmark covers whole marked ranges; a sub-range costs
        O(pages purged in the ranges it cuts), never O(count).  walk: visits every page."""
        cdef Py_ssize_t a = _as_index(first), n = _as_index(count)
        self._check_span(a, n)
        self._acquire()
        try:
            return self._unmark(<uint32_t>a, <uint32_t>(a + n))
        finally:
            self._release()

    cdef bint _unmark(self, uint32_t a, uint32_t b) except -1:
        cdef Py_ssize_t i = self._lower(a), j = i, k, npieces = 0
        cdef VolatileRange pieces[2]
        cdef VolatileRange *r
        cdef bint purged = False
        cdef uint32_t lo, hi, q
        while j < self.nranges and self.ranges[j].first < b:
            j += 1
        if i == j:
            return False
        # Reserve and build the surviving pieces first: on MemoryError nothing has changed.
        self._reserve(self.nranges + 1)
        if self.ranges[i].first < a:
            pieces[npieces] = VolatileRange(self.ranges[i].first, a, self.ranges[i].token, 0, 0, NULL)
            npieces += 1
        if self.ranges[j - 1].end > b:
            pieces[npieces] = VolatileRange(b, self.ranges[j - 1].end, self.ranges[j - 1].token,
                                            0, 0, NULL)
            npieces += 1
        if not self.walk:
            try:
                for k in range(npieces):
                    r = &self.ranges[i] if pieces[k].first < a else &self.ranges[j - 1]
                    _take_records(r, &pieces[k])
            except MemoryError:
                for k in range(npieces):
                    free(pieces[k].purged)
                raise
        for k in range(i, j):
            r = &self.ranges[k]
            lo = _max32(a, r.first)
            hi = _min32(b, r.end)
            if self.walk:
                if hi - lo < NOGIL_PAGES:
                    purged |= self._walk_clear(lo, hi)
                else:
                    with nogil:
                        purged |= self._walk_clear(lo, hi)
            elif r.npurged:
                if lo == r.first and hi == r.end:
                    purged = True
                else:
                    for q in range(r.npurged):
                        if lo <= r.purged[q] < hi:
                            purged = True
                            break
                    self.record_visits += r.npurged
            free(r.purged)
        self._splice(i, j, pieces, npieces)
        return purged

    cdef bint _walk_clear(self, uint32_t lo, uint32_t hi) noexcept nogil:
        """v14's unmark: visit every entry, report and clear purge marks."""
        cdef bint purged = False
        cdef uint32_t q
        for q in range(lo, hi):
            if self.entries[q] & DC_LOST:
                purged = True
                self.entries[q] &= ~DC_LOST
        self.pte_visits += hi - lo
        return purged

    def purge(self, page) -> bool:
        """The reclaimer's step: discard one present volatile page; False if it is not one."""
        cdef uint32_t p = self._check_page(page)
        cdef int done
        self._acquire()
        try:
            done = self._purge(p)
        finally:
            self._release()
        if done < 0:
            raise MemoryError("cannot grow a purge record")
        return done == 1

    cdef int _purge(self, uint32_t p) noexcept nogil:
        """purge() for a compiled reclaimer holding the lock: 1 if page p was present and volatile
        and is now purged, 0 if it is not such a page, -1 if its purge record cannot grow (then
        only pte_visits has changed)."""
        cdef Py_ssize_t k = self._find(p)
        cdef uint32_t e = self.entries[p], newcap
        cdef uint32_t *grown
        cdef VolatileRange *r
        if k < 0 or not (e & DC_PRESENT):
            return 0
        r = &self.ranges[k]
        self.pte_visits += 1
        if not self.walk and not _recorded(r, p, e, self.token_mask):
            if r.npurged == r.cap:
                newcap = 2 * r.cap if 2 * r.cap > 4 else 4
                grown = <uint32_t *>realloc(r.purged, newcap * sizeof(uint32_t))
                if grown == NULL:
                    return -1
                r.purged = grown
                r.cap = newcap
            r.purged[r.npurged] = p
            r.npurged += 1
        self.entries[p] = DC_LOST | r.token
        return 1

    def state(self, page) -> str:
        """'absent', 'present', 'volatile' or 'purged'."""
        return STATE_NAMES[self._state(self._check_page(page))]

    def is_volatile(self, page) -> bool:
        """True if the page lies in a marked range (whatever its contents)."""
        cdef uint32_t p = self._check_page(page)
        return self._find(p) >= 0

    cdef int _state(self, uint32_t p) noexcept:
        cdef Py_ssize_t k = self._find(p)
        cdef uint32_t e = self.entries[p]
        if k < 0:
            return STATE_PRESENT if e & DC_PRESENT else STATE_ABSENT
        if e & DC_PRESENT:
            return STATE_VOLATILE
        if (e & DC_LOST) and (e & self.token_mask) == self.ranges[k].token:
            return STATE_PURGED
        return STATE_ABSENT

    def states(self, first=0, count=None) -> bytes:
        """State codes (indexes into STATE_NAMES) of a span of pages, one byte each."""
        cdef Py_ssize_t a = _as_index(first)
        # a first page below zero leaves count=None at one page: npages - a could overflow
        cdef Py_ssize_t n = (self.npages - a if a >= 0 else 1) if count is None \
            else _as_index(count)
        cdef Py_ssize_t q
        self._check_span(a, n)
        out = bytearray(n)
        cdef unsigned char[:] view = out
        for q in range(n):
            view[q] = self._state(<uint32_t>(a + q))
        return bytes(out)

    def volatile_ranges(self) -> list:
        """(first, count, token, npurged) of each marked range; npurged is None with 'walk'."""
        cdef Py_ssize_t k
        return [
            (self.ranges[k].first, self.ranges[k].end - self.ranges[k].first, self.ranges[k].token,
             None if self.walk else self.ranges[k].npurged)
            for k in range(self.nranges)
        ]

    def __repr__(self) -> str:
        return (f"PageTable(npages={self.npages}, strategy={self.strategy!r}, "
                f"ranges={self.nranges}, pte_visits={self.pte_visits})")


cdef inline bint _recorded(VolatileRange *r, uint32_t page, uint32_t entry,
                           uint32_t mask) noexcept nogil:
    """Is page already in r's purge records?  Its mark says so only when the tokens match, and
    after a counter wrap a matching mark may be stale, so the records themselves decide then."""
    cdef uint32_t q
    if not ((entry & DC_LOST) and (entry & mask) == r.token):
        return False
    for q in range(r.npurged):  # only a page purged, refaulted and purged again gets here
        if r.purged[q] == page:
            return True
    return False


cdef int _take_records(VolatileRange *src, VolatileRange *piece) except -1:
    """Copy into piece the purge records of src that fall inside it."""
    cdef uint32_t q, n = 0
    if src.npurged == 0:
        return 0
    if piece.first == src.first and piece.end == src.end:
        n = src.npurged
    else:
        for q in range(src.npurged):
            if piece.first <= src.purged[q] < piece.end:
                n += 1
    if n == 0:
        return 0
    piece.purged = <uint32_t *>malloc(n * sizeof(uint32_t))
    if piece.purged == NULL:
        raise MemoryError("cannot split a purge record")
    piece.cap = n
    for q in range(src.npurged):
        if piece.first <= src.purged[q] < piece.end:
            piece.purged[piece.npurged] = src.purged[q]
            piece.npurged += 1
    return 0
