/* C helpers of discache's compiled core that Cython cannot express: atomics on page words,
 * userfaultfd ioctls, and SIGBUS-guarded accesses (sigsetjmp must live in the frame that
 * does the access, so the guarded loops are written here).  Declared in _kernel.pxd / _uffd.pxd. */
#ifndef DISCACHE_DCKERNEL_H
#define DISCACHE_DCKERNEL_H

#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef F_ADD_SEALS
#define F_ADD_SEALS 1033
#define F_GET_SEALS 1034
#endif
#ifndef F_SEAL_SEAL
#define F_SEAL_SEAL 0x0001
#endif
#ifndef F_SEAL_SHRINK
#define F_SEAL_SHRINK 0x0002
#define F_SEAL_GROW 0x0004
#endif
#ifndef MFD_ALLOW_SEALING
#define MFD_ALLOW_SEALING 0x0002U
#endif

/* The word an unlocked madvfree page carries in its first 8 bytes.  A page the kernel discarded
 * reads back as zero, so the cookie must be non-zero. */
#define DC_COOKIE 1ULL
/* The cookie of a page whose own first word is DC_UNTOUCHED (so that the saved word can say
 * "untouched" without ambiguity: such a page saves DC_UNTOUCHED ^ 1 and carries this cookie). */
#define DC_COOKIE_UNTOUCHED_WORD 2ULL
/* The saved word of a page that was not resident at unlock: it got no cookie, so lock leaves it
 * alone.  Any value works (a page really holding it takes DC_COOKIE_UNTOUCHED_WORD); a rare one
 * keeps that second path cold. */
#define DC_UNTOUCHED 0x6e6f7420746f7563ULL
/* Ranges from this many pages are checked with mincore before the cookies go in; below it the
 * pages are written blindly (no system call added; at most 63 untouched pages made resident). */
#define DC_COOKIE_MINCORE_PAGES 64
#define DC_COOKIE_WINDOW 4096   /* pages per mincore call (its vector lives on the stack) */
#define DC_PAGEMAP_WINDOW 512   /* pages per pread of /proc/self/pagemap */
#define DC_PAGEMAP_SWAPPED (1ULL << 62)

/* ---- atomics on words that live in (possibly shared) pages ---- */

static inline uint64_t dc_load_u64(uint64_t *word) {
    return __atomic_load_n(word, __ATOMIC_ACQUIRE);
}

