# A mapping carved into page spans that lock, unlock and are discarded independently: the one
# segment protocol (docs/glossary.md) of every real backend.  A DiscardableMemoryManager packs
# small allocations into large segments; discache.allocate(n) is a segment of one span.
# Included by _core.pyx; declared in _segment.pxd.
#
# "madvfree": unlocking a span saves each page's first word, stores the cookie there and
# MADV_FREEs the span; locking swaps the cookie back by compare-and-swap, so a page the kernel
# discarded (it reads zero) is counted as purged (Chromium's scheme).  With sigbus=True no cookie:
# the mapping is registered with a userfaultfd (missing mode, UFFD_FEATURE_SIGBUS), so a discarded
# page faults instead of reading zeros, and lock fills and counts exactly those.
# "memfd": shared memory the kernel does not reclaim without swap; discard_span punches a hole
# and marks the pages lost.  "ashmem": Android's /dev/ashmem; unlock = ASHMEM_UNPIN of the span,
# lock = ASHMEM_PIN, which answers for the whole span at once.

from cpython.buffer cimport PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint64_t, uint8_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

import weakref as _weakref

from discache.errors import (
    BackendUnavailableError as _BackendUnavailableError, PurgedPageError as _PurgedPageError,
)

SEGMENT_KINDS = ("madvfree", "memfd", "ashmem")
cdef enum:
    KIND_MADVFREE = 0
    KIND_MEMFD = 1
    KIND_ASHMEM = 2

# What a segment knows of each page handed out, so that a span method called on someone else's
# span (through mem.segment, or a second DiscardableMemory made over it) is refused instead of
# silently discarding, unlocking or re-handing out memory that is in use.  Pages never claimed
# (a segment used on its own, without spans) are not checked.
cdef enum:
    PAGE_CLAIMED = 1    # handed out (claim_span) and not released since
    PAGE_UNLOCKED = 2   # a claimed page unlocked: it may be discarded
    PAGE_HELD = 4       # a live DiscardableMemory holds it: only that memory changes it
    PAGE_ASKING = 8     # that memory is asking its owner (a manager) for a change right now

# Page loops over at least this many pages run without the GIL.
cdef Py_ssize_t NOGIL_PAGES = 2048

cdef extern from "<sys/mman.h>" nogil:
    int MAP_FIXED

cdef extern from "<unistd.h>" nogil:
    ssize_t pwrite(int fd, const void *buf, size_t count, long offset)
    long lseek(int fd, long offset, int whence)
    int SEEK_DATA
    int SEEK_HOLE

cdef extern from "<errno.h>" nogil:
    int ENXIO

# memfd segments of this process: a forked child gives each a memfd of its own (see
# _own_pages_after_fork), or parent and child would share every span.  SIGBUS-mode segments: a
# forked child registers each with a userfaultfd of its own, since fork() drops the registration
# (no UFFD_FEATURE_EVENT_FORK).
_SHARED_SEGMENTS = _weakref.WeakSet()
_SIGBUS_SEGMENTS = _weakref.WeakSet()
# Segments whose page loop runs without the GIL right now: a child forked meanwhile has no thread
# to finish it, and would find the segment busy forever (see _finish_after_fork).
_BUSY_SEGMENTS = set()
# Incremented in every forked child: state counted by threads of the parent is stale below it.
cdef unsigned long _fork_generation = 0


def _own_segments_after_fork() -> None:
    global _fork_generation
    _fork_generation += 1
    for segment in list(_SHARED_SEGMENTS):
        (<Segment>segment)._own_pages_after_fork()
    for segment in list(_SIGBUS_SEGMENTS):
        (<Segment>segment)._register_after_fork()
    for segment in list(_BUSY_SEGMENTS):
        (<Segment>segment)._finish_after_fork()
    _BUSY_SEGMENTS.clear()


_os.register_at_fork(after_in_child=_own_segments_after_fork)


