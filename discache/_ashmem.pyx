# Android's ashmem: a region of /dev/ashmem mapped shared; unlock = ASHMEM_UNPIN (the kernel's
# shrinker may then punch the range out), lock = ASHMEM_PIN, which answers whether it did
# (ASHMEM_WAS_PURGED, for the whole range at once).  /dev/ashmem left mainline Linux in 5.18, so
# this runs on Android kernels only.  Included by _core.pyx; declared in _ashmem.pxd.

from discache.errors import BackendUnavailableError as _BackendUnavailableError


cdef class AshmemMemory(MappedMemory):
    """Discardable memory on an Android ashmem region; created locked (pinned)."""

    def __cinit__(self, nbytes):
        cdef void *mapping
        cdef char name[256]
        self.fd = -1
        self._init_size(nbytes)
        if self.mapped > 0xFFFFFFFF:
            raise ValueError("ashmem pins take 32-bit offsets: at most 4 GiB per region")
        self.fd = open(b"/dev/ashmem", O_RDWR | O_CLOEXEC)
        if self.fd < 0:
            raise _BackendUnavailableError(probe_ashmem()[1])
        memset(name, 0, sizeof(name))
        memcpy(name, b"discache", 8)
        ioctl(self.fd, DC_ASHMEM_SET_NAME, name)  # only a label in /proc/pid/maps
        if ioctl(self.fd, DC_ASHMEM_SET_SIZE, <size_t>self.mapped) != 0:
            raise _oserror(errno, "ASHMEM_SET_SIZE")
        mapping = mmap(NULL, self.mapped, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd, 0)
        if mapping == MAP_FAILED:
            raise MemoryError(f"cannot map {self.mapped} bytes of ashmem: "
                              f"{_os.strerror(errno)}")
        self.base = <char *>mapping
        self.locked = True  # a new region is pinned

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    @property
    def backend(self) -> str:
        """The backend's name."""
        return "ashmem"

    def lock(self) -> bool:
        """Pin; True if intact, False if the shrinker purged the region (it reads as zeros)."""
        cdef int rc
        self._check_open()
        if self.locked:
            raise RuntimeError("discardable memory is already locked (locks do not nest)")
        rc = dc_ashmem_pin(self.fd, DC_ASHMEM_PIN, 0, 0)
        if rc < 0:
            raise _oserror(errno, "ASHMEM_PIN")
        self.locked = True
        # ashmem answers for the whole range: every page counts as purged.
        self.purged_pages = self.npages if rc == DC_ASHMEM_WAS_PURGED else 0
        return self.purged_pages == 0

    def unlock(self) -> None:
        """Unpin: the kernel's ashmem shrinker may now purge the region."""
        self._check_open()
        if not self.locked:
            raise RuntimeError("discardable memory is not locked")
        self._release_views()
        if dc_ashmem_pin(self.fd, DC_ASHMEM_UNPIN, 0, 0) < 0:
            raise _oserror(errno, "ASHMEM_UNPIN")
        self.locked = False

    def close(self) -> None:
        """Unmap and close the region; calling it again does nothing."""
        if self.closed_:
            return
        self._unmap()
        close(self.fd)
        self.fd = -1

    def _purge(self) -> int:
        """Ask ashmem to purge every unpinned region now (ASHMEM_PURGE_ALL_CACHES)."""
        self._check_open()
        if self.locked:
            return 0
        if ioctl(self.fd, DC_ASHMEM_PURGE_ALL_CACHES) < 0:
            raise _oserror(errno, "ASHMEM_PURGE_ALL_CACHES")
        return self.npages

    def _force_reclaim(self) -> int:
        """Make the kernel purge the region now if unpinned; returns how many pages went."""
        return self._purge()
