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
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint64_t, uint8_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

import weakref as _weakref

from discache.errors import BackendUnavailableError as _BackendUnavailableError

SEGMENT_KINDS = ("madvfree", "memfd", "ashmem")
cdef enum:
    KIND_MADVFREE = 0
    KIND_MEMFD = 1
    KIND_ASHMEM = 2

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


def _own_segments_after_fork() -> None:
    for segment in list(_SHARED_SEGMENTS):
        (<Segment>segment)._own_pages_after_fork()
    for segment in list(_SIGBUS_SEGMENTS):
        (<Segment>segment)._register_after_fork()


_os.register_at_fork(after_in_child=_own_segments_after_fork)


cdef class Segment:
    """npages of discardable memory whose page spans lock and unlock independently; all locked."""

    def __cinit__(self, npages, str kind="madvfree", bint sigbus=False, int fd=-1):
        cdef Py_ssize_t n
        cdef int err
        self.fd = -1
        self.uffd = -1
        self.page = sysconf(_SC_PAGESIZE)
        if kind not in SEGMENT_KINDS:
            raise ValueError(f"segment kind must be one of {SEGMENT_KINDS}, got {kind!r}")
        if sigbus and kind != "madvfree":
            raise ValueError(f"sigbus=True needs a madvfree segment, not {kind!r}")
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
            self.base = <char *>mmap(NULL, self.nbytes, PROT_READ | PROT_WRITE, MAP_SHARED,
                                     self.fd, 0)
            if self.base == <char *>MAP_FAILED and errno == EACCES:
                self.base = NULL  # opened read-only (e.g. /proc/PID/fd/N with O_RDONLY)
                raise ValueError("fd is not open for reading and writing: a discache shared "
                                 "segment must be mapped read-write")
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
        if self.saved == NULL and self.lost == NULL and not sigbus:
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

    cdef Py_ssize_t _lock(self, Py_ssize_t first, Py_ssize_t count) except -1:
        """Lock a checked span; how many of its pages were discarded while it was unlocked."""
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
            self.busy = True
            with nogil:
                purged = dc_cookie_lock(start, count, self.page, self.saved + first)
            self.busy = False
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
            self.busy = True
            with nogil:
                purged = dc_sigbus_lock(start, count, self.page, self.uffd,
                                        self.residency + first)
            self.busy = False
        if purged < 0:
            err = errno
            raise _oserror(err, "cannot fill a purged page through the userfaultfd")
        return purged

    cdef int _unlock(self, Py_ssize_t first, Py_ssize_t count) except -1:
        """Unlock a checked span: the kernel (madvfree, ashmem) or a policy may discard it."""
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
            self.busy = True
            with nogil:
                if saved != NULL:
                    dc_cookie_unlock(start, count, self.page, saved)
                rc = madvise(start, length, MADV_FREE)
            self.busy = False
        if rc != 0:
            err = errno
            if saved != NULL:
                dc_cookie_lock(start, count, self.page, saved)
            raise _oserror(err, "madvise(MADV_FREE)")
        return 0

    def lock_span(self, Py_ssize_t first, Py_ssize_t count) -> int:
        """Lock pages [first, first+count); returns how many of them were discarded meanwhile."""
        self._check_span(first, count)
        return self._lock(first, count)

    def unlock_span(self, Py_ssize_t first, Py_ssize_t count) -> None:
        """Unlock pages [first, first+count): the kernel (madvfree) or a policy may discard them."""
        self._check_span(first, count)
        self._unlock(first, count)

    def unlock_spans(self, spans) -> int:
        """Unlock many (first, count) spans, one madvise per run of adjacent ones; returns the
        number of runs (system calls)."""
        cdef Py_ssize_t first, count, run_first = -1, run_end = -1, runs = 0
        ordered = sorted(spans)
        for first, count in ordered:
            self._check_span(first, count)
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
        self._drop(first, count, 1)

    def claim_span(self, Py_ssize_t first, Py_ssize_t count) -> None:
        """Hand out pages as a new locked span: forget what happened to their last owner."""
        cdef Py_ssize_t i
        self._check_span(first, count)
        if self.lost != NULL:
            for i in range(first, first + count):
                self.lost[i] = 0
        if self.sigbus:
            self._fill_missing(first, count)  # a released span's pages are missing: they would fault
        elif self.code == KIND_ASHMEM and dc_ashmem_pin(self.fd, DC_ASHMEM_PIN, first * self.page,
                                                        count * self.page) < 0:
            raise _oserror(errno, "ASHMEM_PIN")
        self.claimed += count

    def release_span(self, Py_ssize_t first, Py_ssize_t count) -> None:
        """Give a freed span's pages back to the kernel (MADV_DONTNEED / punch hole)."""
        self._check_span(first, count)
        self._drop(first, count, 0)
        self.claimed -= count

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

    def read(self, Py_ssize_t offset, Py_ssize_t size) -> bytes:
        """Copy size bytes out from offset (the caller has the span locked)."""
        self._check_open()
        if offset < 0 or size < 0 or offset > self.nbytes - size:
            raise IndexError(f"bytes [{offset}, {offset} + {size}) are outside the segment")
        return PyBytes_FromStringAndSize(self.base + offset, size)

    def write(self, Py_ssize_t offset, const unsigned char[::1] data) -> int:
        """Copy data in at offset (the caller has the span locked); returns its length."""
        cdef Py_ssize_t size = data.shape[0]
        self._check_open()
        if offset < 0 or offset > self.nbytes - size:
            raise IndexError(f"bytes [{offset}, {offset} + {size}) are outside the segment")
        if size:
            memcpy(self.base + offset, &data[0], size)
        return size

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        self._check_open()
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
        self.segment._check_open()
        PyBuffer_FillInfo(buffer, self, self.segment.base + self.offset, self.size, 0, flags)
        self.exports += 1
        self.segment.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.exports -= 1
        self.segment.exports -= 1
