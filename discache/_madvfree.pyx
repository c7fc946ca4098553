# Private discardable memory on MADV_FREE.  Unlock hands the pages to the kernel's lazy free;
# lock finds exactly which ones the kernel discarded.  Default mode: Chromium's cookie in each
# page's first word, restored by compare-and-swap.  SIGBUS mode: the mapping is registered with a
# userfaultfd (missing mode, UFFD_FEATURE_SIGBUS), so a discarded page faults instead of reading
# zeros.  Included by _core.pyx; declared in _madvfree.pxd.

import weakref as _weakref

# Page loops over at least this many pages run without the GIL.
cdef Py_ssize_t MADVFREE_NOGIL_PAGES = 2048

# SIGBUS-mode memories of this process: a forked child must register them with its own
# userfaultfd, since fork() drops the registration (no UFFD_FEATURE_EVENT_FORK).
_SIGBUS_MEMORIES = _weakref.WeakSet()


def _register_sigbus_memories_after_fork() -> None:
    for mem in list(_SIGBUS_MEMORIES):
        (<MadvFreeMemory>mem)._after_fork()


_os.register_at_fork(after_in_child=_register_sigbus_memories_after_fork)


cdef class MadvFreeMemory(MappedMemory):
    """Private discardable memory on MADV_FREE, exact purge detection; created locked."""

    def __cinit__(self, nbytes, bint sigbus=False):
        cdef void *mapping
        cdef int err
        self.uffd = -1
        self._init_size(nbytes)
        self.sigbus = sigbus
        self.saved = <uint64_t *>calloc(self.npages, sizeof(uint64_t))
        if self.saved == NULL:
            raise MemoryError(f"cannot allocate the bookkeeping of {self.npages} pages")
        mapping = mmap(NULL, self.mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if mapping == MAP_FAILED:
            err = errno
            raise MemoryError(f"cannot map {self.mapped} bytes: {_os.strerror(err)}")
        self.base = <char *>mapping
        self.locked = True
        if sigbus:
            self._register_userfaultfd()
        if _tracing.active is not None: _tracing.active.allocate(self)

    def _register_userfaultfd(self):
        """Register the mapping for SIGBUS on missing pages, then map the zero page in them."""
        cdef long filled
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
        # A page never touched is missing too: it would fault on first use.  Map the shared zero
        # page there (no memory used, never discarded) rather than writing each page.
        while True:
            filled = dc_uffd_fill_missing(self.uffd, self.base, 0, self.npages, self.page,
                                          self.residency)
            if filled < 0:
                raise _oserror(errno, "UFFDIO_ZEROPAGE")
            if filled == 0:
                break
        _SIGBUS_MEMORIES.add(self)

    cdef int _register(self) except -1:
        self.uffd = dc_uffd_open_sigbus()
        if self.uffd < 0:
            raise _oserror(errno, "userfaultfd with UFFD_FEATURE_SIGBUS")
        if dc_uffd_register_missing(self.uffd, self.base, self.mapped) != 0:
            raise _oserror(errno, "UFFDIO_REGISTER in missing mode")
        return 0

    cdef void _after_fork(self) noexcept:
        if self.closed_ or self.base == NULL:
            return
        if self.uffd >= 0:
            close(self.uffd)  # the parent's; the parent keeps its own reference
            self.uffd = -1
        try:
            self._register()
        except OSError:
            # Without the registration a discarded page would read as zeros: from now on this
            # child reports every page purged at lock() and refuses unlocked access.
            if self.uffd >= 0:
                close(self.uffd)
                self.uffd = -1
            self.uffd_lost = True

    def __dealloc__(self):
        self._free_records()

    cdef void _free_records(self) noexcept:
        """Close the userfaultfd and free the per-page records (close and dealloc share it)."""
        if self.uffd >= 0:
            close(self.uffd)
            self.uffd = -1
        free(self.saved)
        self.saved = NULL
        free(self.residency)
        self.residency = NULL

    @property
    def backend(self) -> str:
        """The backend's name."""
        return "madvfree-sigbus" if self.sigbus else "madvfree"

    def lock(self) -> bool:
        """Lock; True if every page is intact, False if some were purged (contents undefined)."""
        cdef long purged
        cdef int err
        self._check_open()
        if self.locked:
            raise RuntimeError("discardable memory is already locked (locks do not nest)")
        # A purged page faults here: our handler must be the one to catch it.
        if self.sigbus and dc_install_sigbus_handler() != 0:
            raise _oserror(errno, "cannot reinstall the SIGBUS handler")
        if self.sigbus and self.uffd_lost:
            # Pages fault in as zeros now; which ones the kernel discarded cannot be known.
            dc_sigbus_lock(self.base, self.npages, self.page, -1, NULL)
            purged = self.npages
        elif self.sigbus:
            if self.npages >= MADVFREE_NOGIL_PAGES:
                self.busy = True
                with nogil:
                    purged = dc_sigbus_lock(self.base, self.npages, self.page, self.uffd,
                                            self.residency)
                self.busy = False
            else:
                purged = dc_sigbus_lock(self.base, self.npages, self.page, self.uffd,
                                            self.residency)
            if purged < 0:
                err = errno
                raise _oserror(err, "cannot fill a purged page through the userfaultfd")
        elif self.npages >= MADVFREE_NOGIL_PAGES:
            self.busy = True
            with nogil:
                purged = dc_cookie_lock(self.base, self.npages, self.page, self.saved)
            self.busy = False
        else:
            purged = dc_cookie_lock(self.base, self.npages, self.page, self.saved)
        self.locked = True
        self.purged_pages = purged
        if _tracing.active is not None: _tracing.active.lock(self, purged)
        return purged == 0

    def unlock(self) -> None:
        """Unlock: the kernel may now discard the pages; .data is unusable until lock()."""
        cdef int rc, err
        self._check_open()
        if not self.locked:
            raise RuntimeError("discardable memory is not locked")
        self._release_views()
        if self.npages >= MADVFREE_NOGIL_PAGES:
            self.busy = True
            with nogil:
                if not self.sigbus:
                    dc_cookie_unlock(self.base, self.npages, self.page, self.saved)
                rc = madvise(self.base, self.mapped, MADV_FREE)
            self.busy = False
        else:
            if not self.sigbus:
                dc_cookie_unlock(self.base, self.npages, self.page, self.saved)
            rc = madvise(self.base, self.mapped, MADV_FREE)
        if rc != 0:
            err = errno
            if not self.sigbus:
                dc_cookie_lock(self.base, self.npages, self.page, self.saved)
            raise _oserror(err, "madvise(MADV_FREE)")
        self.locked = False
        if _tracing.active is not None: _tracing.active.unlock(self)

    def close(self) -> None:
        """Unmap the memory (locked or not); calling it again does nothing."""
        if self.closed_:
            return
        self._unmap()
        self._free_records()
        if _tracing.active is not None: _tracing.active.close(self)

    def _purge(self) -> int:
        """Discard the pages now if unlocked (MADV_DONTNEED); returns how many were discarded."""
        self._check_open()
        if self.locked:
            return 0
        if madvise(self.base, self.mapped, MADV_DONTNEED) != 0:
            raise _oserror(errno, "madvise(MADV_DONTNEED)")
        if _tracing.active is not None: _tracing.active.purge(self)
        return self.npages

    def _cold(self, bint even_locked=False, Py_ssize_t first=0, Py_ssize_t count=-1) -> None:
        """madvise(MADV_COLD) from the calling CPU, if unlocked: drains its per-CPU LRU batches."""
        self._advise(MADV_COLD, even_locked, first, count)

    def _pageout(self, bint even_locked=False, Py_ssize_t first=0, Py_ssize_t count=-1) -> None:
        """madvise(MADV_PAGEOUT) of pages [first, first+count) (-1: to the end), if unlocked."""
        self._advise(MADV_PAGEOUT, even_locked, first, count)

    def _advise(self, int advice, bint even_locked, Py_ssize_t first, Py_ssize_t count):
        self._check_open()
        if count < 0:
            count = self.npages - first
        if first < 0 or count < 0 or first + count > self.npages:
            raise ValueError(f"pages [{first}, {first}+{count}) are outside the memory")
        if (even_locked or not self.locked) and count and madvise(
                self.base + first * self.page, count * self.page, advice) != 0:
            raise _oserror(errno, f"madvise({advice})")

    def _force_reclaim(self, Py_ssize_t first=0, Py_ssize_t count=-1) -> int:
        """Make the kernel discard pages [first, first+count) now if unlocked; returns how many."""
        self._check_open()
        if count < 0:
            count = self.npages - first
        if first < 0 or count < 0 or first + count > self.npages:
            raise ValueError(f"pages [{first}, {first}+{count}) are outside the memory")
        if self.locked:
            return 0
        gone, self.reclaim_attempts = reclaim_unlocked(
            lambda advice: self._advise(advice, False, first, count),
            lambda: self._resident_pages(first, count), count)
        if _tracing.active is not None: _tracing.active.reclaim(self, gone)
        return gone

    cdef int _check_unlocked_access(self) except -1:
        if not self.sigbus:
            return MappedMemory._check_unlocked_access(self)
        if self.uffd_lost:
            raise RuntimeError("this forked child could not register the memory with a "
                               "userfaultfd: lock() it first")
        # Someone (faulthandler.enable()) may have put another SIGBUS handler over ours.
        if not dc_sigbus_handler_installed() and dc_install_sigbus_handler() != 0:
            raise _oserror(errno, "cannot reinstall the SIGBUS handler")
        return 0
