# DiscardableMemory, the one class of every allocation: pages [first, first+npages) of a segment.
# It owns its state (locked, closed, purged pages, the views it handed out) and checks every
# misuse once; the segment does what the kernel is asked.  A manager's allocations ask the manager
# (their SpanOwner) for every change, under its lock; discache.allocate(n) is a segment of one
# span, which the memory drives directly (compiled, no Python call on the way to the system call).
# Included by _core.pyx; declared in _span.pxd.

from cpython.buffer cimport (
    PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_FillInfo, PyBuffer_Release, PyObject_GetBuffer,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memmove

from discache.errors import PurgedError as _PurgedError, PurgedPageError as _PurgedPageError


# discache.tracing's recorder while a trace is recorded, else None: a C global, so that a hook
# costs one pointer comparison (set through _set_recorder by discache.tracing alone).
cdef object _recorder = None


def _set_recorder(recorder) -> None:
    """Where DiscardableMemory reports its events (discache.tracing), or None."""
    global _recorder
    _recorder = recorder


cdef class DiscardableMemory:
    """Memory the system may discard while unlocked; lock() reports whether it did.

    Made by discache.allocate() and DiscardableMemoryManager.allocate(), returned locked."""

    def __cinit__(self, owner, segment, Py_ssize_t first, Py_ssize_t npages, Py_ssize_t nbytes,
                  ticket=None, str backend=None):
        if isinstance(segment, Segment):
            self.seg = <Segment>segment
            self.seg._check_span(first, npages)
        elif getattr(segment, "claim_span", None) is None or not hasattr(segment, "mutex"):
            raise TypeError(f"a DiscardableMemory is a span of a segment, not of a "
                            f"{type(segment).__name__}; use discache.allocate()")
        if npages <= 0 or nbytes <= 0 or nbytes > npages * page_size():
            raise ValueError(f"{nbytes} bytes do not fit a span of {npages} pages")
        self.owner = owner
        self.segment_ = segment
        self.first = first
        self.npages = npages
        self.nbytes = nbytes
        self.ticket = ticket
        self.backend = backend if backend is not None else owner.backend
        self.locked = True
        if _recorder is not None: _recorder.allocate(self)

    def __copy__(self):
        raise TypeError(f"{type(self).__name__} cannot be copied: the copy would share the "
                        "memory and its lock state; allocate new memory and write into it")

    def __deepcopy__(self, memo):
        return self.__copy__()

    def __reduce_ex__(self, protocol):
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied")

    @property
    def is_locked(self) -> bool:
        """True while locked (the pages cannot be discarded)."""
        return self.locked and not self.closed_

    @property
    def closed(self) -> bool:
        """True once closed."""
        return self.closed_

    @property
    def segment(self):
        """The segment holding the span (None once closed)."""
        return None if self.closed_ else self.segment_

    @property
    def offset(self) -> int:
        """Byte offset of the memory in its segment."""
        return self.first * page_size()

    @property
    def address(self):
        """Address of the first byte (valid while open; read or write it only while locked), or
        None for a segment without a mapping of its own (simulated)."""
        self._check_open()
        if self.seg is not None:
            return <size_t>(self.seg.base + self.first * self.seg.page)
        base = getattr(self.segment_, "address", None)
        return None if base is None else base + self.first * page_size()

    @property
    def sigbus(self) -> bool:
        """True if a discarded page faults (PurgedPageError) instead of reading as zeros."""
        return self.seg is not None and self.seg.sigbus

    @property
    def reclaim_attempts(self) -> int:
        """Rounds the last forced reclaim of a madvfree segment needed."""
        return self.seg.reclaim_attempts if self.seg is not None else 0

    cdef object _mutex(self):
        """The lock of a manager's span (the manager's) or of a Python segment's (simulated),
        asked each time: a forked child makes itself new ones."""
        return self.owner.mutex if self.owner is not None else self.segment_.mutex

    cdef int _check_open(self) except -1:
        if self.closed_:
            raise ValueError("discardable memory is closed")
        if self.seg is not None and self.seg.base == NULL:
            raise ValueError("discardable memory is closed: its segment was unmapped")
        if self.seg is not None and self.seg.busy:
            raise RuntimeError("discardable memory is in use by another thread")
        return 0

    cdef int _check_locked(self) except -1:
        self._check_open()
        if not self.locked:
            raise RuntimeError("discardable memory is unlocked: lock() it first")
        return 0

    # ---------------------------------------------------------------- lock, unlock, close

    def lock(self) -> bool:
        """Lock; True if intact, False if anything was purged (contents undefined: refill)."""
        if self.owner is None and self.seg is not None:
            return self._lock_now() == 1
        with self._mutex():
            return self._lock_now() == 1

    cdef int _lock_now(self) except -1:
        cdef Py_ssize_t lost
        self._check_open()
        if self.locked:
            raise RuntimeError("discardable memory is already locked (locks do not nest)")
        if self.owner is not None:
            lost = self.owner.lock_span(self)
        elif self.seg is not None:
            lost = self.seg._lock(self.first, self.npages)
        else:
            lost = self.segment_.lock_span(self.first, self.npages)
        self.locked = True
        self.purged_pages = lost
        if _recorder is not None: _recorder.lock(self, lost)
        return lost == 0

    def unlock(self) -> None:
        """Unlock: the kernel or a policy may now discard the memory; .data is unusable until
        the next lock()."""
        if self.owner is None and self.seg is not None:
            self._unlock_now()
            return
        with self._mutex():
            self._unlock_now()

    cdef int _unlock_now(self) except -1:
        self._prepare_unlock()
        if self.owner is not None:
            self.owner.unlock_span(self)
        elif self.seg is not None:
            self.seg._unlock(self.first, self.npages)
        else:
            self.segment_.unlock_span(self.first, self.npages)
        self.locked = False
        if _recorder is not None: _recorder.unlock(self)
        return 0

    def prepare_unlock(self) -> None:
        """Refuse (BufferError, RuntimeError, ValueError) unless the memory can be unlocked now;
        release the view handed out.  For the owner's batch unlock; then mark_unlocked()."""
        self._prepare_unlock()

    cdef int _prepare_unlock(self) except -1:
        self._check_open()
        if not self.locked:
            raise RuntimeError("discardable memory is not locked")
        self._release_views()
        return 0

    def mark_unlocked(self) -> None:
        """The owner unlocked the span (a batch unlock, after prepare_unlock())."""
        self.locked = False
        if _recorder is not None: _recorder.unlock(self)

    def close(self) -> None:
        """Free the memory (locked or not); calling it again does nothing."""
        if self.owner is None and self.seg is not None:
            self._close_now()
            return
        with self._mutex():
            self._close_now()

    def _close_now(self):
        if self.closed_:
            return
        if self.seg is not None and self.seg.busy:
            raise RuntimeError("discardable memory is in use by another thread")
        self._release_views()
        if self.owner is not None:
            self.owner.close_span(self)
        elif self.seg is not None:
            self.seg._unmap()
        else:
            self.segment_.close()
        self.closed_ = True
        self.locked = False
        if _recorder is not None: _recorder.close(self)

    def _purge(self) -> int:
        """Discard the pages now if unlocked (a policy's purge); returns how many went."""
        if self.owner is None and self.seg is not None:
            return self._purge_now()
        with self._mutex():
            return self._purge_now()

    def _purge_now(self):
        self._check_open()
        if self.locked:
            return 0
        if self.owner is not None:
            return self.owner.purge_span(self)
        self.segment_.discard_span(self.first, self.npages)
        if _recorder is not None: _recorder.purge(self)
        return self.npages

    def _force_reclaim(self, Py_ssize_t first=0, Py_ssize_t count=-1) -> int:
        """Make the kernel reclaim pages [first, first+count) of the span (-1: to the end) now
        if unlocked (discache.force_reclaim); returns how many are gone.  A manager's span and
        a simulated one are reclaimed whole."""
        gone = self._reclaim_now(first, count)
        if _recorder is not None and not self.locked: _recorder.reclaim(self, gone)
        return gone

    def _reclaim_now(self, Py_ssize_t first, Py_ssize_t count) -> int:
        if count < 0:
            count = self.npages - first
        if first < 0 or count <= 0 or first + count > self.npages:
            raise ValueError(f"pages [{first}, {first}+{count}) are outside the memory")
        if self.owner is not None or self.seg is None:
            if count != self.npages:
                raise ValueError(f"a {self.backend} span is reclaimed whole, not pages "
                                 f"[{first}, {first}+{count})")
            # Under the owner's lock: a lock() from another thread in the middle of the reclaim
            # would have its pages freed again and paged out (the reclaim retries) while locked.
            with self._mutex():
                self._check_open()
                if self.locked:
                    return 0
                if self.owner is not None:
                    return self.owner.reclaim_span(self)
                return self.segment_.reclaim_span(self.first, self.npages)
        # A segment of one span, compiled: no lock, so the reclaim re-checks the state at every
        # madvise (the GIL is released between them); a page locked meanwhile is left alone.
        self._check_open()
        if self.locked:
            return 0
        if self.seg.code != KIND_MADVFREE:
            return self.seg.reclaim_span(self.first + first, count)
        gone, self.seg.reclaim_attempts = reclaim_unlocked(
            lambda advice: self._advise(advice, False, first, count),
            lambda: self._resident_pages(first, count), count)
        return gone

    # ---------------------------------------------------------------- raw access

    @property
    def data(self) -> memoryview:
        """Writable view of the nbytes, only while locked; released by unlock() and close()."""
        cdef object view = self.view
        if view is not None and self.locked and not self.closed_:
            try:
                view.nbytes
                return view
            except ValueError:  # the caller released it (`with mem.data as v:`)
                pass
        if self.owner is None and self.seg is not None:
            return self._new_view()
        with self._mutex():  # an unlock() in another thread must not come in between
            return self._new_view()

    def _new_view(self):
        self._check_locked()
        with memoryview(self._exporter()) as whole:
            self.view = whole[:self.nbytes]
        return self.view

    cdef object _exporter(self):
        """The object exporting the locked span's bytes during this lock (created on first use:
        a lock/unlock cycle that touches no view makes none)."""
        if self.buffer is None:
            if self.owner is not None:
                self.buffer = self.owner.span_buffer(self)
            elif self.seg is not None:
                self.buffer = self.seg.span_buffer(self.first * self.seg.page, self.nbytes)
            else:
                self.buffer = self.segment_.span_buffer(self.first * page_size(), self.nbytes)
        return self.buffer

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        # The view's owner is the exporter, not the memory: a dropped memory is collected while
        # views live, and its owner waits for them before handing the span out again.
        if self.owner is not None or self.seg is None:
            with self._mutex():
                self._check_locked()
                PyObject_GetBuffer(self._exporter(), buffer, flags)
        else:
            self._check_locked()
            PyObject_GetBuffer(self._exporter(), buffer, flags)
        if buffer.len > self.nbytes:  # a simulated span's bytes are whole pages
            buffer.len = self.nbytes

    cdef int _release_views(self) except -1:
        """Release the view handed out; BufferError while it or a slice of it is exported."""
        if self.view is not None:
            try:
                self.view.release()
            except BufferError:
                raise BufferError("an object still holds a buffer of mem.data (a numpy array, "
                                  "a memoryview of it...); release it first") from None
            self.view = None
        if self.buffer is not None:
            if self.buffer.exports:
                raise BufferError(f"{self.buffer.exports} buffer(s) of the memory are still "
                                  "alive (slices of mem.data, memoryview(mem), arrays...); "
                                  "release them first")
            self.buffer = None  # valid for one lock (simulated: a copy of the pages)
        return 0

    cdef int _check_access(self, Py_ssize_t offset, Py_ssize_t size) except -1:
        self._check_open()
        if offset < 0 or size < 0 or offset > self.nbytes or size > self.nbytes - offset:
            raise ValueError(f"range [{offset}, {offset}+{size}) is outside the "
                             f"{self.nbytes} bytes of the memory")
        if not self.locked:
            if self.seg is None:
                raise RuntimeError("discardable memory is unlocked: lock() it first")
            self.seg._check_unlocked_access()
        return 0

    cdef int _raise_purged(self, size_t address) except -1:
        cdef size_t page_address = address - address % self.seg.page
        cdef size_t start = <size_t>(self.seg.base + self.first * self.seg.page)
        if _recorder is not None: _recorder.detected(self, address - start)
        raise _PurgedPageError(
            page_address, f"page at offset {page_address - start} (address "
            f"{page_address:#x}) was purged while unlocked; lock() the memory and refill it")

    def read(self, Py_ssize_t offset=0, Py_ssize_t size=-1) -> bytes:
        """Copy bytes out; unlocked SIGBUS-mode memory raises PurgedPageError on a purged page."""
        cdef size_t fault = 0
        cdef bytes out
        cdef char *start
        if size < 0 and offset >= 0 and offset <= self.nbytes:
            size = self.nbytes - offset
        self._check_access(offset, size)
        if _recorder is not None: _recorder.access(self, offset, size, False)
        if self.locked:
            if self.seg is None:
                with memoryview(self._exporter()) as whole:
                    return bytes(whole[offset:offset + size])
            return PyBytes_FromStringAndSize(self.seg.base + self.first * self.seg.page + offset,
                                             size)
        out = PyBytes_FromStringAndSize(NULL, size)
        start = self.seg.base + self.first * self.seg.page
        if dc_guarded_copy(PyBytes_AS_STRING(out), start + offset, size, <size_t>start,
                           <size_t>(start + self.npages * self.seg.page), &fault) != 0:
            self._raise_purged(fault)
        return out

    def readinto(self, buffer, Py_ssize_t offset=0) -> int:
        """Copy into a writable buffer as many bytes as fit; returns the count."""
        cdef Py_buffer target
        cdef size_t fault = 0
        cdef Py_ssize_t size
        cdef char *start
        cdef int rc = 0
        PyObject_GetBuffer(buffer, &target, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            size = target.len
            if offset >= 0 and offset <= self.nbytes and size > self.nbytes - offset:
                size = self.nbytes - offset
            self._check_access(offset, size)
            if _recorder is not None: _recorder.access(self, offset, size, False)
            if self.locked and self.seg is None:
                with memoryview(self._exporter()) as whole:
                    memoryview(buffer).cast("B")[:size] = whole[offset:offset + size]
            elif self.locked:
                memmove(target.buf, self.seg.base + self.first * self.seg.page + offset, size)
            else:
                start = self.seg.base + self.first * self.seg.page
                rc = dc_guarded_copy(target.buf, start + offset, size, <size_t>start,
                                     <size_t>(start + self.npages * self.seg.page), &fault)
        finally:
            PyBuffer_Release(&target)
        if rc != 0:
            self._raise_purged(fault)
        return size

    def write(self, data, Py_ssize_t offset=0) -> int:
        """Copy bytes in; unlocked SIGBUS-mode memory raises PurgedPageError, writing nothing."""
        cdef Py_buffer source
        cdef size_t fault = 0, first, last, page
        cdef Py_ssize_t size
        cdef char *start
        cdef int rc = 0
        PyObject_GetBuffer(data, &source, PyBUF_SIMPLE)
        try:
            size = source.len
            self._check_access(offset, size)
            if _recorder is not None: _recorder.access(self, offset, size, True)
            if self.locked and self.seg is None:
                with memoryview(self._exporter()) as whole:
                    whole[offset:offset + size] = memoryview(data).cast("B")
            elif self.locked:
                memmove(self.seg.base + self.first * self.seg.page + offset, source.buf, size)
            elif size:
                # Probe every page first (a read does not re-dirty), so a purge found before
                # the copy writes nothing; a purge racing the copy is still reported.
                page = self.seg.page
                start = self.seg.base + self.first * page
                first = offset // page
                last = (offset + size - 1) // page
                rc = dc_guarded_probe(start + first * page, last - first + 1, page, &fault)
                if rc == 0:
                    rc = dc_guarded_copy(start + offset, source.buf, size, <size_t>start,
                                         <size_t>(start + self.npages * page), &fault)
        finally:
            PyBuffer_Release(&source)
        if rc != 0:
            self._raise_purged(fault)
        return size

    def __enter__(self) -> memoryview:
        if not self.lock():
            raise _PurgedError(
                f"{self.purged_pages} of {self.npages} pages were purged; the memory is locked "
                "with undefined contents: refill mem.data, then unlock() or close()")
        return self.data

    def __exit__(self, *exc_info) -> None:
        if self.locked and not self.closed_:
            self.unlock()

    # ---------------------------------------------------------------- for tests and reclaim

    cdef Py_ssize_t _own_pages(self, Py_ssize_t first, Py_ssize_t count, str what) except -1:
        """count (-1: to the end) of pages [first, first+count) of the span, checked to be in it
        and in a mapping of the span's own (not simulated)."""
        self._check_open()
        if count < 0:
            count = self.npages - first
        if first < 0 or count < 0 or first + count > self.npages:
            raise ValueError(f"pages [{first}, {first}+{count}) are outside the memory")
        if self.seg is None:
            raise TypeError(f"a {self.backend} span has no mapping of its own to {what}")
        return count

    def _resident_pages(self, Py_ssize_t first=0, Py_ssize_t count=-1) -> int:
        """How many of the span's pages [first, first+count) (-1: to the end) are resident."""
        count = self._own_pages(first, count, "count pages in")
        return self.seg.resident_pages(self.first + first, count) if count else 0

    def _cold(self, bint even_locked=False, Py_ssize_t first=0, Py_ssize_t count=-1) -> None:
        """madvise(MADV_COLD) from the calling CPU, if unlocked: drains its per-CPU LRU batches."""
        self._advise(MADV_COLD, even_locked, first, count)

    def _pageout(self, bint even_locked=False, Py_ssize_t first=0, Py_ssize_t count=-1) -> None:
        """madvise(MADV_PAGEOUT) of pages [first, first+count) (-1: to the end), if unlocked."""
        self._advise(MADV_PAGEOUT, even_locked, first, count)

    def _advise(self, int advice, bint even_locked, Py_ssize_t first, Py_ssize_t count):
        count = self._own_pages(first, count, "advise")
        if (even_locked or not self.locked) and count:
            self.seg._advise(advice, self.first + first, count)

    def __repr__(self) -> str:
        state = "closed" if self.closed_ else ("locked" if self.locked else "unlocked")
        return f"<DiscardableMemory {self.backend} nbytes={self.nbytes} {state}>"
