# What every mmap-based DiscardableMemory shares: the mapping, the lock flag, the buffer exports
# that unlock() and close() wait for, and the accessors.  Reads and writes of unlocked memory are
# refused unless a subclass (SIGBUS mode) allows them; those go through SIGBUS-guarded copies.
# Included by _core.pyx; declared in _mapped.pxd.

from cpython.buffer cimport (
    PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_FillInfo, PyBuffer_Release, PyObject_GetBuffer,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memmove, memset

from discache.errors import PurgedError as _PurgedError, PurgedPageError as _PurgedPageError
import discache.tracing as _tracing


cdef class MappedMemory:
    """Base of the mmap-based backends' memory; not made directly."""

    def __cinit__(self, *args, **kwargs):
        if type(self) is MappedMemory:
            raise TypeError("MappedMemory is a base class; use discache.allocate()")
        self.base = NULL
        self.page = sysconf(_SC_PAGESIZE)

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.mapped)
            self.base = NULL

    cdef int _init_size(self, object nbytes) except -1:
        self.nbytes = _check_nbytes(nbytes)
        self.npages = (self.nbytes + self.page - 1) // self.page
        self.mapped = self.npages * self.page
        return 0

    cdef int _unmap(self) except -1:
        """The common half of close(): refuse while buffers live, then unmap."""
        self._check_open()
        self._release_views()
        munmap(self.base, self.mapped)
        self.base = NULL
        self.closed_ = True
        self.locked = False
        return 0

    def __copy__(self):
        raise TypeError(f"{type(self).__name__} cannot be copied: the copy would share the "
                        "memory and its lock state; allocate new memory and write into it")

    def __deepcopy__(self, memo):
        return self.__copy__()

    def __reduce_ex__(self, protocol):
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied")

    @property
    def backend(self) -> str:
        """The backend's name."""
        raise NotImplementedError

    @property
    def is_locked(self) -> bool:
        """True while locked (the pages cannot be discarded)."""
        return self.locked and not self.closed_

    @property
    def closed(self) -> bool:
        """True once close() has run."""
        return self.closed_

    @property
    def address(self) -> int:
        """Address of the first byte (what PurgedPageError.address is measured against)."""
        self._check_open()
        return <size_t>self.base

    cdef int _check_open(self) except -1:
        if self.closed_:
            raise ValueError("discardable memory is closed")
        if self.busy:
            raise RuntimeError("discardable memory is in use by another thread")
        return 0

    cdef int _release_views(self) except -1:
        if self.view is not None:
            try:
                self.view.release()
            except BufferError:
                raise BufferError("an object still holds a buffer of mem.data (a numpy array, "
                                  "a memoryview of it...); release it first") from None
            self.view = None
        if self.exports:
            raise BufferError(f"{self.exports} buffer(s) of the memory are still alive (slices "
                              "of mem.data or memoryview(mem)); release them first")
        return 0

    @property
    def data(self) -> memoryview:
        """Writable memoryview of the nbytes; only while locked, released by unlock()/close()."""
        cdef object view = self.view
        self._check_open()
        if not self.locked:
            raise RuntimeError("discardable memory is unlocked: lock() it before using .data")
        if view is not None:
            try:
                view.nbytes
                return view
            except ValueError:  # the caller released it
                pass
        view = memoryview(self)
        self.view = view
        return view

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        self._check_open()
        if not self.locked:
            raise RuntimeError("discardable memory is unlocked: lock() it before using it")
        PyBuffer_FillInfo(buffer, self, self.base, self.nbytes, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.exports -= 1

    def __enter__(self) -> memoryview:
        if not self.lock():
            raise _PurgedError(
                f"{self.purged_pages} of {self.npages} pages were purged; the memory is locked "
                "with undefined contents: refill mem.data, then unlock() or close()")
        return self.data

    def __exit__(self, *exc_info) -> None:
        if self.locked and not self.closed_:
            self.unlock()

    cdef int _check_access(self, Py_ssize_t offset, Py_ssize_t size) except -1:
        self._check_open()
        if offset < 0 or size < 0 or offset > self.nbytes or size > self.nbytes - offset:
            raise ValueError(f"range [{offset}, {offset}+{size}) is outside the "
                             f"{self.nbytes} bytes of the memory")
        if not self.locked:
            self._check_unlocked_access()
        return 0

    cdef int _check_unlocked_access(self) except -1:
        raise RuntimeError("discardable memory is unlocked: lock() it first (only the "
                           "madvfree-sigbus backend reads and writes unlocked memory)")

    cdef int _raise_purged(self, size_t address) except -1:
        cdef size_t page_address = address - address % self.page
        if _tracing.active is not None: _tracing.active.detected(self, address - <size_t>self.base)
        raise _PurgedPageError(
            page_address, f"page at offset {page_address - <size_t>self.base} (address "
            f"{page_address:#x}) was purged while unlocked; lock() the memory and refill it")

    def read(self, Py_ssize_t offset=0, Py_ssize_t size=-1) -> bytes:
        """Copy bytes out; unlocked SIGBUS-mode memory raises PurgedPageError on a purged page."""
        cdef size_t fault = 0
        cdef bytes out
        cdef char *dst
        if size < 0 and offset >= 0 and offset <= self.nbytes:
            size = self.nbytes - offset
        self._check_access(offset, size)
        if _tracing.active is not None: _tracing.active.access(self, offset, size, False)
        out = PyBytes_FromStringAndSize(NULL, size)
        dst = PyBytes_AS_STRING(out)
        if self.locked:
            memcpy(dst, self.base + offset, size)
        elif dc_guarded_copy(dst, self.base + offset, size, <size_t>self.base,
                             <size_t>self.base + self.mapped, &fault) != 0:
            self._raise_purged(fault)
        return out

    def readinto(self, buffer, Py_ssize_t offset=0) -> int:
        """Copy into a writable buffer as many bytes as fit; returns the count."""
        cdef Py_buffer target
        cdef size_t fault = 0
        cdef Py_ssize_t size
        cdef int rc = 0
        PyObject_GetBuffer(buffer, &target, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            size = target.len
            if offset >= 0 and offset <= self.nbytes and size > self.nbytes - offset:
                size = self.nbytes - offset
            self._check_access(offset, size)
            if _tracing.active is not None: _tracing.active.access(self, offset, size, False)
            if self.locked:
                memmove(target.buf, self.base + offset, size)
            else:
                rc = dc_guarded_copy(target.buf, self.base + offset, size, <size_t>self.base,
                                     <size_t>self.base + self.mapped, &fault)
        finally:
            PyBuffer_Release(&target)
        if rc != 0:
            self._raise_purged(fault)
        return size

    def write(self, data, Py_ssize_t offset=0) -> int:
        """Copy bytes in; unlocked SIGBUS-mode memory raises PurgedPageError, writing nothing."""
        cdef Py_buffer source
        cdef size_t fault = 0, first, last
        cdef Py_ssize_t size
        cdef int rc = 0
        PyObject_GetBuffer(data, &source, PyBUF_SIMPLE)
        try:
            size = source.len
            self._check_access(offset, size)
            if _tracing.active is not None: _tracing.active.access(self, offset, size, True)
            if self.locked:
                memmove(self.base + offset, source.buf, size)
            elif size:
                # Probe every page first (a read does not re-dirty), so a purge found before
                # the copy writes nothing; a purge racing the copy is still reported.
                first = offset // self.page
                last = (offset + size - 1) // self.page
                rc = dc_guarded_probe(self.base + first * self.page, last - first + 1,
                                      self.page, &fault)
                if rc == 0:
                    rc = dc_guarded_copy(self.base + offset, source.buf, size,
                                         <size_t>self.base, <size_t>self.base + self.mapped,
                                         &fault)
        finally:
            PyBuffer_Release(&source)
        if rc != 0:
            self._raise_purged(fault)
        return size

    def _resident_pages(self, Py_ssize_t first=0, Py_ssize_t count=-1) -> int:
        """How many of pages [first, first+count) (-1: to the end) mincore() reports resident."""
        cdef unsigned char *vec
        cdef Py_ssize_t i, resident = 0
        self._check_open()
        if count < 0:
            count = self.npages - first
        if first < 0 or count < 0 or first + count > self.npages:
            raise ValueError(f"pages [{first}, {first}+{count}) are outside the memory")
        vec = <unsigned char *>calloc(count + 1, 1)
        if vec == NULL:
            raise MemoryError()
        try:
            if count and mincore(self.base + first * self.page, count * self.page, vec) != 0:
                raise _oserror(errno, "mincore")
            for i in range(count):
                resident += vec[i] & 1
        finally:
            free(vec)
        return resident

    def __repr__(self) -> str:
        state = "closed" if self.closed_ else ("locked" if self.locked else "unlocked")
        return f"<{type(self).__name__} {self.backend} nbytes={self.nbytes} {state}>"
