# Probes of the kernel features the backends stand on, by the system calls themselves.
# Included by _core.pyx; declared in _kernel.pxd.

import os as _os


def page_size() -> int:
    """The kernel's page size in bytes."""
    return sysconf(_SC_PAGESIZE)


cdef str _strerror(int err):
    return f"{_os.strerror(err)} (errno {err})"


def probe_madvise(int advice) -> tuple:
    """(ok, reason): does madvise(advice) succeed on a dirty private anonymous page?"""
    cdef size_t size = sysconf(_SC_PAGESIZE)
    cdef char *page = <char *>mmap(NULL, size, PROT_READ | PROT_WRITE,
                                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    cdef int rc, err = 0
    if page == <char *>MAP_FAILED:
        return False, "mmap failed: " + _strerror(errno)
    page[0] = 1
    rc = madvise(page, size, advice)
    if rc != 0:
        err = errno
    munmap(page, size)
    if rc != 0:
        return False, f"madvise({advice}) failed: " + _strerror(err)
    return True, f"madvise({advice}) works"


def probe_memfd() -> tuple:
    """(ok, reason): memfd_create plus hole punching, which shared discardable memory needs."""
    cdef int fd = memfd_create(b"discache-probe", MFD_CLOEXEC)
    cdef long size = sysconf(_SC_PAGESIZE)
    cdef int err
    if fd < 0:
        return False, "memfd_create failed: " + _strerror(errno)
    try:
        if ftruncate(fd, size) != 0:
            return False, "ftruncate on a memfd failed: " + _strerror(errno)
        if fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, size) != 0:
            return False, "fallocate(PUNCH_HOLE) on a memfd failed: " + _strerror(errno)
        return True, "memfd_create and fallocate(PUNCH_HOLE) work"
    finally:
        close(fd)


def probe_userfaultfd_sigbus() -> tuple:
    """(ok, reason): can this process open a userfaultfd with UFFD_FEATURE_SIGBUS?"""
    cdef long fd
    cdef int err
    cdef dc_uffdio_api api
    if __NR_userfaultfd < 0:
        return False, "this architecture's headers define no userfaultfd system call"
    fd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK)
    if fd < 0 and errno == 1:  # EPERM: unprivileged processes may only handle user-mode faults
        fd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK | DC_UFFD_USER_MODE_ONLY)
    if fd < 0:
        return False, "userfaultfd() failed: " + _strerror(errno)
    try:
        api.api = DC_UFFD_API
        api.features = DC_UFFD_FEATURE_SIGBUS
        api.ioctls = 0
        if ioctl(<int>fd, DC_UFFDIO_API, &api) != 0:
            err = errno
            return False, "UFFDIO_API with UFFD_FEATURE_SIGBUS failed: " + _strerror(err)
        return True, "userfaultfd with UFFD_FEATURE_SIGBUS works"
    finally:
        close(<int>fd)


def probe_ashmem() -> tuple:
    """(ok, reason): is Android's /dev/ashmem here?"""
    cdef int fd = open(b"/dev/ashmem", O_RDWR | O_CLOEXEC)
    if fd < 0:
        return False, ("/dev/ashmem cannot be opened: " + _strerror(errno) +
                       "; ashmem left mainline Linux in 5.18, use the 'memfd' backend instead")
    close(fd)
    return True, "/dev/ashmem opens"


MADV_FREE_VALUE = MADV_FREE
MADV_PAGEOUT_VALUE = MADV_PAGEOUT
