# cython: language_level=3
"""SharedCache's compiled core: attach to the shared file, the lock-free hit, the writer's ops.

The layout and the C halves live in _sharedcache.h (see docs/shared-cache.md).  Every writer's
critical section runs with the GIL held and creates no Python object and calls no Python code, so
two threads of one process (which share this instance's open file description, hence its OFD
lock) never are inside one at the same time.
"""

import os as _os
import weakref as _weakref

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_FillInfo, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from .errors import PinnedError

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL
    bint PyUnicode_Check(object o)
    bint PyBytes_Check(object o)

cdef extern from "<errno.h>":
    int errno
    int EAGAIN
    int EACCES
    int EINTR

cdef extern from "<unistd.h>" nogil:
    int getpid()
    int close(int fd)
    int ftruncate(int fd, long length)
    long sysconf(int name)
    int _SC_PAGESIZE

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    void *MAP_FAILED
    int PROT_READ
    int PROT_WRITE
    int MAP_SHARED

cdef extern from "<fcntl.h>" nogil:
    int fallocate(int fd, int mode, long offset, long length)
    int fcntl(int fd, int cmd, ...)

cdef extern from *:
    """
    #include "_sharedcache.h"
    #define SC_MAX_KEY 65536
    /* Wait for the write lock of byte `at` (F_OFD_SETLKW): 0, or -1 with errno. */
    static int sc_ofd_wait(int fd, uint64_t at) {
        struct flock fl;
        dc_ofd_byte(&fl, at);
        return fcntl(fd, F_OFD_SETLKW, &fl);
    }
    static int sc_ofd_unlock(int fd, uint64_t at) {
        struct flock fl;
        dc_ofd_byte(&fl, at);
        fl.l_type = F_UNLCK;
        return fcntl(fd, F_OFD_SETLK, &fl);
    }
    /* A read lock of byte `at`, not waiting (a pin): 0, or -1 with errno. */
    static int sc_ofd_read_lock(int fd, uint64_t at) {
        struct flock fl;
        dc_ofd_byte(&fl, at);
        fl.l_type = F_RDLCK;
        return fcntl(fd, F_OFD_SETLK, &fl);
    }
    static int sc_reopen(int fd) { return dc_reopen_private(fd); }
    static int sc_lock_byte(int fd, uint64_t at) { return dc_ofd_lock_byte(fd, at); }
    static size_t sc_record_size(void) { return sizeof(sc_record); }
    static size_t sc_slot_size(void) { return sizeof(sc_slot); }
    /* Copy a value page by page, checking between pages that the record did not change (a purge
     * racing the copy stops it early).  1 when the copy is whole and consistent. */
    static int sc_copy_value(const sc_map *m, const sc_found *f, char *dst) {
        const char *src = m->data + f->first_page * m->page;
        const sc_record *r = m->recs + f->index;
        uint64_t done = 0, n;
        while (done < f->vallen) {
            n = f->vallen - done < m->page ? f->vallen - done : m->page;
            memcpy(dst + done, src + done, n);
            done += n;
            if (done < f->vallen && __atomic_load_n(&r->seq, __ATOMIC_ACQUIRE) != f->seq)
                return 0;
        }
        return sc_read_valid(r, f->seq);
    }
    static inline void sc_touch(sc_map *m, uint64_t index) {
        sc_record *r = m->recs + index;
        uint64_t now = sc_now_ns();
        if (now - __atomic_load_n(&r->atime, __ATOMIC_RELAXED) > SC_TOUCH_NS)
            __atomic_store_n(&r->atime, now, __ATOMIC_RELAXED);
    }
    static inline void sc_count(uint64_t *word) { __atomic_fetch_add(word, 1, __ATOMIC_RELAXED); }
    static inline uint64_t sc_load(const uint64_t *word) {
        return __atomic_load_n(word, __ATOMIC_RELAXED);
    }
    /* One live record's key, copied out under its sequence lock: its length and kind, or -1 when
     * the record is not live or changed (buffer: SC_MAX_KEY bytes). */
    static int64_t sc_read_key(const sc_map *m, uint64_t i, unsigned char *buffer, uint32_t *kind) {
        const sc_record *r = m->recs + i;
        uint64_t seq = sc_read_begin(r), keylen;
        uint32_t flags;
        if ((seq & 1) || __atomic_load_n(&r->state, __ATOMIC_RELAXED) != SC_LIVE)
            return -1;
        flags = r->flags;
        keylen = r->keylen;
        if (keylen > SC_MAX_KEY || !sc_sane(m, r->first_page, r->npages, r->vallen, keylen, flags))
            return -1;
        if (flags & SC_FLAG_KEY_INLINE)
            memcpy(buffer, r->key, keylen);
        else
            memcpy(buffer, m->data + r->first_page * m->page + r->vallen, keylen);
        if (!sc_read_valid(r, seq))
            return -1;
        *kind = flags & 0xff;
        return (int64_t)keylen;
    }
    """
    ctypedef struct sc_record:
        uint64_t seq
        uint64_t atime
        uint64_t hash
        uint32_t state
        uint32_t flags
        uint64_t first_page
        uint32_t npages
        uint32_t keylen
        uint64_t vallen
        uint64_t checksum

    ctypedef struct sc_header:
        uint64_t magic
        uint32_t version
        uint32_t page
        uint64_t maxsize
        uint64_t data_pages
        uint64_t capacity
        uint64_t slots_off, bitmap_off, index_off, data_off, file_size
        uint64_t idle_ns
        uint64_t created_ns
        uint64_t dirty
        uint64_t move_seq
        uint64_t live, markers, used_pages, alloc_hint
        uint64_t purged_bytes, purged_entries, sets, recoveries
        uint64_t evictions[3]
        uint64_t pins_hint
        uint64_t pressure_events[2]

    ctypedef struct sc_slot:
        uint64_t hits, misses, purges_detected, checksum_failures

    ctypedef struct sc_map:
        char *base
        size_t mapped
        sc_header *hdr
        sc_slot *slots
        uint64_t *bitmap
        sc_record *recs
        char *data
        uint64_t mask
        uint64_t page
        uint64_t data_pages
        int fd
        int probe_fd

    ctypedef struct sc_found:
        uint64_t index, seq, first_page, vallen, checksum
        uint32_t state, npages

    uint64_t SC_MAGIC
    int SC_VERSION
    int SC_INLINE_KEY
    int SC_LIVE
    int SC_PURGED
    int SC_EMPTY
    int SC_KIND_BYTES
    int SC_KIND_STR
    int SC_SLOTS
    int SC_FIND_MISS
    int SC_FIND_LIVE
    int SC_FIND_PURGED
    int SC_FIND_STUCK
    int SC_WHY_SIZE
    int SC_WHY_PURGED
    int SC_WHY_EXPLICIT
    int SC_MAX_KEY
    uint64_t SC_LOCK_WRITER
    uint64_t SC_LOCK_SLOT_BASE
    uint64_t SC_LOCK_PIN_BASE
    uint64_t UINT64_MAX
    int FALLOC_FL_PUNCH_HOLE
    int FALLOC_FL_KEEP_SIZE

    size_t sc_record_size()
    size_t sc_slot_size()
    uint64_t sc_key_hash(const unsigned char *key, size_t n, uint32_t kind) nogil
    uint64_t sc_checksum(const unsigned char *value, size_t n) nogil
    uint64_t sc_now_ns() nogil
    int sc_find(const sc_map *m, uint64_t hash, uint32_t kind, const unsigned char *key,
                size_t keylen, sc_found *f) nogil
    int sc_copy_value(const sc_map *m, const sc_found *f, char *dst) nogil
    int sc_read_valid(const sc_record *r, uint64_t seq) nogil
    void sc_touch(sc_map *m, uint64_t index) nogil
    void sc_count(uint64_t *word) nogil
    uint64_t sc_load(const uint64_t *word) nogil
    int64_t sc_read_key(const sc_map *m, uint64_t i, unsigned char *buffer, uint32_t *kind) nogil
    int sc_ofd_wait(int fd, uint64_t at) nogil
    int sc_ofd_unlock(int fd, uint64_t at) nogil
    int sc_ofd_read_lock(int fd, uint64_t at) nogil
    int sc_reopen(int fd) nogil
    int sc_lock_byte(int fd, uint64_t at) nogil
    int dc_ofd_byte_held(int fd, uint64_t at) nogil
    int sc_repair(sc_map *m) nogil
    void sc_punch_free(sc_map *m) nogil
    int sc_set(sc_map *m, uint64_t hash, uint32_t kind, const unsigned char *key, size_t keylen,
               const unsigned char *value, size_t vallen, uint64_t checksum) nogil
    int64_t sc_w_find(const sc_map *m, uint64_t hash, uint32_t kind, const unsigned char *key,
                      size_t keylen, int64_t *empty) nogil
    int sc_pinned(const sc_map *m, const sc_record *r) nogil
    int sc_delete_record(sc_map *m, uint64_t i, int why) nogil
    uint64_t sc_clear(sc_map *m) nogil
    void sc_free_pages(sc_map *m, uint64_t first, uint64_t n) nogil
    void sc_drop_markers(sc_map *m) nogil
    ctypedef int (*sc_enough_fn)(const sc_map *m, uint64_t want) nogil
    int sc_never_enough(const sc_map *m, uint64_t want) nogil
    int64_t sc_purge_lru(sc_map *m, sc_enough_fn enough, uint64_t want, uint64_t older_than,
                         int why) nogil
    void sc_write_begin(sc_record *r) nogil
    void sc_write_end(sc_record *r) nogil
    void sc_move_begin(sc_header *h) nogil
    void sc_move_end(sc_header *h) nogil


