# Linux system calls used by the real backends, declared once for every .pyx of the core.
from libc.stdint cimport uint64_t

cdef extern from "<errno.h>":
    int errno

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
