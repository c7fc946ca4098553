# The hit path of DiscardableCache.  Included by _core.pyx; declared in _cachecore.pxd.
#
# get() on a locked entry runs entirely while holding the GIL, without calling Python code: the
# lookup, the LRU update and the copy are atomic with respect to other threads.  Everything that
# changes an entry's lock state takes the shard's lock and flips `locked` to False *before*
# unlocking the memory, so a hit never copies from memory that may be discarded.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject, PyObject_Hash
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport uint32_t, uint8_t
from libc.string cimport memcpy

SWEEP_EVERY = 1024  # hits per shard between checks of the idle-unlock clock
cdef Py_ssize_t SWEEP_EVERY_C = SWEEP_EVERY


cdef extern from *:
    """
    #define DC_M3_C1 0xcc9e2d51u
    #define DC_M3_C2 0x1b873593u
    #define DC_M3_N 0xe6546b64u
    #define DC_M3_F1 0x85ebca6bu
    #define DC_M3_F2 0xc2b2ae35u
    """
    const uint32_t DC_M3_C1
    const uint32_t DC_M3_C2
    const uint32_t DC_M3_N
    const uint32_t DC_M3_F1
    const uint32_t DC_M3_F2


cdef inline uint32_t _rotl32(uint32_t x, int r) noexcept nogil:
    return (x << r) | (x >> (32 - r))


cdef uint32_t murmur3_32(const uint8_t *data, Py_ssize_t n, uint32_t seed) noexcept nogil:
    """MurmurHash3 x86_32, the function mmh3.hash computes."""
    cdef uint32_t h = seed, k, c1 = DC_M3_C1, c2 = DC_M3_C2
    cdef Py_ssize_t i, blocks = n // 4
    for i in range(blocks):
        memcpy(&k, data + 4 * i, 4)
        k *= c1
        k = _rotl32(k, 15)
        k *= c2
        h ^= k
        h = _rotl32(h, 13)
        h = h * 5 + DC_M3_N
    k = 0
    cdef Py_ssize_t tail = blocks * 4, rest = n & 3
    if rest >= 3:
        k ^= <uint32_t>data[tail + 2] << 16
    if rest >= 2:
        k ^= <uint32_t>data[tail + 1] << 8
    if rest >= 1:
        k ^= data[tail]
        k *= c1
        k = _rotl32(k, 15)
        k *= c2
        h ^= k
    h ^= <uint32_t>n
    h ^= h >> 16
    h *= DC_M3_F1
    h ^= h >> 13
    h *= DC_M3_F2
    h ^= h >> 16
    return h


cdef inline Py_ssize_t shard_hash(object key) except? -1:
    """mmh3 of str (UTF-8) and bytes keys, as mmh3.hash(key) & 0xffffffff; Python's hash else."""
    cdef const char *data
    cdef Py_ssize_t n
    if type(key) is str:
        data = PyUnicode_AsUTF8AndSize(key, &n)
        return murmur3_32(<const uint8_t *>data, n, 0)
    if type(key) is bytes:
        return murmur3_32(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), 0)
    return PyObject_Hash(key) & PY_SSIZE_T_MAX


def mmh3_shard_hash(key) -> int:
    """The hash DiscardableCache shards keys by (exposed for tests)."""
    return shard_hash(key)


cdef class CacheEntry:
    """One cached value: its memory, size, lock state and place in the LRU list."""

    def bind(self, mem, Py_ssize_t address) -> None:
        """Point the entry at its bytes: address 0 means read through mem."""
        self.mem = mem
        self.addr = <char *>address


cdef class CacheShard:
    """A lock, a dict of entries and their LRU list."""

    def __cinit__(self):
        self.entries = {}
        self.purged_keys = {}

    cdef void _unlink(self, CacheEntry entry) noexcept:
        if entry.prev is None:
            self.head = entry.next
        else:
            entry.prev.next = entry.next
        if entry.next is None:
            self.tail = entry.prev
        else:
            entry.next.prev = entry.prev
        entry.prev = None
        entry.next = None

    cdef void _append(self, CacheEntry entry) noexcept:
        entry.prev = self.tail
        entry.next = None
        if self.tail is None:
            self.head = entry
        else:
            self.tail.next = entry
        self.tail = entry

    def add(self, CacheEntry entry) -> None:
        """Insert (or replace) the entry as most recently used (the caller holds the lock)."""
        old = self.entries.get(entry.key)
        if old is not None:
            self._unlink(old)
        self.entries[entry.key] = entry
        self._append(entry)

    def remove(self, key) -> CacheEntry:
        """Take the entry out (the caller holds the lock); KeyError if missing."""
        cdef CacheEntry entry = self.entries.pop(key)
        self._unlink(entry)
        return entry

    def touch(self, CacheEntry entry) -> None:
        """Make the entry the most recently used."""
        self._unlink(entry)
        self._append(entry)

    def lru(self) -> list:
        """Entries, least recently used first."""
        out = []
        cdef CacheEntry e = self.head
        while e is not None:
            out.append(e)
            e = e.next
        return out

    def oldest_unpinned(self):
        """The least recently used entry that is not pinned, or None."""
        cdef CacheEntry e = self.head
        while e is not None and e.pins:
            e = e.next
        return e


cdef class CacheCore:
    """Base of DiscardableCache: the shards and the hit path."""

    def __cinit__(self, *args, **kwargs):
        self.shards_ = []
        self.mask = 0

    def _init_shards(self, Py_ssize_t count) -> None:
        self.shards_ = [CacheShard() for _ in range(count)]
        self.mask = count - 1

    @property
    def _shards(self) -> list:
        return self.shards_

    def _shard(self, key) -> CacheShard:
        return self.shards_[shard_hash(key) & self.mask]

    def get(self, key, default=None):
        """The value's bytes, or default when the key is missing or its entry was purged."""
        cdef CacheShard shard = self.shards_[shard_hash(key) & self.mask]
        cdef PyObject *found = PyDict_GetItem(shard.entries, key)
        cdef CacheEntry entry
        if found == NULL:
            return self._get_slow(key, default)
        entry = <CacheEntry>found
        if not entry.locked or entry.addr == NULL:
            return self._get_slow(key, default)
        entry.used = True
        if entry is not shard.tail:
            shard._unlink(entry)
            shard._append(entry)
        shard.hits += 1
        shard.ops += 1
        value = PyBytes_FromStringAndSize(entry.addr, entry.size)
        if shard.ops >= SWEEP_EVERY_C:
            self._maybe_sweep(shard)
        return value
