# Linux system calls used by the real backends, declared once for every .pyx of the core.
from libc.stdint cimport uint64_t

cdef extern from "<errno.h>":
    int errno
    int EACCES
    int EPERM

cdef extern from "<unistd.h>" nogil:
    long sysconf(int name)
    int close(int fd)
    int ftruncate(int fd, long length)
    long syscall(long number, ...)
    int _SC_PAGESIZE

cdef extern from "<fcntl.h>" nogil:
    int open(const char *path, int flags)
    int fallocate(int fd, int mode, long offset, long length)
    int O_RDWR
    int O_CLOEXEC
    int O_NONBLOCK

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int madvise(void *addr, size_t length, int advice)
    int mincore(void *addr, size_t length, unsigned char *vec)
    int memfd_create(const char *name, unsigned int flags)
    void *MAP_FAILED
    int PROT_READ
    int PROT_WRITE
    int MAP_PRIVATE
    int MAP_SHARED
    int MAP_ANONYMOUS
    int MFD_CLOEXEC

# Values for x86_64 and every other Linux architecture; defined here when libc headers are older.
cdef extern from *:
    """
    #include <sys/syscall.h>
    #ifndef MADV_FREE
    #define MADV_FREE 8
    #endif
    #ifndef MADV_REMOVE
    #define MADV_REMOVE 9
    #endif
    #ifndef MADV_COLD
    #define MADV_COLD 20
    #endif
    #ifndef MADV_PAGEOUT
    #define MADV_PAGEOUT 21
    #endif
    #ifndef FALLOC_FL_KEEP_SIZE
    #define FALLOC_FL_KEEP_SIZE 1
    #endif
    #ifndef FALLOC_FL_PUNCH_HOLE
    #define FALLOC_FL_PUNCH_HOLE 2
    #endif
    #ifndef __NR_userfaultfd
    #define __NR_userfaultfd -1
    #endif
    #define DC_UFFD_API 0xAAULL
    #define DC_UFFD_FEATURE_SIGBUS (1ULL << 7)
    #define DC_UFFD_USER_MODE_ONLY 1
    /* _IOWR(0xAA, 0x3F, struct uffdio_api): struct uffdio_api is three __u64 (24 bytes). */
    #define DC_UFFDIO_API 0xC018AA3FUL
    typedef struct { unsigned long long api, features, ioctls; } dc_uffdio_api;
    """
    int MADV_FREE
    int MADV_REMOVE
    int MADV_COLD
    int MADV_PAGEOUT
    int MADV_DONTNEED
    int FALLOC_FL_KEEP_SIZE
    int FALLOC_FL_PUNCH_HOLE
    long __NR_userfaultfd
    uint64_t DC_UFFD_API
    uint64_t DC_UFFD_FEATURE_SIGBUS
    int DC_UFFD_USER_MODE_ONLY
    unsigned long DC_UFFDIO_API
    ctypedef struct dc_uffdio_api:
        unsigned long long api
        unsigned long long features
        unsigned long long ioctls

cdef extern from "<unistd.h>" nogil:
    int _SC_PHYS_PAGES
    int usleep(unsigned int usec)
    int dup(int fd)

cdef extern from "<sys/stat.h>" nogil:
    cdef struct stat:
        long st_size
        unsigned int st_mode
    int fstat(int fd, stat *buf)
    bint S_ISREG(unsigned int mode)

# Atomics, userfaultfd and the SIGBUS guard, written in C (see _dckernel.h for why).
cdef extern from "_dckernel.h" nogil:
    int fcntl(int fd, int cmd, ...)
    int F_ADD_SEALS
    int F_GET_SEALS
    int F_SEAL_SEAL
    int F_SEAL_SHRINK
    int F_SEAL_GROW
    unsigned int MFD_ALLOW_SEALING
    uint64_t DC_COOKIE
    int DC_COOKIE_MINCORE_PAGES
    uint64_t DC_UNTOUCHED
    int dc_mark_swapped(char *base, size_t npages, size_t page, unsigned char *vec)
    uint64_t dc_load_u64(uint64_t *word)
    uint64_t dc_cas_u64(uint64_t *word, uint64_t expected, uint64_t desired)
    uint64_t dc_fetch_add_u64(uint64_t *word, uint64_t delta)
    int dc_reopen_private(int fd)
    int dc_ofd_lock_byte(int fd, uint64_t at)
    int dc_ofd_byte_held(int fd, uint64_t at)
    void dc_cookie_unlock(char *base, size_t npages, size_t page, uint64_t *saved)
    size_t dc_cookie_lock(char *base, size_t npages, size_t page, const uint64_t *saved)
    int dc_uffd_open_sigbus()
    int dc_uffd_register_missing(int fd, void *addr, size_t length)
    long dc_uffd_zero_fill(int fd, char *addr, size_t length, size_t page)
    long dc_uffd_fill_missing(int fd, char *base, size_t first, size_t npages, size_t page,
                              unsigned char *vec)
    int dc_install_sigbus_handler()
    int dc_sigbus_handler_installed()
    int dc_guarded_copy(void *dst, const void *src, size_t n,
                        size_t lo, size_t hi, size_t *fault)
    int dc_guarded_probe(char *start, size_t npages, size_t page, size_t *fault)
    long dc_sigbus_lock(char *base, size_t npages, size_t page, int uffd, unsigned char *vec)
    unsigned long DC_ASHMEM_SET_NAME
    unsigned long DC_ASHMEM_SET_SIZE
    unsigned long DC_ASHMEM_PIN
    unsigned long DC_ASHMEM_UNPIN
    unsigned long DC_ASHMEM_PURGE_ALL_CACHES
    int DC_ASHMEM_WAS_PURGED
    int dc_ashmem_pin(int fd, unsigned long request, unsigned int offset, unsigned int length)
