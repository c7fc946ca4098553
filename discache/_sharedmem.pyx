# Chromium's DiscardableSharedMemory on a memfd segment (a shared Segment of kind "memfd", which
# maps the file and punches the holes).  Page 0 is a header whose first word is the
# shared state: bit 0 = locked; bits 1..63 = the time of the last unlock in microseconds while
# unlocked (zero after a purge), and the holder's id while locked (Chromium keeps them zero).  It
# changes only by compare-and-swap, so any number of processes mapping the memfd agree on it.
# Purging punches a hole: the pages read back as zeros; the purge holds the lock until the hole
# is punched.
#
# A holder that dies (exit, crash, SIGKILL, close() or garbage collection while locked) must not
# leave the segment locked forever.  Each instance gets an id from a shared counter and
# write-locks the byte at offset `id` of the memfd through an open file description of its own
# (an OFD lock: the kernel drops it when the description's last fd closes, so when the holder
# dies).  A lock() or purge() that finds the segment locked by an id whose byte nobody holds
# takes the lock over; the dead holder's pages are undefined, so they are purged.
# Included by _core.pyx; declared in _sharedmem.pxd.

import enum as _enum
import time as _time

from cpython.buffer cimport PyBuffer_FillInfo
from libc.stdlib cimport calloc, free
from libc.string cimport memset


cdef uint64_t SHARED_MAGIC = 0x4D48534843414344
cdef uint64_t STATE_LOCKED = 1
cdef Py_ssize_t HEADER_IDS = 3      # header word: how many instance ids were handed out
cdef int SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL


class LockResult(_enum.IntEnum):
    """Outcome of DiscardableSharedMemory.lock(), as in Chromium."""

    SUCCESS = 0   # locked, contents intact
    PURGED = 1    # locked, but the pages were purged: they read as zeros, refill them
    FAILED = 2    # not locked: purged since this instance last looked, or locked elsewhere


