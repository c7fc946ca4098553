cdef class Guard:
    cdef object lock
    cdef Py_ssize_t depth
    cdef int enter(self) except -1
    cdef void _entered(self) noexcept
    cdef int leave(self) except -1


cdef class Slab:
    cdef public object mem            # the manager's memory holding the slots
    cdef char *base                   # its first byte, NULL: read and write through mem
    cdef readonly Py_ssize_t size_class   # index into SIZE_CLASSES; -1: one value of its own
    cdef readonly Py_ssize_t slot_size
    cdef readonly Py_ssize_t nslots
    cdef public bint locked
    cdef public bint used             # read since the last idle tick
    cdef public bint listed           # among its class's slabs with free slots
    cdef public bint doomed           # closed as soon as its last pin goes
    cdef public Py_ssize_t pins       # pins and live views of its entries
    cdef public Py_ssize_t live       # slots holding an entry
    cdef public double last_used      # the idle tick that last saw it used
    cdef public list free_slots
    cdef public list entries          # slot -> CacheEntry or None

    cdef void _rebind(self, object address)


cdef class CacheEntry:
    cdef public object key
    cdef public Slab slab             # None for an empty value
    cdef public Py_ssize_t slot
    cdef public Py_ssize_t size
    cdef public Py_ssize_t weight     # getsizeof(value)
    cdef public int pins              # pin() calls and live views
    cdef public int views             # live views (buffers handed out by view())
    cdef public bint linked           # in the LRU list (a hit may move it)
    cdef public object checksum
    cdef CacheEntry prev              # the LRU list: least recently used first
    cdef CacheEntry next


cdef class CacheCore:
    cdef readonly dict entries_
    cdef CacheEntry head
    cdef CacheEntry tail
    cdef public Py_ssize_t currsize_
    cdef public Py_ssize_t maxsize_
    cdef public Py_ssize_t hits_
    cdef public Py_ssize_t misses_
    cdef public bint default_size     # getsizeof is the value's byte size: no Python call
    cdef public list partial_         # per size class: slabs with a free slot
    cdef public object lock_
    cdef public object guard_         # lock_ with the garbage collector paused
    cdef public object purged_keys_   # keys found purged, until stored again (regenerations)
    cdef public list events_          # (key, reason) to report once the lock is released
    cdef public Py_ssize_t evicted_for_size_
    cdef public Py_ssize_t pinned_weight_   # weights of the pinned (or viewed) entries
    cdef public object on_evict_

    cdef void _unlink(self, CacheEntry entry) noexcept
    cdef void _append(self, CacheEntry entry) noexcept
    cdef inline void _hit(self, CacheEntry entry) noexcept
    cdef _put(self, key, const char *data, Py_ssize_t size, Py_ssize_t weight)
    cdef bint _fits(self, CacheEntry old, Py_ssize_t size)
    cdef Slab _claim(self, Py_ssize_t size, CacheEntry entry)
    cdef int _write(self, Slab slab, Py_ssize_t slot, const char *data, Py_ssize_t size) except -1
    cdef int _evict_over(self, CacheEntry keep) except -1
    cdef int _dict_remove(self, CacheEntry entry) except -1
    cdef int _remove_by_identity(self, CacheEntry entry) except -1
    cdef void _release_slot(self, CacheEntry entry) except *