cdef class Segment:
    """npages of discardable memory whose page spans lock and unlock independently; all locked."""

    def __cinit__(self, npages, str kind="madvfree", bint sigbus=False, fd=-1):
        cdef Py_ssize_t n
        cdef int err
        cdef stat info
        self.fd = -1
        self.uffd = -1
        self.page = sysconf(_SC_PAGESIZE)
        if kind not in SEGMENT_KINDS:
            raise ValueError(f"segment kind must be one of {SEGMENT_KINDS}, got {kind!r}")
        if sigbus and kind != "madvfree":
            raise ValueError(f"sigbus=True needs a madvfree segment, not {kind!r}")
        if isinstance(fd, bool):  # True would be fd 1 (stdout), whose file it would punch holes in
            raise TypeError("fd must be an int, not a bool")
        fd = _operator.index(fd)
        if fd >= 0 and kind != "memfd":
            raise ValueError(f"only a memfd segment maps a file it is given, not {kind!r}")
        n = _validate.size(npages, "npages", (1 << 40) // self.page)
        self.kind = kind
        self.code = SEGMENT_KINDS.index(kind)
        self.sigbus = sigbus
        self.npages = n
        self.nbytes = n * self.page
        if fd >= 0:
            # Shared between processes (DiscardableSharedMemory): the caller made and sized the
            # file; the segment maps it through a descriptor of its own and stays shared across
            # fork().
            self.shared = True
            self.fd = dup(fd)
            if self.fd < 0:
                raise ValueError(f"fd {fd} is not an open file descriptor: "
                                 f"{_os.strerror(errno)}")
            # Only shared memory (a memfd: it takes seals) may have holes punched in it, and only
            # pages inside the file may be mapped (past its end, an access dies by SIGBUS).
            if fcntl(self.fd, F_GET_SEALS) < 0:
                raise ValueError(f"fd {fd} is not a memfd (a pipe, a regular file...)")
            if fstat(self.fd, &info) != 0 or <size_t>info.st_size < <size_t>self.nbytes:
                raise ValueError(f"the memfd holds fewer than the segment's {self.nbytes} bytes")
            self.base = <char *>mmap(NULL, self.nbytes, PROT_READ | PROT_WRITE, MAP_SHARED,
                                     self.fd, 0)
            if self.base == <char *>MAP_FAILED and errno in (EACCES, EPERM):
                # EACCES: opened read-only (e.g. /proc/PID/fd/N with O_RDONLY); EPERM: a memfd
                # sealed against writes (F_SEAL_WRITE): neither is a failure to map memory.
                self.base = NULL
                raise ValueError("fd is not open for reading and writing, or is sealed against "
                                 "writes: a discache shared segment must be mapped read-write")
            self.lost = <uint8_t *>calloc(n, 1)
        elif self.code == KIND_MEMFD:
            self.fd = memfd_create(b"discache-segment", MFD_CLOEXEC)
            if self.fd < 0:
                raise _oserror(errno, "memfd_create")
            if ftruncate(self.fd, self.nbytes) != 0:
                err = errno
                close(self.fd)
                self.fd = -1
                raise _oserror(err, "ftruncate")
            self.base = <char *>mmap(NULL, self.nbytes, PROT_READ | PROT_WRITE, MAP_SHARED,
                                     self.fd, 0)
            self.lost = <uint8_t *>calloc(n, 1)
        elif self.code == KIND_ASHMEM:
            self._open_ashmem()
            self.base = <char *>mmap(NULL, self.nbytes, PROT_READ | PROT_WRITE, MAP_SHARED,
                                     self.fd, 0)
            self.lost = <uint8_t *>calloc(n, 1)  # unused: ashmem itself answers at PIN
        else:
            self.base = <char *>mmap(NULL, self.nbytes, PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            if not sigbus:  # SIGBUS mode needs no cookie
                self.saved = <uint64_t *>calloc(n, sizeof(uint64_t))
        if self.base == <char *>MAP_FAILED:
            err = errno
            self.base = NULL
            raise MemoryError(f"cannot map {self.nbytes} bytes: {_os.strerror(err)}")
        self.span_state = <uint8_t *>calloc(n, 1)
        if self.span_state == NULL or (self.saved == NULL and self.lost == NULL and not sigbus):
            raise MemoryError("cannot allocate a segment's page records")
        if self.code == KIND_MEMFD and not self.shared:
            _SHARED_SEGMENTS.add(self)
        if sigbus:
            self._register_userfaultfd()

    cdef int _open_ashmem(self) except -1:
        cdef char name[256]
        if self.nbytes > 0xFFFFFFFF:
            raise ValueError("ashmem pins take 32-bit offsets: at most 4 GiB per segment")
        self.fd = open(b"/dev/ashmem", O_RDWR | O_CLOEXEC)
        if self.fd < 0:
            raise _BackendUnavailableError(probe_ashmem()[1])
        memset(name, 0, sizeof(name))
        memcpy(name, b"discache", 8)
        ioctl(self.fd, DC_ASHMEM_SET_NAME, name)  # only a label in /proc/pid/maps
        if ioctl(self.fd, DC_ASHMEM_SET_SIZE, <size_t>self.nbytes) != 0:
            raise _oserror(errno, "ASHMEM_SET_SIZE")
        return 0

    cdef int _register_userfaultfd(self) except -1:
        """Register the mapping for SIGBUS on missing pages, then map the zero page in them."""
        cdef Py_ssize_t i
        if dc_install_sigbus_handler() != 0:
            raise _oserror(errno, "cannot install the SIGBUS handler")
        self.residency = <unsigned char *>calloc(self.npages, 1)
        if self.residency == NULL:
            raise MemoryError(f"cannot allocate the bookkeeping of {self.npages} pages")
        if self.npages < DC_COOKIE_MINCORE_PAGES:
            # Small: written like the cookie path writes small ranges (no system call per page).
            for i in range(self.npages):
                self.base[i * self.page] = 0
        self._register()
        self._fill_missing(0, self.npages)
        _SIGBUS_SEGMENTS.add(self)
        return 0

    cdef int _fill_missing(self, Py_ssize_t first, Py_ssize_t count) except -1:
        """Map the shared zero page where pages are missing: a page never touched would fault
        on first use (no memory used, never discarded)."""
        cdef long filled
        while True:
            filled = dc_uffd_fill_missing(self.uffd, self.base + first * self.page, 0, count,
                                          self.page, self.residency + first)
            if filled < 0:
                raise _oserror(errno, "UFFDIO_ZEROPAGE")
            if filled == 0:
                return 0

    cdef int _register(self) except -1:
        self.uffd = dc_uffd_open_sigbus()
        if self.uffd < 0:
            raise _oserror(errno, "userfaultfd with UFFD_FEATURE_SIGBUS")
        if dc_uffd_register_missing(self.uffd, self.base, self.nbytes) != 0:
            raise _oserror(errno, "UFFDIO_REGISTER in missing mode")
        return 0

    cdef void _register_after_fork(self) noexcept:
        if self.base == NULL:
            return
        if self.uffd >= 0:
            close(self.uffd)  # the parent's; the parent keeps its own reference
            self.uffd = -1
        try:
            self._register()
        except OSError:
            # Without the registration a discarded page would read as zeros: from now on this
            # child reports every page purged at lock and refuses unlocked access.
            if self.uffd >= 0:
                close(self.uffd)
                self.uffd = -1
            self.uffd_lost = True

    cdef bint _copy_data_into(self, int fd) noexcept:
        """Write the segment's data extents (holes skipped: they stay holes) into fd."""
        cdef long start = 0, end, n
        while start < self.nbytes:
            start = lseek(self.fd, start, SEEK_DATA)
            if start < 0:
                return errno == ENXIO  # no data past start: the rest is a hole
            end = lseek(self.fd, start, SEEK_HOLE)
            if end < 0 or end > self.nbytes:
                end = self.nbytes
            while start < end:
                n = pwrite(fd, self.base + start, end - start, start)
                if n <= 0:
                    return False
                start += n
        return True

    cdef void _own_pages_after_fork(self) noexcept:
        """In a forked child: copy the pages into a new memfd mapped at the same address, so
        that what the child writes, locks or discards is its own (as with private memory)."""
        cdef int fd
        cdef bint copied = False
        cdef void *mapping
        if self.base == NULL or self.fd < 0:
            return
        fd = memfd_create(b"discache-segment", MFD_CLOEXEC)
        if fd >= 0 and ftruncate(fd, self.nbytes) == 0:
            copied = self._copy_data_into(fd)
        if copied:
            mapping = mmap(self.base, self.nbytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
                           fd, 0)
            if mapping != MAP_FAILED:
                close(self.fd)
                self.fd = fd
                return
        if fd >= 0:
            close(fd)
        # No memfd of its own: a private copy-on-write mapping of the parent's file at least
        # keeps the child's writes from the parent, and every page counts as lost from now on.
        mapping = mmap(self.base, self.nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED,
                       self.fd, 0)
        close(self.fd)
        self.fd = -1
        self.orphaned = True
        memset(self.lost, 1, self.npages)

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.nbytes)
        self._close_files()
        free(self.saved)
        free(self.lost)
        free(self.residency)
        free(self.span_state)

    cdef void _close_files(self) noexcept:
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
        if self.uffd >= 0:
            close(self.uffd)
            self.uffd = -1

    @property
    def closed(self) -> bool:
        """True once close() has run."""
        return self.base == NULL

    @property
    def address(self) -> int:
        """Address of the first byte."""
        self._check_open()
        return <size_t>self.base

    cdef int _check_open(self) except -1:
        if self.base == NULL:
            raise ValueError("the segment is closed")
        if self.busy:
            raise RuntimeError("discardable memory is in use by another thread")
        return 0

    cdef int _check_span(self, Py_ssize_t first, Py_ssize_t count) except -1:
        self._check_open()
        if count <= 0:
            raise ValueError(f"a span needs at least one page, got {count}")
        if first < 0 or first > self.npages - count:
            raise IndexError(f"pages [{first}, {first} + {count}) are outside the segment's "
                             f"{self.npages} pages")
        return 0

    cdef int _check_spans_state(self, Py_ssize_t first, Py_ssize_t count, bint locking) except -1:
        """Refuse to lock claimed pages that are locked, or to unlock ones that are unlocked: a
        second lock would report intact pages purged, a second unlock would save the cookie as
        the page's data."""
        cdef Py_ssize_t i
        cdef uint8_t state
        for i in range(first, first + count):
            state = self.span_state[i]
            if state & PAGE_CLAIMED and (state & PAGE_UNLOCKED == 0) == locking:
                raise RuntimeError(f"pages [{first}, {first} + {count}) are "
                                   f"{'already locked' if locking else 'not locked'}")
        return 0

    cdef int _check_not_held(self, Py_ssize_t first, Py_ssize_t count, str what) except -1:
        """Refuse a span method called from outside on pages a live DiscardableMemory holds
        (unless that memory is asking its owner for this very change)."""
        cdef Py_ssize_t i
        for i in range(first, first + count):
            if self.span_state[i] & (PAGE_HELD | PAGE_ASKING) == PAGE_HELD:
                raise RuntimeError(f"pages [{first}, {first} + {count}) are held by a "
                                   f"DiscardableMemory: {what} it through the memory, not its "
                                   "segment")
        return 0

    cdef int _check_discardable(self, Py_ssize_t first, Py_ssize_t count) except -1:
        cdef Py_ssize_t i
        for i in range(first, first + count):
            if self.span_state[i] & (PAGE_CLAIMED | PAGE_UNLOCKED) == PAGE_CLAIMED:
                raise RuntimeError(f"pages [{first}, {first} + {count}) are locked: locked "
                                   "memory is never discarded")
        return 0

    cdef int _set_state(self, Py_ssize_t first, Py_ssize_t count, uint8_t bits, bint on) noexcept:
        cdef Py_ssize_t i
        for i in range(first, first + count):
            if on:
                self.span_state[i] |= bits
            else:
                self.span_state[i] &= ~bits
        return 0

    cdef int _hold(self, Py_ssize_t first, Py_ssize_t count, bint whole) except -1:
        """A DiscardableMemory takes pages [first, first+count), handed out by claim_span and
        held by no other memory; whole: it is the memory of a segment of one span."""
        cdef Py_ssize_t i
        self._check_span(first, count)
        if whole and (first != 0 or count != self.npages):
            raise ValueError(f"a DiscardableMemory without an owner spans its whole segment, "
                             f"pages [0, {self.npages}), not [{first}, {first} + {count})")
        for i in range(first, first + count):
            if not self.span_state[i] & PAGE_CLAIMED:
                raise ValueError(f"pages [{first}, {first} + {count}) were not handed out by "
                                 "claim_span(): use discache.allocate() or a manager")
            if self.span_state[i] & PAGE_HELD:
                raise RuntimeError(f"pages [{first}, {first} + {count}) are held by another "
                                   "DiscardableMemory")
        self._set_state(first, count, PAGE_HELD, True)
        return 0

    cdef int _enter_busy(self, Py_ssize_t first, Py_ssize_t count, bint unlocking) except -1:
        self.busy = True
        self.busy_first = first
        self.busy_count = count
        self.busy_unlocking = unlocking
        _BUSY_SEGMENTS.add(self)
        return 0

    cdef int _leave_busy(self) except -1:
        self.busy = False
        _BUSY_SEGMENTS.discard(self)
        return 0

    cdef bint _busy_with(self, Py_ssize_t first, Py_ssize_t count) noexcept:
        """Does the page loop running without the GIL cover any of pages [first, first+count)?
        (Another span of the same manager segment is free to use meanwhile.)"""
        return (self.busy and first < self.busy_first + self.busy_count
                and self.busy_first < first + count)

    cdef void _finish_after_fork(self) noexcept:
        """In a forked child, of a segment whose lock or unlock loop was running in another
        thread at fork(): the memory still believes in the state before that call (it changes
        its own state after the loop), so an unlock is undone (a lock half done is harmless:
        the next lock() counts the pages it restored as purged, never the reverse)."""
        cdef char *start = self.base + self.busy_first * self.page
        self.busy = False
        if self.base == NULL or not self.busy_unlocking:
            return
        if self.saved != NULL:
            dc_cookie_lock(start, self.busy_count, self.page, self.saved + self.busy_first)
        elif self.sigbus:
            # Rewrite every page (MADV_FREE may have run): a locked page must not be discarded.
            dc_sigbus_lock(start, self.busy_count, self.page, -1 if self.uffd_lost else self.uffd,
                           NULL if self.uffd_lost else self.residency + self.busy_first)

    cdef Py_ssize_t _lock(self, Py_ssize_t first, Py_ssize_t count) except -1:
        """Lock a checked span; how many of its pages were discarded while it was unlocked."""
        cdef Py_ssize_t purged
        self._check_spans_state(first, count, True)
        purged = self._lock_pages(first, count)
        self._set_state(first, count, PAGE_UNLOCKED, False)
        return purged

    cdef Py_ssize_t _lock_pages(self, Py_ssize_t first, Py_ssize_t count) except -1:
        cdef char *start = self.base + first * self.page
        cdef long purged = 0
        cdef Py_ssize_t i
        cdef int rc, err
        if self.code == KIND_MEMFD:
            for i in range(first, first + count):
                purged += self.lost[i]
                self.lost[i] = 0
            return purged
        if self.code == KIND_ASHMEM:
            rc = dc_ashmem_pin(self.fd, DC_ASHMEM_PIN, first * self.page, count * self.page)
            if rc < 0:
                raise _oserror(errno, "ASHMEM_PIN")
            # ashmem answers for the whole span: every page counts as purged.
            return count if rc == DC_ASHMEM_WAS_PURGED else 0
        if not self.sigbus:
            if count < NOGIL_PAGES:
                return dc_cookie_lock(start, count, self.page, self.saved + first)
            self._enter_busy(first, count, False)
            with nogil:
                purged = dc_cookie_lock(start, count, self.page, self.saved + first)
            self._leave_busy()
            return purged
        # A purged page faults here: our handler must be the one to catch it.
        if dc_install_sigbus_handler() != 0:
            raise _oserror(errno, "cannot reinstall the SIGBUS handler")
        if self.uffd_lost:
            # Pages fault in as zeros now; which ones the kernel discarded cannot be known.
            dc_sigbus_lock(start, count, self.page, -1, NULL)
            return count
        if count < NOGIL_PAGES:
            purged = dc_sigbus_lock(start, count, self.page, self.uffd, self.residency + first)
        else:
            self._enter_busy(first, count, False)
            with nogil:
                purged = dc_sigbus_lock(start, count, self.page, self.uffd,
                                        self.residency + first)
            self._leave_busy()
        if purged < 0:
            err = errno
            raise _oserror(err, "cannot fill a purged page through the userfaultfd")
        return purged

    cdef int _unlock(self, Py_ssize_t first, Py_ssize_t count) except -1:
        """Unlock a checked span: the kernel (madvfree, ashmem) or a policy may discard it."""
        self._check_spans_state(first, count, False)
        self._unlock_pages(first, count)
        self._set_state(first, count, PAGE_UNLOCKED, True)
        return 0

    cdef int _unlock_pages(self, Py_ssize_t first, Py_ssize_t count) except -1:
        cdef char *start = self.base + first * self.page
        cdef size_t length = count * self.page
        cdef uint64_t *saved = self.saved + first if self.saved != NULL else NULL
        cdef int rc, err
        if self.code == KIND_MEMFD:
            return 0
        if self.code == KIND_ASHMEM:
            if dc_ashmem_pin(self.fd, DC_ASHMEM_UNPIN, first * self.page, length) < 0:
                raise _oserror(errno, "ASHMEM_UNPIN")
            return 0
        if count < NOGIL_PAGES:
            if saved != NULL:
                dc_cookie_unlock(start, count, self.page, saved)
            rc = madvise(start, length, MADV_FREE)
        else:
            self._enter_busy(first, count, True)
            with nogil:
                if saved != NULL:
                    dc_cookie_unlock(start, count, self.page, saved)
                rc = madvise(start, length, MADV_FREE)
            self._leave_busy()
        if rc != 0:
            err = errno
            if saved != NULL:
                dc_cookie_lock(start, count, self.page, saved)
            raise _oserror(err, "madvise(MADV_FREE)")
        return 0

    def lock_span(self, Py_ssize_t first, Py_ssize_t count) -> int:
        """Lock pages [first, first+count); returns how many of them were discarded meanwhile."""
        self._check_span(first, count)
        self._check_not_held(first, count, "lock")
        return self._lock(first, count)

    def unlock_span(self, Py_ssize_t first, Py_ssize_t count) -> None:
        """Unlock pages [first, first+count): the kernel (madvfree) or a policy may discard them."""
        self._check_span(first, count)
        self._check_not_held(first, count, "unlock")
        self._unlock(first, count)

    def unlock_spans(self, spans) -> int:
        """Unlock many (first, count) spans, one madvise per run of adjacent ones; returns the
        number of runs (system calls)."""
        cdef Py_ssize_t first, count, run_first = -1, run_end = -1, runs = 0
        ordered = sorted(spans)
        for first, count in ordered:
            self._check_span(first, count)
            if first < run_end:  # overlapping spans: the second unlock would refuse half-way
                raise ValueError(f"spans overlap at page {first}")
            run_end = first + count
            self._check_not_held(first, count, "unlock")
            self._check_spans_state(first, count, False)
        run_end = -1
        for first, count in ordered:
            if first == run_end:
                run_end += count
                continue
            if run_first >= 0:
                self._unlock(run_first, run_end - run_first)
                runs += 1
            run_first, run_end = first, first + count
        if run_first >= 0:
            self._unlock(run_first, run_end - run_first)
            runs += 1
        return runs

    def discard_span(self, Py_ssize_t first, Py_ssize_t count) -> None:
        """Throw an unlocked span's pages away now (a policy purge); the next lock reports them."""
        self._check_span(first, count)
        self._check_discardable(first, count)
        self._drop(first, count, 1)

    def claim_span(self, Py_ssize_t first, Py_ssize_t count) -> None:
        """Hand out pages as a new locked span: forget what happened to their last owner."""
        cdef Py_ssize_t i
        self._check_span(first, count)
        for i in range(first, first + count):
            if self.span_state[i] & PAGE_CLAIMED:
                # Claimed again, its lost marks would be forgotten: a purge never reported.
                raise RuntimeError(f"pages [{first}, {first} + {count}) are already handed out")
        if self.lost != NULL:
            for i in range(first, first + count):
                self.lost[i] = 0
        if self.sigbus:
            self._fill_missing(first, count)  # a released span's pages are missing: they would fault
        elif self.code == KIND_ASHMEM and dc_ashmem_pin(self.fd, DC_ASHMEM_PIN, first * self.page,
                                                        count * self.page) < 0:
            raise _oserror(errno, "ASHMEM_PIN")
        self.claimed += count
        self._set_state(first, count, PAGE_CLAIMED, True)
        self._set_state(first, count, PAGE_UNLOCKED, False)

    def release_span(self, Py_ssize_t first, Py_ssize_t count) -> None:
        """Give a freed span's pages back to the kernel (MADV_DONTNEED / punch hole)."""
        cdef Py_ssize_t i
        self._check_span(first, count)
        self._check_not_held(first, count, "close")
        self._drop(first, count, 0)
        for i in range(first, first + count):
            self.claimed -= self.span_state[i] & PAGE_CLAIMED  # a page never claimed: no count
            self.span_state[i] = 0

    cdef int _drop(self, Py_ssize_t first, Py_ssize_t count, uint8_t lost) except -1:
        """Free the pages (they read back as zeros, or fault in SIGBUS mode); memfd: record them
        as lost or not."""
        cdef Py_ssize_t i
        if self.code == KIND_ASHMEM:
            # ashmem purges only whole unpinned regions, every one of the system's at once; the
            # next PIN reports it.  A released span's pages stay until the segment is unmapped.
            if lost and ioctl(self.fd, DC_ASHMEM_PURGE_ALL_CACHES) < 0:
                raise _oserror(errno, "ASHMEM_PURGE_ALL_CACHES")
            return 0
        if self.code == KIND_MADVFREE:
            if madvise(self.base + first * self.page, count * self.page, MADV_DONTNEED) != 0:
                raise _oserror(errno, "madvise(MADV_DONTNEED)")
            return 0
        if self.orphaned:
            if madvise(self.base + first * self.page, count * self.page, MADV_DONTNEED) != 0:
                raise _oserror(errno, "madvise(MADV_DONTNEED)")
        elif self._punch(first, count) != 0:
            raise _oserror(errno, "fallocate(PUNCH_HOLE)")
        for i in range(first, first + count):
            self.lost[i] = lost or self.orphaned
        return 0

    cdef int _punch(self, Py_ssize_t first, Py_ssize_t count) noexcept nogil:
        """Punch pages [first, first+count) out of the memfd (they read back as zeros, in every
        process mapping it); 0, or -1 with errno.  Runs without the GIL."""
        return fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                         first * self.page, count * self.page)

    def reclaim_span(self, Py_ssize_t first, Py_ssize_t count) -> int:
        """Make the kernel discard the span's unlocked pages now; returns how many are gone.

        madvfree: see reclaim_unlocked (a page the kernel keeps is not counted).  memfd: without
        swap the kernel cannot reclaim shmem, so this punches a hole; ashmem: a purge."""
        self._check_span(first, count)
        self._check_discardable(first, count)
        if self.code != KIND_MADVFREE:
            self.discard_span(first, count)
            return count
        gone, self.reclaim_attempts = reclaim_unlocked(
            lambda advice: self._advise(advice, first, count),
            lambda: self.resident_pages(first, count), count)
        return gone

    def _advise(self, int advice, Py_ssize_t first, Py_ssize_t count) -> None:
        """madvise(advice) of pages [first, first+count)."""
        self._check_span(first, count)
        if madvise(self.base + first * self.page, count * self.page, advice) != 0:
            raise _oserror(errno, f"madvise({advice})")

    def resident_pages(self, Py_ssize_t first=0, Py_ssize_t count=-1) -> int:
        """How many pages of the span mincore() says are resident."""
        cdef Py_ssize_t i, resident = 0
        if count < 0:
            count = self.npages - first
        self._check_span(first, count)
        vec = bytearray(count)
        cdef unsigned char[:] v = vec
        if mincore(self.base + first * self.page, count * self.page, &v[0]) != 0:
            raise _oserror(errno, "mincore")
        for i in range(count):
            resident += v[i] & 1
        return resident

    cdef int _check_unlocked_access(self) except -1:
        """Refuse raw access to unlocked pages unless SIGBUS mode guards it."""
        if not self.sigbus:
            raise RuntimeError("discardable memory is unlocked: lock() it first (only the "
                               "madvfree-sigbus backend reads and writes unlocked memory)")
        if self.uffd_lost:
            raise RuntimeError("this forked child could not register the memory with a "
                               "userfaultfd: lock() it first")
        # Someone (faulthandler.enable()) may have put another SIGBUS handler over ours.
        if not dc_sigbus_handler_installed() and dc_install_sigbus_handler() != 0:
            raise _oserror(errno, "cannot reinstall the SIGBUS handler")
        return 0

    cdef int _copy(self, char *dst, const char *src, Py_ssize_t size) except -1:
        """memcpy to or from the mapping; in SIGBUS mode guarded, since a discarded page (of an
        unlocked or released span) faults: PurgedPageError instead of the process dying."""
        cdef size_t fault = 0, page_address
        if not self.sigbus:
            memcpy(dst, src, size)
            return 0
        if not dc_sigbus_handler_installed() and dc_install_sigbus_handler() != 0:
            raise _oserror(errno, "cannot reinstall the SIGBUS handler")
        if dc_guarded_copy(dst, src, size, <size_t>self.base, <size_t>(self.base + self.nbytes),
                           &fault) != 0:
            page_address = fault - fault % self.page
            raise _PurgedPageError(page_address, f"page at offset {page_address - <size_t>self.base}"
                                   " of the segment was discarded: lock its span and refill it")
        return 0

    def read(self, Py_ssize_t offset, Py_ssize_t size) -> bytes:
        """Copy size bytes out from offset (the caller has the span locked)."""
        cdef bytes out
        self._check_open()
        if offset < 0 or size < 0 or offset > self.nbytes - size:
            raise IndexError(f"bytes [{offset}, {offset} + {size}) are outside the segment")
        out = PyBytes_FromStringAndSize(NULL, size)
        self._copy(PyBytes_AS_STRING(out), self.base + offset, size)
        return out

    def write(self, Py_ssize_t offset, const unsigned char[::1] data) -> int:
        """Copy data in at offset (the caller has the span locked); returns its length."""
        cdef Py_ssize_t size = data.shape[0]
        self._check_open()
        if offset < 0 or offset > self.nbytes - size:
            raise IndexError(f"bytes [{offset}, {offset} + {size}) are outside the segment")
        if size:
            self._copy(self.base + offset, <const char *>&data[0], size)
        return size

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        self._check_open()
        if self.sigbus:
            # A raw view would reach unlocked pages, and one the kernel discarded kills the process.
            raise BufferError("a SIGBUS-mode segment exports no buffer of itself: use its "
                              "memory's .data (locked) or read()/write()")
        PyBuffer_FillInfo(buffer, self, self.base, self.nbytes, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.exports -= 1

    def span_buffer(self, Py_ssize_t offset, Py_ssize_t size) -> SpanBuffer:
        """An object exporting bytes [offset, offset+size) through the buffer protocol."""
        return SpanBuffer(self, offset, size)

    def fileno(self) -> int:
        """The file descriptor of a "memfd" or "ashmem" segment."""
        self._check_open()
        if self.fd < 0:
            raise ValueError("a madvfree segment has no file descriptor")
        return self.fd

    def close(self) -> None:
        """Unmap the segment; refused while buffers of it live or spans of it are handed out
        (close those: a DiscardableMemory of its own segment closes it). Calling it again does
        nothing."""
        if self.base != NULL and self.claimed:
            raise RuntimeError(f"{self.claimed} pages of the segment are handed out as "
                               "discardable memory: close the memory instead")
        self._unmap()

    cdef int _unmap(self) except -1:
        """close() without the check of spans handed out: the memory of a segment of one span."""
        if self.base == NULL:
            return 0
        if self.busy:
            raise RuntimeError("discardable memory is in use by another thread")
        if self.exports:
            raise BufferError(f"{self.exports} buffer(s) of the segment are still alive")
        munmap(self.base, self.nbytes)
        self.base = NULL
        self._close_files()
        return 0

    def __repr__(self) -> str:
        state = "closed" if self.base == NULL else f"{self.npages} pages"
        mode = " sigbus" if self.sigbus else ""
        return f"<Segment {self.kind}{mode} {state}>"


cdef class SpanBuffer:
    """The buffer of one span of a segment: counts its exports, so that unlock and close can
    refuse while any view (or slice of one) is alive."""

    def __cinit__(self, Segment segment, Py_ssize_t offset, Py_ssize_t size):
        segment._check_open()
        if offset < 0 or size < 0 or offset > segment.nbytes - size:
            raise IndexError(f"bytes [{offset}, {offset} + {size}) are outside the segment")
        self.segment = segment
        self.offset = offset
        self.size = size

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        cdef Py_ssize_t i
        self.segment._check_open()
        if self.segment.sigbus:
            # Raw access to a discarded page kills the process: only claimed, locked pages.
            for i in range(self.offset // self.segment.page,
                           (self.offset + self.size + self.segment.page - 1) // self.segment.page):
                if self.segment.span_state[i] & (PAGE_CLAIMED | PAGE_UNLOCKED) != PAGE_CLAIMED:
                    raise BufferError("a SIGBUS-mode span exports a buffer only while it is "
                                      "handed out and locked")
        PyBuffer_FillInfo(buffer, self, self.segment.base + self.offset, self.size, 0, flags)
        self.exports += 1
        self.segment.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.exports -= 1
        self.segment.exports -= 1