RECORD_BYTES = sc_record_size()
SLOTS = SC_SLOTS
INLINE_KEY_BYTES = SC_INLINE_KEY
MAX_KEY_BYTES = SC_MAX_KEY
EVICTION_REASONS = ("size", "purged", "explicit")
_COPY_WITHOUT_GIL = 1 << 20  # values from this size are copied with the GIL released

cdef object _instances = _weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Give every open SharedCache of the child its own file description and counter slot."""
    for cache in list(_instances):
        (<SharedCacheCore>cache)._reattach()


_os.register_at_fork(after_in_child=_after_fork_in_child)


cdef inline uint64_t _round_up(uint64_t n, uint64_t unit):
    return (n + unit - 1) // unit * unit


cdef inline int _key_of(object key, const unsigned char **data, Py_ssize_t *size,
                        uint32_t *kind) except -1:
    """The bytes and kind of a key (str as UTF-8, bytes as is)."""
    if PyUnicode_Check(key):
        data[0] = <const unsigned char *>PyUnicode_AsUTF8AndSize(key, size)
        kind[0] = SC_KIND_STR
    elif PyBytes_Check(key):
        data[0] = <const unsigned char *>PyBytes_AS_STRING(key)
        size[0] = len(<bytes>key)
        kind[0] = SC_KIND_BYTES
    else:
        raise TypeError(f"a SharedCache key must be str or bytes, got {type(key).__name__}")
    if size[0] > SC_MAX_KEY:
        raise ValueError(f"key too long: {size[0]} bytes, at most {SC_MAX_KEY}")
    return 0


def geometry(maxsize: int, page: int) -> dict:
    """The file's layout for a cache of maxsize bytes: offsets and sizes in bytes."""
    cdef uint64_t data_pages = max(1, (maxsize + page - 1) // page)
    cdef uint64_t capacity = 64
    while capacity < 2 * data_pages:
        capacity *= 2
    slots_off = page
    bitmap_off = slots_off + _round_up((SC_SLOTS + 1) * sc_slot_size(), page)
    index_off = bitmap_off + _round_up((data_pages + 63) // 64 * 8, page)
    data_off = index_off + _round_up(capacity * sc_record_size(), page)
    return {"data_pages": data_pages, "capacity": capacity, "slots_off": slots_off,
            "bitmap_off": bitmap_off, "index_off": index_off, "data_off": data_off,
            "file_size": data_off + data_pages * page}


cdef class SharedCacheCore:
    """The shared mapping and the operations on it; discache.SharedCache is the public class."""

    cdef sc_map m
    cdef sc_slot *slot
    cdef readonly object path
    cdef readonly bint verify
    cdef int pid
    cdef int slot_index
    cdef uint64_t hits_, misses_, purges_detected_, checksum_failures_
    cdef dict pins_           # first page -> views of it held by this instance
    cdef Py_ssize_t views_
    cdef Py_ssize_t busy_     # threads inside a call that runs without the GIL
    cdef object __weakref__

    def __cinit__(self):
        self.m.fd = -1
        self.m.probe_fd = -1
        self.m.base = NULL
        self.slot_index = -1
        self.pins_ = {}

    def __dealloc__(self):
        self._release()

    cdef void _release(self):
        if self.m.base != NULL:
            munmap(self.m.base, self.m.mapped)
            self.m.base = NULL
        if self.m.fd >= 0:
            close(self.m.fd)
            self.m.fd = -1
        if self.m.probe_fd >= 0:
            close(self.m.probe_fd)
            self.m.probe_fd = -1

    # ------------------------------------------------------------------ attaching

    def _attach(self, path: str, uint64_t maxsize, bint create, bint verify, double idle_unlock):
        """Open (or create) the shared file, check or write its layout, map it."""
        cdef int fd
        cdef uint64_t page = sysconf(_SC_PAGESIZE)
        cdef sc_header *hdr
        cdef void *mapping
        flags = _os.O_RDWR | _os.O_CLOEXEC | _os.O_NOFOLLOW | (_os.O_CREAT if create else 0)
        fd = _os.open(path, flags, 0o600)
        self.m.fd = fd
        self.path = path
        self.verify = verify
        self.pid = getpid()
        info = _os.fstat(fd)
        import stat as _stat
        if not _stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file")
        self._lock_writer_only()
        try:
            size = _os.fstat(fd).st_size
            if size >= page:
                self._map(page)
                hdr = <sc_header *>self.m.base
                magic = hdr.magic
                munmap(self.m.base, page)
                self.m.base = NULL
            else:
                magic = 0
            if magic == 0:  # new, or its creator died before finishing: (re)initialize
                self._initialize(maxsize, page, idle_unlock)
            else:
                self._check_layout(maxsize, page, size)
                self._map(size)
                self._wire()
                self._repair_if_dirty()
        finally:
            sc_ofd_unlock(self.m.fd, SC_LOCK_WRITER)
        self.m.probe_fd = _os.open(path, _os.O_RDWR | _os.O_CLOEXEC | _os.O_NOFOLLOW)
        self._claim_slot()
        _instances.add(self)

    cdef int _check_layout(self, uint64_t maxsize, uint64_t page, uint64_t size) except -1:
        cdef sc_header *hdr
        self._map(page)
        hdr = <sc_header *>self.m.base
        try:
            if hdr.magic != SC_MAGIC or hdr.version != SC_VERSION:
                raise ValueError(f"{self.path} is not a discache shared cache (or another "
                                 f"version of its layout)")
            if hdr.page != page or hdr.file_size != size:
                raise ValueError(f"{self.path} has another geometry than its header says")
            if hdr.maxsize != maxsize:
                raise ValueError(f"the shared cache {self.path} exists with maxsize="
                                 f"{hdr.maxsize}, not {maxsize}: attach with the same maxsize "
                                 f"(or unlink it first)")
        finally:
            munmap(self.m.base, page)
            self.m.base = NULL
        return 0

    cdef int _initialize(self, uint64_t maxsize, uint64_t page, double idle_unlock) except -1:
        layout = geometry(maxsize, page)
        if ftruncate(self.m.fd, 0) != 0 or ftruncate(self.m.fd, layout["file_size"]) != 0:
            raise OSError(errno, f"ftruncate of {self.path}: {_os.strerror(errno)}")
        # The metadata is allocated now: a full /dev/shm then fails here with an error rather
        # than with a SIGBUS on a later write to the mapping.
        if fallocate(self.m.fd, 0, 0, layout["data_off"]) != 0:
            err = errno
            _os.unlink(self.path)
            raise OSError(err, f"cannot allocate {layout['data_off']} bytes of shared memory "
                               f"for {self.path}: {_os.strerror(err)}")
        self._map(layout["file_size"])
        hdr = <sc_header *>self.m.base
        memset(self.m.base, 0, page)
        hdr.version = SC_VERSION
        hdr.page = page
        hdr.maxsize = maxsize
        hdr.data_pages = layout["data_pages"]
        hdr.capacity = layout["capacity"]
        hdr.slots_off = layout["slots_off"]
        hdr.bitmap_off = layout["bitmap_off"]
        hdr.index_off = layout["index_off"]
        hdr.data_off = layout["data_off"]
        hdr.file_size = layout["file_size"]
        hdr.idle_ns = <uint64_t>(idle_unlock * 1e9)
        hdr.created_ns = sc_now_ns()
        self._wire()
        hdr.magic = SC_MAGIC  # last: a creator that dies before this leaves a file to redo
        return 0

    cdef int _map(self, uint64_t size) except -1:
        cdef void *mapping = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, self.m.fd, 0)
        if mapping == MAP_FAILED:
            raise OSError(errno, f"mmap of {self.path}: {_os.strerror(errno)}")
        self.m.base = <char *>mapping
        self.m.mapped = size
        return 0

    cdef void _wire(self):
        cdef sc_header *hdr = <sc_header *>self.m.base
        self.m.hdr = hdr
        self.m.slots = <sc_slot *>(self.m.base + hdr.slots_off)
        self.m.bitmap = <uint64_t *>(self.m.base + hdr.bitmap_off)
        self.m.recs = <sc_record *>(self.m.base + hdr.index_off)
        self.m.data = self.m.base + hdr.data_off
        self.m.mask = hdr.capacity - 1
        self.m.page = hdr.page
        self.m.data_pages = hdr.data_pages

    cdef int _claim_slot(self) except -1:
        """A counter slot of our own: the first whose lock byte nobody holds (the kernel drops
        a dead process's); past SC_SLOTS instances, the shared overflow slot."""
        cdef int i
        for i in range(SC_SLOTS):
            if sc_lock_byte(self.m.fd, SC_LOCK_SLOT_BASE + i) == 0:
                self.slot_index = i
                self.slot = self.m.slots + i
                return 0
        self.slot_index = SC_SLOTS
        self.slot = self.m.slots + SC_SLOTS
        return 0

    cdef int _reattach(self) except -1:
        """After fork: a description of our own (the parent's locks stay the parent's)."""
        cdef int fresh
        if self.m.base == NULL or self.pid == getpid():
            return 0
        fresh = sc_reopen(self.m.fd)
        if fresh < 0:
            fresh = _os.open(self.path, _os.O_RDWR | _os.O_CLOEXEC | _os.O_NOFOLLOW)
        close(self.m.fd)
        self.m.fd = fresh
        self.pid = getpid()
        self.pins_ = {}  # the parent's pins are held by the parent's description
        if getattr(self, "_monitor", None) is not None:
            self._monitor = None  # the parent's pressure thread (its pipe must not be touched)
        self.views_ = 0
        self.hits_ = self.misses_ = self.purges_detected_ = self.checksum_failures_ = 0
        self._claim_slot()
        return 0

    cdef inline int _check_open(self) except -1:
        if self.m.base == NULL:
            raise ValueError("the SharedCache is closed")
        return 0

    # ------------------------------------------------------------------ the writer lock

    cdef int _lock_writer_only(self) except -1:
        """Take the writer lock: the OFD write lock of byte 0, waiting without the GIL."""
        cdef int rc
        cdef bint mapped = self.m.base != NULL  # attaching waits before anything is mapped
        while True:
            if sc_lock_byte(self.m.fd, SC_LOCK_WRITER) == 0:
                return 0  # with the GIL: no other thread of ours is in a critical section
            if errno != EAGAIN and errno != EACCES:
                raise OSError(errno, f"fcntl(F_OFD_SETLK) on {self.path}: {_os.strerror(errno)}")
            self.busy_ += 1  # close() from another thread waits for us to leave
            with nogil:
                rc = sc_ofd_wait(self.m.fd, SC_LOCK_WRITER)
            self.busy_ -= 1
            if mapped and self.m.base == NULL:
                raise ValueError("the SharedCache was closed while waiting for its lock")
            if rc != 0 and errno != EINTR:
                raise OSError(errno, f"fcntl(F_OFD_SETLKW) on {self.path}: {_os.strerror(errno)}")
            PyErr_CheckSignals()
            # granted (or interrupted): take it again with the GIL, since another thread of ours
            # may have taken and released it meanwhile

    cdef int _wlock(self) except -1:
        """Enter a critical section: the writer lock, a repair if the last holder died in one."""
        self._check_open()
        if self.pid != getpid():
            self._reattach()
        self._lock_writer_only()
        if self.m.hdr.dirty:
            if sc_repair(&self.m) != 0:
                sc_ofd_unlock(self.m.fd, SC_LOCK_WRITER)
                raise MemoryError("repairing the shared cache's index")
        self.m.hdr.dirty = 1
        return 0

    cdef int _rescue(self) except -1:
        """A reader met a record left odd: if the writer lock is free, its holder died in a
        change; repair now rather than waiting for the next writer (never blocks)."""
        if self.pid != getpid():
            self._reattach()
        if sc_lock_byte(self.m.fd, SC_LOCK_WRITER) != 0:
            return 0  # a live writer holds it: it is simply slow
        try:
            self._repair_if_dirty()
        finally:
            sc_ofd_unlock(self.m.fd, SC_LOCK_WRITER)
        return 0

    cdef int _repair_if_dirty(self) except -1:
        """With the writer lock held: a dead writer's half-change undone (its one entry dropped,
        the bitmap and counts rebuilt from the index)."""
        if self.m.hdr.dirty:
            if sc_repair(&self.m) != 0:
                raise MemoryError("repairing the shared cache's index")
            self.m.hdr.dirty = 0
        return 0

    cdef void _wunlock(self):
        self.m.hdr.dirty = 0
        sc_ofd_unlock(self.m.fd, SC_LOCK_WRITER)

    # ------------------------------------------------------------------ reading

    def get(self, key, default=None):
        """The value of key (bytes, one copy), or default when absent or purged."""
        cdef const unsigned char *k
        cdef Py_ssize_t klen
        cdef uint32_t kind
        cdef sc_found f
        cdef int found, attempt, whole
        cdef bytes value
        cdef char *dst
        if self.m.base == NULL:
            raise ValueError("the SharedCache is closed")
        _key_of(key, &k, &klen, &kind)
        cdef uint64_t h = sc_key_hash(k, klen, kind)
        for attempt in range(16):
            found = sc_find(&self.m, h, kind, k, klen, &f)
            if found == SC_FIND_STUCK and attempt == 0:
                self._rescue()
                continue
            if found != SC_FIND_LIVE:
                self.misses_ += 1
                sc_count(&self.slot.misses)
                if found == SC_FIND_PURGED:
                    self.purges_detected_ += 1
                    sc_count(&self.slot.purges_detected)
                return default
            value = PyBytes_FromStringAndSize(NULL, f.vallen)
            dst = PyBytes_AS_STRING(value)
            if f.vallen < _COPY_WITHOUT_GIL:
                whole = sc_copy_value(&self.m, &f, dst)
            else:
                self.busy_ += 1
                with nogil:
                    whole = sc_copy_value(&self.m, &f, dst)
                self.busy_ -= 1
            if not whole:
                continue  # changed while copied: look again
            if self.verify and sc_checksum(<const unsigned char *>dst, f.vallen) != f.checksum:
                self.checksum_failures_ += 1
                sc_count(&self.slot.checksum_failures)
                self.misses_ += 1
                sc_count(&self.slot.misses)
                return default
            sc_touch(&self.m, f.index)
            self.hits_ += 1
            sc_count(&self.slot.hits)
            return value
        self.misses_ += 1
        sc_count(&self.slot.misses)
        return default

    def __getitem__(self, key):
        cdef object value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key) -> bool:
        """Whether key has a live entry now (no copy, no hit or miss counted)."""
        cdef const unsigned char *k
        cdef Py_ssize_t klen
        cdef uint32_t kind
        cdef sc_found f
        self._check_open()
        if not (PyUnicode_Check(key) or PyBytes_Check(key)):
            return False
        _key_of(key, &k, &klen, &kind)
        return sc_find(&self.m, sc_key_hash(k, klen, kind), kind, k, klen, &f) == SC_FIND_LIVE

    def __len__(self) -> int:
        """Live entries, host-wide."""
        self._check_open()
        return sc_load(&self.m.hdr.live)

    def keys_snapshot(self) -> list:
        """The keys of the live entries now (host-wide; entries may come and go meanwhile)."""
        cdef uint64_t i
        cdef int64_t n
        cdef uint32_t kind
        cdef bytearray buffer = bytearray(SC_MAX_KEY)
        cdef unsigned char *raw = <unsigned char *>(<char *>buffer)
        self._check_open()
        keys = []
        for i in range(self.m.mask + 1):
            n = sc_read_key(&self.m, i, raw, &kind)
            if n < 0:
                continue
            data = PyBytes_FromStringAndSize(<char *>raw, n)
            keys.append(data.decode("utf-8") if kind == SC_KIND_STR else data)
        return keys

    # ------------------------------------------------------------------ writing

    def __setitem__(self, key, value) -> None:
        """Store a copy of value (any C-contiguous bytes-like object) under key, host-wide."""
        cdef const unsigned char *k
        cdef Py_ssize_t klen
        cdef uint32_t kind
        cdef Py_buffer view
        cdef int rc
        cdef uint64_t h, csum, need
        self._check_open()
        _key_of(key, &k, &klen, &kind)
        if not _is_buffer(value):
            raise TypeError(f"a SharedCache value must be bytes-like, got {type(value).__name__}")
        PyObject_GetBuffer(value, &view, PyBUF_SIMPLE)  # C-contiguous, or BufferError
        try:
            need = view.len + (klen if klen > SC_INLINE_KEY else 0)
            if need > self.m.data_pages * self.m.page:
                raise ValueError(f"value too large: {view.len} bytes (with its key, "
                                 f"{need}) do not fit in maxsize={self.m.hdr.maxsize}")
            h = sc_key_hash(k, klen, kind)
            csum = sc_checksum(<const unsigned char *>view.buf, view.len)
            self._wlock()
            rc = sc_set(&self.m, h, kind, k, klen, <const unsigned char *>view.buf, view.len, csum)
            self._wunlock()
        finally:
            PyBuffer_Release(&view)
        if rc == -3:
            raise PinnedError(f"{key!r} is pinned by a view (in this or another process): "
                              f"end the view before replacing it")
        if rc == -1:
            raise PinnedError(f"no room for {key!r}: the entries left are pinned by views")
        if rc == -2:
            raise MemoryError("out of memory while making room in the shared cache")
        if rc == -4:
            raise MemoryError(f"/dev/shm is full: cannot allocate {view.len} bytes for {key!r}")

    def _delete(self, key, bint copy):
        """Remove key's entry: its value (copy=True) or True; None when absent or purged."""
        cdef const unsigned char *k
        cdef Py_ssize_t klen
        cdef uint32_t kind
        cdef int64_t at, empty
        cdef sc_record *r
        cdef object result = None
        cdef bint pinned = False
        self._check_open()
        _key_of(key, &k, &klen, &kind)
        cdef uint64_t h = sc_key_hash(k, klen, kind)
        self._wlock()
        try:
            at = sc_w_find(&self.m, h, kind, k, klen, &empty)
            if at >= 0:
                r = self.m.recs + at
                if r.state == SC_LIVE:
                    if copy:
                        result = PyBytes_FromStringAndSize(
                            self.m.data + r.first_page * self.m.page, r.vallen)
                    else:
                        result = True
                if not sc_delete_record(&self.m, at, SC_WHY_EXPLICIT):
                    pinned = True
        finally:
            self._wunlock()
        if pinned:
            raise PinnedError(f"{key!r} is pinned by a view (in this or another process): "
                              f"end the view before deleting it")
        return result

    def clear(self) -> None:
        """Remove every entry, host-wide; PinnedError names how many pinned ones stay."""
        cdef uint64_t kept
        self._wlock()
        try:
            kept = sc_clear(&self.m)
        finally:
            self._wunlock()
        if kept:
            raise PinnedError(f"clear() left {kept} entries pinned by views; the rest is gone")

    def purge(self, older_than=None) -> int:
        """Purge (discard, host-wide) every unpinned entry idle for older_than seconds (None: all);
        returns the bytes purged.  Every process's get() then misses them."""
        cdef uint64_t limit = UINT64_MAX
        cdef int64_t purged
        if older_than is not None:
            limit = sc_now_ns() - min(<uint64_t>(float(older_than) * 1e9), sc_now_ns())
        self._wlock()
        try:
            purged = sc_purge_lru(&self.m, sc_never_enough, 0, limit, SC_WHY_PURGED)
            sc_punch_free(&self.m)  # a policy purge returns all the free memory
        finally:
            self._wunlock()
        if purged < 0:
            raise MemoryError("out of memory while purging the shared cache")
        return purged

    def _count_pressure(self, int level) -> None:
        self._wlock()
        self.m.hdr.pressure_events[level] += 1
        self._wunlock()

    # ------------------------------------------------------------------ pins (views)

    def _pin(self, key):
        """Pin key's entry for a view: (first page, value length, record index, seq) or None."""
        cdef const unsigned char *k
        cdef Py_ssize_t klen
        cdef uint32_t kind
        cdef sc_found f
        cdef int attempt
        self._check_open()
        if self.pid != getpid():
            self._reattach()
        _key_of(key, &k, &klen, &kind)
        cdef uint64_t h = sc_key_hash(k, klen, kind)
        for attempt in range(16):
            if sc_find(&self.m, h, kind, k, klen, &f) != SC_FIND_LIVE:
                return None
            if f.npages == 0:
                return (f.first_page, 0, 0)
            if self.pins_.get(f.first_page, 0) == 0:
                __atomic_add(&self.m.hdr.pins_hint, 1)
                if sc_ofd_read_lock(self.m.fd, SC_LOCK_PIN_BASE + f.first_page) != 0:
                    __atomic_sub(&self.m.hdr.pins_hint, 1)
                    continue  # a writer is purging it right now
            self.pins_[f.first_page] = self.pins_.get(f.first_page, 0) + 1
            if sc_read_valid(self.m.recs + f.index, f.seq):
                sc_touch(&self.m, f.index)
                return (f.first_page, f.vallen, 1)
            self._unpin(f.first_page)
        return None

    def _unpin(self, uint64_t first_page) -> None:
        count = self.pins_.get(first_page, 0)
        if count <= 0:
            return
        if count == 1:
            del self.pins_[first_page]
            if self.m.fd >= 0:
                sc_ofd_unlock(self.m.fd, SC_LOCK_PIN_BASE + first_page)
            if self.m.base != NULL:
                __atomic_sub(&self.m.hdr.pins_hint, 1)
        else:
            self.pins_[first_page] = count - 1

    def _view_buffer(self, uint64_t first_page, uint64_t length):
        """A read-only memoryview of the pinned pages (valid while the cache stays open)."""
        self._check_open()
        return _PagesView(self, first_page, length)

    # ------------------------------------------------------------------ reporting

    def _counters(self) -> dict:
        """Host-wide numbers from the header and the counter slots, and this process's."""
        cdef sc_header *h
        cdef uint64_t hits = 0, misses = 0, detected = 0, failures = 0, i
        cdef uint64_t locked = 0, unlocked = 0, now = sc_now_ns(), idle
        cdef sc_record *r
        self._check_open()
        h = self.m.hdr
        for i in range(SC_SLOTS + 1):
            hits += sc_load(&self.m.slots[i].hits)
            misses += sc_load(&self.m.slots[i].misses)
            detected += sc_load(&self.m.slots[i].purges_detected)
            failures += sc_load(&self.m.slots[i].checksum_failures)
        idle = h.idle_ns
        for i in range(self.m.mask + 1):
            r = self.m.recs + i
            if sc_load(<uint64_t *>&r.seq) & 1 or r.state != SC_LIVE:
                continue
            if now - min(now, sc_load(&r.atime)) < idle or sc_pinned(&self.m, r):
                locked += r.npages * self.m.page
            else:
                unlocked += r.npages * self.m.page
        return {
            "entries": sc_load(&h.live),
            "purged_markers": sc_load(&h.markers),
            "maxsize": h.maxsize,
            "allocated_bytes": sc_load(&h.used_pages) * self.m.page,
            "locked_bytes": locked,
            "unlocked_bytes": unlocked,
            "purged_bytes": sc_load(&h.purged_bytes),
            "purged_entries": sc_load(&h.purged_entries),
            "sets": sc_load(&h.sets),
            "recoveries": sc_load(&h.recoveries),
            "evictions": {reason: sc_load(&h.evictions[n])
                          for n, reason in enumerate(EVICTION_REASONS)},
            "pressure_events": {"moderate": sc_load(&h.pressure_events[0]),
                                "critical": sc_load(&h.pressure_events[1])},
            "host_hits": hits,
            "host_misses": misses,
            "host_purges_detected": detected,
            "host_checksum_failures": failures,
            "hits": self.hits_,
            "misses": self.misses_,
            "purges_detected": self.purges_detected_,
            "checksum_failures": self.checksum_failures_,
            "idle_unlock": idle / 1e9,
            "file_bytes": h.file_size,
            "data_pages": self.m.data_pages,
            "index_records": self.m.mask + 1,
            "counter_slot": self.slot_index,
        }

    @property
    def maxsize(self) -> int:
        """The byte limit of the entries' pages (host-wide)."""
        self._check_open()
        return self.m.hdr.maxsize

    @property
    def closed(self) -> bool:
        """True once close() ran."""
        return self.m.base == NULL

    def _close(self) -> None:
        """Unmap and close (BufferError while a view of this instance lives)."""
        if self.m.base == NULL:
            self._release()  # an attach that failed half-way may hold descriptors
            return
        if self.busy_:
            raise RuntimeError("another thread is inside a call on this SharedCache (waiting for "
                               "its lock or copying a large value): close it after that call")
        if self.views_:
            raise BufferError(f"{self.views_} views of this SharedCache are alive: release them "
                              "before close()")
        for first_page in list(self.pins_):
            self.pins_[first_page] = 1
            self._unpin(first_page)
        _instances.discard(self)
        self._release()