cdef inline uint64_t _usage_now():
    return <uint64_t>(_time.time_ns() // 1000)


cdef inline uint64_t _usage_from(object now) except? 0:
    if now is None:
        return _usage_now()
    now = _validate.duration(now, "now")  # positive, finite: inf and nan are refused
    if now >= 2.0 ** 62 / 1_000_000:
        raise ValueError(f"now must be a time in seconds below {2 ** 62 // 1_000_000}, "
                         f"got {now!r}")
    return <uint64_t>round(now * 1_000_000)


cdef inline uint64_t _unlock_time(uint64_t state):
    """The time of the last unlock a state word holds; 0 (null) while locked or purged."""
    return 0 if state & STATE_LOCKED else state >> 1


cdef class DiscardableSharedMemory:
    """Discardable memory shared between processes through a memfd (Chromium's design)."""

    def __cinit__(self):
        self.life_fd = -1

    def __init__(self):
        raise TypeError("use DiscardableSharedMemory.create(nbytes) or .open(fd, nbytes)")

    @classmethod
    def create(cls, nbytes) -> DiscardableSharedMemory:
        """A new segment of nbytes, locked by this instance."""
        cdef DiscardableSharedMemory self = cls.__new__(cls)
        cdef Py_ssize_t n = _check_nbytes(nbytes)
        cdef int fd = memfd_create(b"discache-shared", MFD_CLOEXEC | MFD_ALLOW_SEALING)
        if fd < 0:
            raise _oserror(errno, "memfd_create")
        try:
            self._map(fd, n, True)
        finally:
            close(fd)  # the segment maps it through a descriptor of its own
        return self

    @classmethod
    def open(cls, fd, nbytes) -> DiscardableSharedMemory:
        """Map a segment made by create() in any process; fd is duplicated, not taken over."""
        cdef DiscardableSharedMemory self = cls.__new__(cls)
        cdef Py_ssize_t n = _check_nbytes(nbytes)
        cdef int raw = _operator.index(fd)
        if raw < 0:
            raise ValueError(f"fd {fd} is not an open file descriptor")
        self._map(raw, n, False)
        return self

    cdef int _map(self, int fd, Py_ssize_t nbytes, bint create) except -1:
        cdef stat info
        cdef int seals
        cdef uint64_t *header
        cdef size_t mapped
        self.page = sysconf(_SC_PAGESIZE)
        self.nbytes = nbytes
        self.npages = (nbytes + self.page - 1) // self.page
        mapped = (self.npages + 1) * self.page
        if create:
            if ftruncate(fd, mapped) != 0:
                raise _oserror(errno, "ftruncate of the memfd")
            # Sealed size: no process can shrink the file under another's mapping (SIGBUS).
            if fcntl(fd, F_ADD_SEALS, SEALS) != 0:
                raise _oserror(errno, "sealing the memfd")
        else:
            if fstat(fd, &info) != 0:
                raise ValueError(f"fd {fd} is not an open file descriptor: {_os.strerror(errno)}")
            seals = fcntl(fd, F_GET_SEALS)
            if not S_ISREG(info.st_mode) or seals < 0 or (seals & SEALS) != SEALS:
                raise ValueError("fd is not a discache shared memory segment (a sealed memfd)")
            if <size_t>info.st_size != mapped:
                raise ValueError(f"fd holds a segment of {info.st_size - self.page} bytes "
                                 f"(page-rounded), not {nbytes}")
        # The header page, then the data pages: one shared memfd segment.
        self.segment = Segment(self.npages + 1, "memfd", fd=fd)
        header = <uint64_t *>self.segment.base
        if not create and (header[1] != SHARED_MAGIC or header[2] != <uint64_t>nbytes):
            self.segment.close()
            self.segment = None
            raise ValueError(f"fd is not a discache shared segment of {nbytes} bytes")
        self.base = self.segment.base
        self.state = header
        self._join_segment()
        if create:
            header[1] = SHARED_MAGIC
            header[2] = nbytes
            header[0] = STATE_LOCKED | (self.holder << 1)  # created locked by this instance
        else:
            # Start from the state as it is now: unlocked since t -> t; locked or purged -> null.
            self.last_usage = _unlock_time(dc_load_u64(self.state))
        self.page_locked = <unsigned char *>calloc(self.npages, 1)
        if self.page_locked == NULL:
            raise MemoryError()
        if create:
            memset(self.page_locked, 1, self.npages)
            self.locked_pages = self.npages
        return 0

    cdef int _join_segment(self) except -1:
        """Take an id and hold its byte through a private open file description while alive."""
        self.life_fd = dc_reopen_private(self.segment.fd)
        self.can_recover = self.life_fd >= 0
        if not self.can_recover:
            # No /proc: a dup shares the description (and its locks) with whoever else has it,
            # so a free byte would prove nothing; this instance never takes a lock over.
            self.life_fd = dup(self.segment.fd)
            if self.life_fd < 0:
                raise _oserror(errno, "dup of the memfd")
        self.holder = dc_fetch_add_u64(self.state + HEADER_IDS, 1) + 1
        if self.holder >= (<uint64_t>1 << 62):
            raise OverflowError("the segment has handed out every instance id")
        if dc_ofd_lock_byte(self.life_fd, self.holder) != 0:
            raise _oserror(errno, "fcntl(F_OFD_SETLK) on the memfd")
        return 0

    cdef bint _holder_alive(self, uint64_t state):
        """Is the holder named by a locked state word alive (its byte still locked)?"""
        cdef uint64_t holder = state >> 1
        if holder == self.holder or not self.can_recover:
            return True
        # An error (no OFD locks?) counts as alive: never take a live holder's lock.
        return dc_ofd_byte_held(self.life_fd, holder) != 0

    cdef bint _take_over(self, uint64_t found) except -1:
        """Take the lock from a dead holder (found: the locked state word); True if taken."""
        if not (found & STATE_LOCKED) or self._holder_alive(found):
            return False
        return dc_cas_u64(self.state, found, STATE_LOCKED | (self.holder << 1)) == found

    def __dealloc__(self):
        if self.life_fd >= 0:
            close(self.life_fd)
        free(self.page_locked)

    cdef int _check_open(self) except -1:
        if self.base == NULL:
            raise ValueError("shared memory is closed")
        if self.busy:
            raise RuntimeError("shared memory is being purged by another thread")
        return 0

    cdef int _check_range(self, object offset, object length,
                          Py_ssize_t *first, Py_ssize_t *end) except -1:
        cdef object off = _operator.index(offset)
        cdef object size = _operator.index(length)
        cdef object limit = self.npages * self.page
        if off < 0 or size < 0 or off % self.page or size % self.page:
            raise ValueError(f"offset and length must be non-negative multiples of the page "
                             f"size {self.page}, got offset={off}, length={size}")
        if size == 0:
            size = limit - off
        if off >= limit or size <= 0 or off + size > limit:
            raise ValueError(f"range [{off}, {off}+{size}) is outside the {limit} bytes "
                             "(page-rounded) of the segment")
        first[0] = off // self.page
        end[0] = (off + size) // self.page
        return 0

    def lock(self, offset=0, length=0) -> LockResult:
        """Lock pages [offset, offset+length) (0: to the end): SUCCESS, PURGED or FAILED."""
        # Counted while it runs: a purge looping in another thread yields to it (else it could
        # hold the lock bit, or the instance for its hole punch, at every attempt).
        self.lockers += 1
        try:
            while self.busy and self.base != NULL:
                with nogil:
                    usleep(50)  # a hole punch of this instance runs in another thread
            return self._lock(offset, length)
        finally:
            self.lockers -= 1

    cdef object _lock(self, object offset, object length):
        cdef Py_ssize_t first, end, i
        cdef uint64_t expected, found
        cdef bint purged = False
        self._check_open()
        self._check_range(offset, length, &first, &end)
        for i in range(first, end):
            if self.page_locked[i]:
                raise RuntimeError(f"page {i} is already locked by this instance")
        if self.locked_pages == 0:
            # Only the first lock takes the shared lock bit; it needs the state this instance
            # last saw, so a purge (or another unlock) in between makes it fail.
            expected = self.last_usage << 1
            found = dc_cas_u64(self.state, expected, STATE_LOCKED | (self.holder << 1))
            if found != expected:
                if not self._take_over(found):
                    self.last_usage = _unlock_time(found)
                    return LockResult.FAILED
                # Its holder died holding it, maybe mid-write or mid-purge: start from zeros.
                self.last_usage = 0
                try:
                    self._punch()
                except BaseException:
                    dc_cas_u64(self.state, STATE_LOCKED | (self.holder << 1), 0)
                    raise
            purged = self.last_usage == 0
        for i in range(first, end):
            self.page_locked[i] = 1
        self.locked_pages += end - first
        return LockResult.PURGED if purged else LockResult.SUCCESS

    def unlock(self, offset=0, length=0) -> None:
        """Unlock pages [offset, offset+length) (0: to the end) that this instance locked."""
        cdef Py_ssize_t first, end, i
        cdef uint64_t now, found
        self._check_open()
        self._check_range(offset, length, &first, &end)
        for i in range(first, end):
            if not self.page_locked[i]:
                raise RuntimeError(f"page {i} is not locked by this instance")
        if self.locked_pages == end - first:
            now = _usage_now()
            found = dc_cas_u64(self.state, STATE_LOCKED | (self.holder << 1), now << 1)
            if found != STATE_LOCKED | (self.holder << 1):
                raise RuntimeError("the shared state is not locked: another process unlocked "
                                   "or corrupted it")
            self.last_usage = now
        for i in range(first, end):
            self.page_locked[i] = 0
        self.locked_pages -= end - first

    def purge(self, now=None) -> bool:
        """Free the pages if unlocked and unused since last_known_usage; False refreshes it."""
        cdef uint64_t usage = _usage_from(now)
        cdef uint64_t expected, found, mine
        self._check_open()
        if self.lockers:
            return False  # a lock() of this instance waits in another thread: let it through
        expected = self.last_usage << 1
        mine = STATE_LOCKED | (self.holder << 1)
        # Hold the lock while punching: published as purged before the punch, the state would
        # let a lock elsewhere get PURGED and write into pages the punch then zeroes.
        found = dc_cas_u64(self.state, expected, mine)
        if found != expected and not self._take_over(found):
            # Locked: remember `now`, so a caller can tell "locked" from "stale".
            self.last_usage = usage if found & STATE_LOCKED else found >> 1
            return False
        self.last_usage = 0
        try:
            self._punch()
        finally:
            # Purged even if the punch failed part-way: the next lock must report it.
            dc_cas_u64(self.state, mine, 0)
        return True

    cdef int _punch(self) except -1:
        cdef int rc
        self.busy = True
        with nogil:
            rc = self.segment._punch(1, self.npages)  # the data pages, not the header
        self.busy = False
        if rc != 0:
            raise _oserror(errno, "fallocate(PUNCH_HOLE) on the memfd")
        return 0

    def _state_word(self) -> int:
        """The shared state read atomically, as Chromium's word (lock bit | unlock time << 1,
        the holder's id left out); for tests."""
        cdef uint64_t state
        self._check_open()
        state = dc_load_u64(self.state)
        return STATE_LOCKED if state & STATE_LOCKED else state

    def _holder_id(self) -> int:
        """The id of the instance holding the lock (0 when unlocked); for tests."""
        cdef uint64_t state
        self._check_open()
        state = dc_load_u64(self.state)
        return state >> 1 if state & STATE_LOCKED else 0

    @property
    def instance_id(self) -> int:
        """This instance's id in the segment (what the state word names while it holds it)."""
        return self.holder

    def is_memory_resident(self) -> bool:
        """False once purged (until locked again)."""
        cdef uint64_t state
        self._check_open()
        state = dc_load_u64(self.state)
        return bool(state & STATE_LOCKED) or (state >> 1) != 0

    def is_memory_locked(self) -> bool:
        """True while any live instance, in any process, holds the lock."""
        cdef uint64_t state
        self._check_open()
        state = dc_load_u64(self.state)
        return bool(state & STATE_LOCKED) and self._holder_alive(state)

    @property
    def last_known_usage(self) -> float | None:
        """Seconds since the epoch of the last unlock this instance saw; None if purged/locked."""
        return self.last_usage / 1e6 if self.last_usage else None

    @property
    def locked_page_count(self) -> int:
        """How many pages this instance holds locked."""
        return self.locked_pages

    @property
    def closed(self) -> bool:
        """True once close() has run."""
        return self.base == NULL

    @property
    def exports(self) -> int:
        """Live buffer exports of the data (views that close() waits for)."""
        return self.exports

    def fileno(self) -> int:
        """The memfd, to pass to another process (with DiscardableSharedMemory.open)."""
        self._check_open()
        return self.segment.fd

    @property
    def data(self) -> memoryview:
        """Writable memoryview of the nbytes; meaningful only for pages locked by someone."""
        self._check_open()
        return memoryview(self)

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        self._check_open()
        PyBuffer_FillInfo(buffer, self, self.base + self.page, self.nbytes, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.exports -= 1

    def _force_reclaim(self) -> int:
        """Purge now if nobody holds the lock; returns the number of pages freed."""
        self._check_open()
        if self.purge() or self.purge():
            return self.npages
        return 0

    def close(self) -> None:
        """Unmap and close this instance's fd; other processes keep the segment."""
        if self.base == NULL:
            return
        self._check_open()
        if self.exports:
            raise BufferError(f"{self.exports} buffer(s) of the data are still alive; "
                              "release them first")
        self.segment.close()
        self.base = NULL
        self.state = NULL
        close(self.life_fd)  # a lock still held here is now a dead holder's: others take it
        self.life_fd = -1

    def __enter__(self) -> DiscardableSharedMemory:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<DiscardableSharedMemory nbytes={self.nbytes} "
                f"{'closed' if self.base == NULL else f'{self.locked_pages} pages locked here'}>")
