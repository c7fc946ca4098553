# A mapping carved into page spans that lock, unlock and are discarded independently: the unit
# DiscardableMemoryManager packs small allocations into, and (one span) what discache.allocate
# gives on "memfd".  The segment protocol is in docs/glossary.md.  Included by _core.pyx.
#
# "madvfree": unlocking a span saves each page's first word, stores the cookie there and
# MADV_FREEs the span; locking swaps the cookie back by compare-and-swap, so a page the kernel
# discarded (it reads zero) is counted as purged (Chromium's scheme).  "memfd": shared memory the
# kernel does not reclaim without swap; discard_span punches a hole and marks the pages lost.

from cpython.buffer cimport PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint64_t, uint8_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

import weakref as _weakref

SEGMENT_KINDS = ("madvfree", "memfd")

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
# _own_pages_after_fork), or parent and child would share every span.
_SHARED_SEGMENTS = _weakref.WeakSet()


def _own_shared_segments_after_fork() -> None:
    for segment in list(_SHARED_SEGMENTS):
        (<Segment>segment)._own_pages_after_fork()


_os.register_at_fork(after_in_child=_own_shared_segments_after_fork)


cdef class Segment:
    """npages of discardable memory whose page spans lock and unlock independently; all locked."""

    def __cinit__(self, npages, str kind="madvfree"):
        cdef Py_ssize_t n
        cdef int err
        self.fd = -1
        self.page = sysconf(_SC_PAGESIZE)
        if kind not in SEGMENT_KINDS:
            raise ValueError(f"segment kind must be one of {SEGMENT_KINDS}, got {kind!r}")
        n = _validate.size(npages, "npages", (1 << 40) // self.page)
        self.kind = kind
        self.npages = n
        self.nbytes = n * self.page
        if kind == "memfd":
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
        else:
            self.base = <char *>mmap(NULL, self.nbytes, PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            self.saved = <uint64_t *>calloc(n, sizeof(uint64_t))
        if self.base == <char *>MAP_FAILED:
            err = errno
            self.base = NULL
            raise MemoryError(f"cannot map {self.nbytes} bytes: {_os.strerror(err)}")
        if self.saved == NULL and self.lost == NULL:
            raise MemoryError("cannot allocate a segment's page records")
        if self.fd >= 0:
            _SHARED_SEGMENTS.add(self)

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
        if self.fd >= 0:
            close(self.fd)
        free(self.saved)
        free(self.lost)

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
        return 0

    cdef int _check_span(self, Py_ssize_t first, Py_ssize_t count) except -1:
        self._check_open()
        if count <= 0:
            raise ValueError(f"a span needs at least one page, got {count}")
        if first < 0 or first > self.npages - count:
            raise IndexError(f"pages [{first}, {first} + {count}) are outside the segment's "
                             f"{self.npages} pages")
        return 0

    def lock_span(self, Py_ssize_t first, Py_ssize_t count) -> int:
        """Lock pages [first, first+count); returns how many of them were discarded meanwhile."""
        cdef Py_ssize_t i, purged = 0
        self._check_span(first, count)
        if self.kind == "madvfree":
            return dc_cookie_lock(self.base + first * self.page, count, self.page,
                                  self.saved + first)
        for i in range(first, first + count):
            purged += self.lost[i]
            self.lost[i] = 0
        return purged

    def unlock_span(self, Py_ssize_t first, Py_ssize_t count) -> None:
        """Unlock pages [first, first+count): the kernel (madvfree) or a policy may discard them."""
        self._check_span(first, count)
        self._unlock(first, count)

    cdef int _unlock(self, Py_ssize_t first, Py_ssize_t count) except -1:
        cdef char *start = self.base + first * self.page
        cdef int err
        if self.kind != "madvfree":
            return 0
        dc_cookie_unlock(start, count, self.page, self.saved + first)
        if madvise(start, count * self.page, MADV_FREE) != 0:
            err = errno
            dc_cookie_lock(start, count, self.page, self.saved + first)
            raise _oserror(err, "madvise(MADV_FREE)")
        return 0

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
        """Throw pages away now (a policy purge); the next lock_span reports them."""
        self._check_span(first, count)
        self._drop(first, count, 1)

    def claim_span(self, Py_ssize_t first, Py_ssize_t count) -> None:
        """Hand out pages as a new locked span: forget what happened to their last owner."""
        cdef Py_ssize_t i
        self._check_span(first, count)
        if self.lost != NULL:
            for i in range(first, first + count):
                self.lost[i] = 0

    def release_span(self, Py_ssize_t first, Py_ssize_t count) -> None:
        """Give a freed span's pages back to the kernel (MADV_DONTNEED / punch hole)."""
        self._check_span(first, count)
        self._drop(first, count, 0)

    cdef int _drop(self, Py_ssize_t first, Py_ssize_t count, uint8_t lost) except -1:
        """Free the pages (they read back as zeros); memfd: record them as lost or not."""
        cdef Py_ssize_t i
        if self.kind == "madvfree":
            if madvise(self.base + first * self.page, count * self.page, MADV_DONTNEED) != 0:
                raise _oserror(errno, "madvise(MADV_DONTNEED)")
            return 0
        if self.orphaned:
            if madvise(self.base + first * self.page, count * self.page, MADV_DONTNEED) != 0:
                raise _oserror(errno, "madvise(MADV_DONTNEED)")
        elif fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                       first * self.page, count * self.page) != 0:
            raise _oserror(errno, "fallocate(PUNCH_HOLE)")
        for i in range(first, first + count):
            self.lost[i] = lost or self.orphaned
        return 0

    def reclaim_span(self, Py_ssize_t first, Py_ssize_t count) -> int:
        """Make the kernel discard the span's unlocked pages now; returns how many are gone.

        madvfree: see reclaim_unlocked (a page the kernel keeps is not counted).  memfd: without
        swap the kernel cannot reclaim shmem, so this punches a hole."""
        self._check_span(first, count)
        if self.kind == "memfd":
            self.discard_span(first, count)
            return count
        return reclaim_unlocked(lambda advice: self._advise(advice, first, count),
                                lambda: self.resident_pages(first, count), count)[0]

    def _advise(self, int advice, Py_ssize_t first, Py_ssize_t count) -> None:
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
        """The memfd of a "memfd" segment."""
        self._check_open()
        if self.fd < 0:
            raise ValueError("a madvfree segment has no file descriptor")
        return self.fd

    def close(self) -> None:
        """Unmap the segment; refused while buffers of it live. Calling it again does nothing."""
        if self.base == NULL:
            return
        if self.exports:
            raise BufferError(f"{self.exports} buffer(s) of the segment are still alive")
        munmap(self.base, self.nbytes)
        self.base = NULL
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        state = "closed" if self.base == NULL else f"{self.npages} pages"
        return f"<Segment {self.kind} {state}>"


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