cdef extern from *:
    """
    /* seq_cst: a pinner's count must be seen by a writer that has not seen its lock (sc_claim) */
    static inline void __atomic_add(uint64_t *w, uint64_t d) {
        __atomic_fetch_add(w, d, __ATOMIC_SEQ_CST);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
    static inline void __atomic_sub(uint64_t *w, uint64_t d) { __atomic_fetch_sub(w, d, __ATOMIC_RELAXED); }
    """
    void __atomic_add(uint64_t *w, uint64_t d)
    void __atomic_sub(uint64_t *w, uint64_t d)


cdef object _MISSING = object()


cdef bint _is_buffer(object value):
    if PyBytes_Check(value):
        return True
    try:
        memoryview(value).release()
    except TypeError:
        return False
    return True


cdef class _PagesView:
    """The buffer of a pinned entry's pages, read-only; keeps its cache from closing."""

    cdef SharedCacheCore cache
    cdef uint64_t first_page
    cdef Py_ssize_t length
    cdef Py_ssize_t exports

    def __cinit__(self, SharedCacheCore cache, uint64_t first_page, Py_ssize_t length):
        self.cache = cache
        self.first_page = first_page
        self.length = length
        cache.views_ += 1

    def __dealloc__(self):
        if self.cache is not None:
            self.cache.views_ -= 1

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if self.cache.m.base == NULL:
            raise ValueError("the SharedCache is closed")
        PyBuffer_FillInfo(buffer, self, self.cache.m.data + self.first_page * self.cache.m.page,
                          self.length, 1, flags)

    def __releasebuffer__(self, Py_buffer *buffer):
        pass
