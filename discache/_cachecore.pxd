from libc.stdint cimport uint32_t


cdef class CacheEntry:
    cdef public object key
    cdef public object mem            # the ManagedMemory holding the bytes, or None when empty
    cdef char *addr                   # the bytes in the mapped segment, NULL: read through mem
    cdef public Py_ssize_t size
    cdef public Py_ssize_t weight     # getsizeof(value)
    cdef public bint locked
    cdef public bint used             # touched since the last sweep (second chance)
    cdef public int pins
    cdef public object checksum
    cdef CacheEntry prev              # LRU list of the shard: least recently used first
    cdef CacheEntry next


cdef class CacheShard:
    cdef public dict entries
    cdef public object lock
    cdef public Py_ssize_t ops
    cdef public Py_ssize_t hits
    cdef public Py_ssize_t misses
    cdef public dict purged_keys   # purged, not stored again since: insertion-ordered
    cdef CacheEntry head
    cdef CacheEntry tail

    cdef void _unlink(self, CacheEntry entry) noexcept
    cdef void _append(self, CacheEntry entry) noexcept


cdef class CacheCore:
    cdef list shards_
    cdef Py_ssize_t mask
