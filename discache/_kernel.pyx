# Probes of the kernel features the backends stand on, by the system calls themselves.
# Included by _core.pyx; declared in _kernel.pxd.

from libc.stdlib cimport calloc, free

import operator as _operator
import os as _os
import time as _time

from discache import validate as _validate


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
# The cookie scheme's "page left untouched" mark, and the range size from which unlock looks
# for such pages (tests write the mark into a page to check it is still told apart).
_COOKIE_UNTOUCHED_MARK = DC_UNTOUCHED
_COOKIE_MINCORE_PAGES = DC_COOKIE_MINCORE_PAGES


def _swapped_pages(size_t address, size_t npages) -> int:
    """How many pages of [address, +npages pages) pagemap says are swapped out; for tests of
    what the cookie unlock uses when swap is configured."""
    cdef unsigned char *vec = <unsigned char *>calloc(npages + 1, 1)
    cdef size_t i, swapped = 0
    if vec == NULL:
        raise MemoryError()
    try:
        if dc_mark_swapped(<char *>address, npages, sysconf(_SC_PAGESIZE), vec) != 0:
            raise _oserror(errno, "reading /proc/self/pagemap")
        for i in range(npages):
            swapped += vec[i]
    finally:
        free(vec)
    return swapped


def physical_memory() -> int:
    """The machine's physical memory in bytes, the largest size discache accepts."""
    return sysconf(_SC_PHYS_PAGES) * sysconf(_SC_PAGESIZE)


cdef Py_ssize_t _check_nbytes(object nbytes) except -1:
    """A size argument: an int from 1 byte to the machine's physical memory, or a clear error."""
    return _validate.size(nbytes, "nbytes", physical_memory())


cdef object _oserror(int err, str what):
    """OSError (or its errno subclass) for a failed system call."""
    return OSError(err, f"{what}: {_os.strerror(err)}")


def on_every_cpu(fn) -> None:
    """Call fn() pinned to each CPU this thread may run on, then restore the thread's affinity.

    MADV_PAGEOUT misses pages still sitting in another CPU's per-CPU LRU batch; issuing it from
    every CPU drains them all.
    """
    original = _os.sched_getaffinity(0)
    try:
        for cpu in sorted(original):
            _os.sched_setaffinity(0, {cpu})
            fn()
    finally:
        _os.sched_setaffinity(0, original)


RECLAIM_ATTEMPTS = 4


def reclaim_unlocked(advise, resident, Py_ssize_t count) -> tuple:
    """Make the kernel discard a MADV_FREE'd range now; (pages gone, attempts made).

    advise(advice) madvises the range; resident() counts its pages still resident.
    """
    cdef Py_ssize_t left = 0
    cdef int attempt = 0
    for attempt in range(RECLAIM_ATTEMPTS):
        if attempt > 1:
            _time.sleep(0.001 * attempt)  # let a short-lived holder of the page finish
        # Measured on 6.18: a MADV_PAGEOUT issued while another CPU's LRU batch still holds a
        # freed page does not discard it and even cancels its lazy free.  So first drain the
        # batches of every CPU (MADV_COLD drains the local ones), then page out from each CPU.
        on_every_cpu(lambda: advise(MADV_COLD))
        on_every_cpu(lambda: advise(MADV_PAGEOUT))
        left = resident()
        if left == 0:
            break
        # Rarely a page is still kept: reclaim cannot take a page another reclaimer holds
        # isolated meanwhile (here: the kdamond of a DAMON paddr monitor with a pageout scheme,
        # seen holding pages off the LRU for seconds), and MADV_FREE skips such a page.  The
        # range is unlocked, so free it again (what unlock did) and retry a few times; what is
        # still kept after that is kept, and not counted.  From every CPU: MADV_FREE skips a
        # page held in another CPU's LRU batch (found by tests/test_sim_vs_kernel.py; freed from
        # the calling CPU only, 3 reclaims in 10 left all 16 pages of an unlock made elsewhere).
        on_every_cpu(lambda: advise(MADV_FREE))
    return count - left, attempt + 1