/* Compare-and-swap; returns the value found (equal to `expected` on success). */
static inline uint64_t dc_cas_u64(uint64_t *word, uint64_t expected, uint64_t desired) {
    __atomic_compare_exchange_n(word, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    return expected;
}

/* Atomic add on a shared word; returns the value before. */
static inline uint64_t dc_fetch_add_u64(uint64_t *word, uint64_t delta) {
    return __atomic_fetch_add(word, delta, __ATOMIC_ACQ_REL);
}

static inline void dc_cookie_put(char *page_start, uint64_t *saved) {
    uint64_t *word = (uint64_t *)page_start;
    uint64_t own = *word;
    if (own == DC_UNTOUCHED) {
        *saved = DC_UNTOUCHED ^ 1;
        __atomic_store_n(word, DC_COOKIE_UNTOUCHED_WORD, __ATOMIC_RELAXED);
    } else {
        *saved = own;
        __atomic_store_n(word, DC_COOKIE, __ATOMIC_RELAXED);
    }
}

/* Does any swap device exist?  Without swap, a private anonymous page that mincore does not
 * report resident has no page at all (never written, or dropped): it reads as zeros. */
static int dc_swap_configured(void) {
    struct sysinfo info;
    return sysinfo(&info) != 0 || info.totalswap != 0;
}

/* Which of pages [0, npages) of base are swapped out, from /proc/self/pagemap: sets vec[i] to 1
 * for each.  -1 when pagemap cannot be read (then every non-resident page must be treated as
 * holding data). */
static int dc_mark_swapped(char *base, size_t npages, size_t page, unsigned char *vec) {
    uint64_t entries[DC_PAGEMAP_WINDOW];
    size_t done = 0, n, i;
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    while (done < npages) {
        n = npages - done < DC_PAGEMAP_WINDOW ? npages - done : DC_PAGEMAP_WINDOW;
        off_t at = (off_t)(((uintptr_t)base / page + done) * sizeof(uint64_t));
        if (pread(fd, entries, n * sizeof(uint64_t), at) != (ssize_t)(n * sizeof(uint64_t))) {
            close(fd);
            return -1;
        }
        for (i = 0; i < n; i++)
            if (entries[i] & DC_PAGEMAP_SWAPPED)
                vec[done + i] = 1;
        done += n;
    }
    close(fd);
    return 0;
}

/* Chromium's MADV_FREE scheme, unlock half: keep each page's first word, put the cookie there.
 * A page with no memory behind it (never written since it was mapped or dropped) is left
 * untouched and saved as DC_UNTOUCHED: it reads as zeros whether or not the kernel discards it,
 * so it is intact by definition, and writing a cookie would make it resident.  A swapped-out
 * page holds data (and MADV_FREE would drop its swap copy), so it gets its cookie. */
static void dc_cookie_unlock(char *base, size_t npages, size_t page, uint64_t *saved) {
    unsigned char vec[DC_COOKIE_WINDOW];
    size_t first, n, i;
    int swap_checked = 0, swap = 0;
    if (npages < DC_COOKIE_MINCORE_PAGES) {
        for (i = 0; i < npages; i++)
            dc_cookie_put(base + i * page, saved + i);
        return;
    }
    for (first = 0; first < npages; first += n) {
        n = npages - first < DC_COOKIE_WINDOW ? npages - first : DC_COOKIE_WINDOW;
        char *start = base + first * page;
        if (mincore(start, n * page, vec) != 0) {
            memset(vec, 1, n);
        } else {
            for (i = 0; i < n && (vec[i] & 1); i++)
                ;
            if (i < n) {  /* some page has no memory here: is it swapped out? */
                if (!swap_checked) {
                    swap = dc_swap_configured();
                    swap_checked = 1;
                }
                if (swap && dc_mark_swapped(start, n, page, vec) != 0)
                    memset(vec, 1, n);
            }
        }
        for (i = 0; i < n; i++) {
            if (vec[i] & 1)
                dc_cookie_put(start + i * page, saved + first + i);
            else
                saved[first + i] = DC_UNTOUCHED;
        }
    }
}

/* Lock half: swap the cookie back for the saved word.  The read-modify-write re-dirties the page,
 * which cancels the lazy free, with no window between the check and the restore.  A discarded page
 * reads zero, the swap fails, and the page counts as purged.  A page left untouched at unlock is
 * not accessed (that would make it resident).  Returns the number purged. */
static size_t dc_cookie_lock(char *base, size_t npages, size_t page, const uint64_t *saved) {
    size_t purged = 0;
    for (size_t i = 0; i < npages; i++) {
        uint64_t own = saved[i];
        uint64_t expected = DC_COOKIE;
        uint64_t *word = (uint64_t *)(base + i * page);
        if (own == DC_UNTOUCHED)
            continue;
        if (__atomic_compare_exchange_n(word, &expected, own, 0,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            continue;
        if (expected == DC_COOKIE_UNTOUCHED_WORD &&
            __atomic_compare_exchange_n(word, &expected, DC_UNTOUCHED, 0,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            continue;
        purged++;
    }
    return purged;
}

/* ---- userfaultfd ---- */

static int dc_uffd_open_sigbus(void) {
    long fd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0 && errno == EPERM)
        fd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd < 0)
        return -1;
    struct uffdio_api api;
    memset(&api, 0, sizeof api);
    api.api = UFFD_API;
    api.features = UFFD_FEATURE_SIGBUS;
    if (ioctl((int)fd, UFFDIO_API, &api) != 0) {
        int err = errno;
        close((int)fd);
        errno = err;
        return -1;
    }
    return (int)fd;
}

static int dc_uffd_register_missing(int fd, void *addr, size_t len) {
    struct uffdio_register reg;
    memset(&reg, 0, sizeof reg);
    reg.range.start = (uintptr_t)addr;
    reg.range.len = len;
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    return ioctl(fd, UFFDIO_REGISTER, &reg);
}

/* Map the zero page where pages are missing in [addr, addr+len), so that they stop raising
 * SIGBUS.  Returns how many pages it filled: all of them, or those before the first page that is
 * there after all (EEXIST); -1 with errno on failure. */
static long dc_uffd_zero_fill(int fd, char *addr, size_t len, size_t page) {
    struct uffdio_zeropage zp;
    memset(&zp, 0, sizeof zp);
    zp.range.start = (uintptr_t)addr;
    zp.range.len = len;
    if (ioctl(fd, UFFDIO_ZEROPAGE, &zp) == 0)
        return (long)(len / page);
    if (errno == EEXIST || errno == EAGAIN)
        return zp.zeropage > 0 ? (long)(zp.zeropage / (long long)page) : 0;
    return -1;
}

/* Fill every missing page of pages [first, npages), found with mincore, one ioctl per run of
 * missing pages.  Returns how many pages it filled, or -1 with errno. */
static long dc_uffd_fill_missing(int fd, char *base, size_t first, size_t npages, size_t page,
                                 unsigned char *vec) {
    long filled = 0, done;
    size_t run, j;
    if (mincore(base + first * page, (npages - first) * page, vec) != 0)
        return dc_uffd_zero_fill(fd, base + first * page, page, page);
    for (j = first; j < npages; j++) {
        if (vec[j - first] & 1)
            continue;
        for (run = 1; j + run < npages && !(vec[j + run - first] & 1); run++)
            ;
        done = dc_uffd_zero_fill(fd, base + j * page, run * page, page);
        if (done < 0)
            return -1;
        filled += done;
        j += run - 1;
    }
    return filled;
}

/* ---- open-file-description locks: a lock the kernel drops when its holder dies ---- */
#ifndef F_OFD_GETLK
#define F_OFD_GETLK 36
#define F_OFD_SETLK 37
#define F_OFD_SETLKW 38
#endif

/* A new open file description of the file behind fd (its own locks, unlike a dup), or -1. */
static int dc_reopen_private(int fd) {
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    return open(path, O_RDWR | O_CLOEXEC);
}

/* A write lock of the one byte `at` (it may lie past the end of the file). */
static void dc_ofd_byte(struct flock *fl, uint64_t at) {
    memset(fl, 0, sizeof *fl);
    fl->l_type = F_WRLCK;
    fl->l_whence = SEEK_SET;
    fl->l_start = (off_t)at;
    fl->l_len = 1;
}

/* Write-lock byte `at` for fd's description, not waiting: 0, or -1 with errno
 * (EAGAIN/EACCES: another description holds it). */
static int dc_ofd_lock_byte(int fd, uint64_t at) {
    struct flock fl;
    dc_ofd_byte(&fl, at);
    return fcntl(fd, F_OFD_SETLK, &fl);
}

/* Does another open file description hold a lock on byte `at`?  1 yes, 0 no, -1 with errno. */
static int dc_ofd_byte_held(int fd, uint64_t at) {
    struct flock fl;
    dc_ofd_byte(&fl, at);
    if (fcntl(fd, F_OFD_GETLK, &fl) != 0)
        return -1;
    return fl.l_type != F_UNLCK;
}

/* ---- Android ashmem (the uapi header is not installed on mainline Linux) ---- */

struct dc_ashmem_pin {
    uint32_t offset;
    uint32_t len;
};
#define DC_ASHMEM_SET_NAME _IOW(0x77, 1, char[256])
#define DC_ASHMEM_SET_SIZE _IOW(0x77, 3, size_t)
#define DC_ASHMEM_PIN _IOW(0x77, 7, struct dc_ashmem_pin)
#define DC_ASHMEM_UNPIN _IOW(0x77, 8, struct dc_ashmem_pin)
#define DC_ASHMEM_GET_PIN_STATUS _IO(0x77, 9)
#define DC_ASHMEM_PURGE_ALL_CACHES _IO(0x77, 10)
#define DC_ASHMEM_WAS_PURGED 1

/* PIN/UNPIN of [offset, offset+len) (len 0: to the end); PIN returns ASHMEM_WAS_PURGED or
 * ASHMEM_NOT_PURGED, or -1 with errno. */
static int dc_ashmem_pin(int fd, unsigned long request, uint32_t offset, uint32_t len) {
    struct dc_ashmem_pin pin;
    pin.offset = offset;
    pin.len = len;
    return ioctl(fd, request, &pin);
}

/* ---- SIGBUS guard ----
 * A guarded access arms a per-thread jump buffer and the address range it may fault in.  The
 * handler jumps back only for a fault inside that range while armed; any other SIGBUS goes to the
 * handler that was installed before ours (faulthandler under pytest), or gets the kernel's own
 * treatment: the default action (the process dies by SIGBUS), also when SIGBUS was ignored, since
 * the kernel never lets a process ignore the SIGBUS of a fault (returning would re-execute the
 * access forever).  A previous handler that calls us back (faulthandler restores its predecessor,
 * which may be us, and raises again) is not chained to a second time: the default action ends it.
 * initial-exec TLS: the handler must not allocate a TLS block from signal context. */
#define DC_TLS __thread __attribute__((tls_model("initial-exec")))
static DC_TLS sigjmp_buf *dc_guard_env;
static DC_TLS uintptr_t dc_guard_lo;
static DC_TLS uintptr_t dc_guard_hi;
static DC_TLS uintptr_t dc_fault_addr;
static DC_TLS int dc_chaining;      /* this thread runs the previous handler, called from ours */
static struct sigaction dc_prev_sigbus;

static void dc_on_sigbus(int sig, siginfo_t *info, void *ucontext);

/* What the kernel does without a handler: a fault re-executes and dies, a signal sent by kill()
 * is raised again, both under the default action. */
static void dc_sigbus_default(int sig, const siginfo_t *info) {
    signal(sig, SIG_DFL);
    if (info->si_code <= 0)
        raise(sig);
}

static void dc_on_sigbus(int sig, siginfo_t *info, void *ucontext) {
    sigjmp_buf *env = dc_guard_env;
    uintptr_t addr = (uintptr_t)info->si_addr;
    struct sigaction prev;
    if (env != NULL && info->si_code > 0 && addr >= dc_guard_lo && addr < dc_guard_hi) {
        dc_guard_env = NULL;
        dc_fault_addr = addr;
        siglongjmp(*env, 1);
    }
    if (dc_chaining) {  /* called back by the handler we chained to: no ping-pong */
        dc_sigbus_default(sig, info);
        return;
    }
    prev = dc_prev_sigbus;
    if (prev.sa_flags & SA_SIGINFO) {
        if (prev.sa_sigaction != NULL && prev.sa_sigaction != dc_on_sigbus) {
            dc_chaining = 1;
            prev.sa_sigaction(sig, info, ucontext);
            dc_chaining = 0;
            return;
        }
    } else if (prev.sa_handler == SIG_IGN) {
        if (info->si_code <= 0)
            return;  /* sent by kill(): ignored, as asked */
    } else if (prev.sa_handler != SIG_DFL) {
        dc_chaining = 1;
        prev.sa_handler(sig);
        dc_chaining = 0;
        return;
    }
    dc_sigbus_default(sig, info);
}

/* Install the handler unless it is already the current one (someone, faulthandler.enable() or
 * signal.signal(), may have replaced it since); 0 or -1 with errno.  Called before every access
 * that may fault: a SIGBUS lock, an unlocked read or write. */
static int dc_install_sigbus_handler(void) {
    struct sigaction current, ours;
    if (sigaction(SIGBUS, NULL, &current) != 0)
        return -1;
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == dc_on_sigbus)
        return 0;
    dc_prev_sigbus = current;
    memset(&ours, 0, sizeof ours);
    ours.sa_sigaction = dc_on_sigbus;
    ours.sa_flags = SA_SIGINFO | SA_NODEFER;  /* NODEFER: we leave by siglongjmp(env, 0-mask) */
    sigemptyset(&ours.sa_mask);
    return sigaction(SIGBUS, &ours, NULL);
}

static int dc_sigbus_handler_installed(void) {
    struct sigaction current;
    if (sigaction(SIGBUS, NULL, &current) != 0)
        return 0;
    return (current.sa_flags & SA_SIGINFO) && current.sa_sigaction == dc_on_sigbus;
}

static inline void dc_arm(sigjmp_buf *env, uintptr_t lo, uintptr_t hi) {
    dc_chaining = 0;  /* a chained handler that left by longjmp never cleared it */
    dc_guard_lo = lo;
    dc_guard_hi = hi;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    dc_guard_env = env;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

static inline void dc_disarm(void) {
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    dc_guard_env = NULL;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

/* memcpy that reports a SIGBUS inside [lo, hi) instead of dying: 0, or -1 with *fault set. */
static int dc_guarded_copy(void *dst, const void *src, size_t n,
                           uintptr_t lo, uintptr_t hi, uintptr_t *fault) {
    sigjmp_buf env;
    if (sigsetjmp(env, 0)) {
        *fault = dc_fault_addr;
        return -1;
    }
    dc_arm(&env, lo, hi);
    memcpy(dst, src, n);
    dc_disarm();
    return 0;
}

/* Read one byte of each page of [start, start + npages * page): does not re-dirty the pages.
 * 0 when every page is there, or -1 with *fault set at the first purged one. */
static int dc_guarded_probe(char *start, size_t npages, size_t page, uintptr_t *fault) {
    sigjmp_buf env;
    if (sigsetjmp(env, 0)) {
        *fault = dc_fault_addr;
        return -1;
    }
    dc_arm(&env, (uintptr_t)start, (uintptr_t)start + npages * page);
    for (size_t i = 0; i < npages; i++)
        (void)*(volatile char *)(start + i * page);
    dc_disarm();
    return 0;
}

/* Lock in SIGBUS mode: an atomic read-modify-write of each page's first word re-dirties it (the
 * lazy free is cancelled); a page the kernel discarded faults instead.  On the first fault, every
 * missing page from there on is found with mincore and filled with the zero page through the
 * userfaultfd (one ioctl per run); a later fault (a page discarded meanwhile) fills that page.
 * The count is of pages filled, so a page is counted once.  vec: npages bytes for mincore.
 * Returns the number of purged pages, or -1 with errno when a purged page cannot be filled. */
static long dc_sigbus_lock(char *base, size_t npages, size_t page, int uffd, unsigned char *vec) {
    volatile size_t i = 0;
    volatile long purged = 0;
    volatile int refaults = 0;
    volatile int swept = 0;
    long filled;
    sigjmp_buf env;
    if (sigsetjmp(env, 0)) {
        if (++refaults > 2)
            return errno = EFAULT, -1;
        if (!swept && vec != NULL) {
            swept = 1;
            filled = dc_uffd_fill_missing(uffd, base, i, npages, page, vec);
        } else {
            filled = dc_uffd_zero_fill(uffd, base + i * page, page, page);
        }
        if (filled < 0)
            return -1;
        purged += filled;
    }
    dc_arm(&env, (uintptr_t)base, (uintptr_t)base + npages * page);
    for (; i < npages; i++) {
        uint64_t *word = (uint64_t *)(base + i * page);
        uint64_t seen = __atomic_load_n(word, __ATOMIC_RELAXED);
        while (!__atomic_compare_exchange_n(word, &seen, seen, 0,
                                            __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            ;
        refaults = 0;
    }
    dc_disarm();
    return purged;
}

#endif
