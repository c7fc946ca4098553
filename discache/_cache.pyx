# cython: language_level=3, wraparound=True, boundscheck=True
"""DiscardableCache's compiled part: size classes, slabs of slots, the LRU list, hits and sets.

A hit runs entirely while holding the GIL and calls no Python code between the lookup and the
copy, so it needs no lock: everything that changes an entry takes the cache's lock and keeps each
entry in the dict either linked in the LRU list with readable bytes, or marked unlinked (the hit
then takes the locked slow path).  A slab is flagged unlocked *before* its memory is unlocked, so a
hit never copies from memory that may be discarded.
"""

from cpython.buffer cimport (PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_FillInfo, PyBuffer_Release,
                             PyObject_GetBuffer)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_GetItemWithError
from cpython.object cimport PyObject
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

from .errors import PinnedError

cdef extern from *:
    """
    /* The garbage collector paused while a cache's lock is held: a finalizer run by a
       collection in the middle of a cache call (weakref.finalize(obj, cache.pop, key)) would
       otherwise re-enter the cache half-way through a change. */
    #if PY_VERSION_HEX >= 0x030A0000
    static int dc_gc_disable(void) { return PyGC_Disable(); }
    static void dc_gc_enable(void) { PyGC_Enable(); }
    #else
    static int dc_gc_call(const char *name) {
        PyObject *gc = PyImport_ImportModule("gc"), *r;
        int enabled = 0;
        if (gc == NULL) { PyErr_Clear(); return 0; }
        r = PyObject_CallMethod(gc, "isenabled", NULL);
        if (r != NULL) { enabled = PyObject_IsTrue(r); Py_DECREF(r); }
        r = name ? PyObject_CallMethod(gc, name, NULL) : NULL;
        Py_XDECREF(r);
        Py_DECREF(gc);
        PyErr_Clear();
        return enabled;
    }
    static int dc_gc_disable(void) { return dc_gc_call("disable"); }
    static void dc_gc_enable(void) { dc_gc_call("enable"); }
    #endif
    """
    int dc_gc_disable()
    void dc_gc_enable()


cdef Py_ssize_t GC_HOLDS = 0  # guards held in this process (all caches, all threads)
cdef bint GC_WAS_ENABLED = False


cdef class Guard:
    """A cache's lock, with the garbage collector paused while any cache's lock is held (the
    counts change under the GIL with no Python code between, so threads agree on them)."""

    def __cinit__(self, lock):
        self.lock = lock

    cdef int enter(self) except -1:
        self.lock.acquire()
        self._entered()
        return 0

    cdef void _entered(self) noexcept:
        global GC_HOLDS, GC_WAS_ENABLED
        self.depth += 1
        if self.depth == 1:
            if GC_HOLDS == 0:
                GC_WAS_ENABLED = dc_gc_disable()
            GC_HOLDS += 1

    cdef int leave(self) except -1:
        global GC_HOLDS
        if self.depth == 1:
            GC_HOLDS -= 1
            if GC_HOLDS == 0 and GC_WAS_ENABLED:
                dc_gc_enable()
        self.depth -= 1
        self.lock.release()
        return 0

    def __enter__(self):
        self.enter()
        return self

    def __exit__(self, *exc_info):
        self.leave()
        return False

    def acquire_now(self) -> bool:
        """Enter without waiting; False if another thread holds the lock."""
        if not self.lock.acquire(False):
            return False
        self._entered()
        return True

    def release(self) -> None:
        """Leave after acquire_now()."""
        self.leave()


cdef class ViewContext:
    """What DiscardableCache.view(key) returns: `with` it for a read-only memoryview of the
    entry, pinned while that view (or anything made on its buffer) lives."""

    cdef CacheCore cache
    cdef object key
    cdef object mv

    def __cinit__(self, CacheCore cache, key):
        self.cache = cache
        self.key = key

    def __enter__(self):
        cdef CacheCore cache = self.cache
        cdef PyObject *found
        cdef CacheEntry entry
        cdef Slab slab
        cdef Guard guard = <Guard>cache.guard_
        if self.mv is not None:
            raise RuntimeError("this view is already entered: call cache.view(key) again")
        guard.enter()
        try:
            found = PyDict_GetItemWithError(cache.entries_, self.key)
            if found != NULL and not cache.events_:
                entry = <CacheEntry>found
                slab = entry.slab
                if entry.linked and (slab is None or slab.locked):
                    entry.change_pins(1, True, cache)
                    if slab is not None:
                        slab.used = True
                    if entry is not cache.tail:  # a view is a use for the LRU order
                        cache._unlink(entry)
                        cache._append(entry)
                    self.mv = memoryview(EntryView(cache, entry))
        finally:
            guard.leave()
        if self.mv is None:  # missing, purged, to be locked again, or reports pending
            self.mv = cache._view_slow(self.key)
        return self.mv

    def __exit__(self, *exc_info):
        mv, self.mv = self.mv, None
        try:
            mv.release()
        except BufferError:  # exported further (numpy.frombuffer...): pinned until that goes
            pass
        return False


MISSING = object()  # the slow path's answer for a missing or purged entry
MIN_SLOTS = 8  # slots per slab at least: a value wastes under 1/8 of its slot to the class step
CLASS_STEP = 1.1  # a class is at most 10% larger than the one below it
MAX_SLAB_PAGES = 64
MIN_SLOT = 16

cdef Py_ssize_t PAGE_C = 0
cdef Py_ssize_t *CLASS_SIZES = NULL  # slot size of each class, ascending
cdef Py_ssize_t NCLASSES = 0
cdef Py_ssize_t MAX_CLASS_SIZE = 0


def size_classes(Py_ssize_t page):
    """The (slot_size, slab_pages, slots) of every size class for this page size.

    Slots are k * page // n bytes for n >= MIN_SLOTS, so a slab wastes less than n bytes at its
    end; classes are kept at most CLASS_STEP apart, the smallest slab winning a tie."""
    candidates = {}
    cdef Py_ssize_t k = 1, n, size
    while k <= MAX_SLAB_PAGES:
        n = MIN_SLOTS
        while k * page // n >= MIN_SLOT:
            size = k * page // n
            candidates.setdefault(size, (size, k, n))
            n += 1
        k *= 2
    sizes = sorted(candidates)
    kept = [sizes[0]]
    for i, size in enumerate(sizes[1:], 1):
        # keep the largest candidate within CLASS_STEP of the last kept class
        if i + 1 < len(sizes) and sizes[i + 1] <= kept[-1] * CLASS_STEP:
            continue
        kept.append(size)
    return [candidates[size] for size in kept]


SIZE_CLASSES: list = []


def init_classes(Py_ssize_t page) -> None:
    """Build the class table for the page size (called once at import by discache.cache)."""
    global PAGE_C, CLASS_SIZES, NCLASSES, MAX_CLASS_SIZE, SIZE_CLASSES
    classes = size_classes(page)
    sizes = <Py_ssize_t *>malloc(len(classes) * sizeof(Py_ssize_t))
    if sizes == NULL:
        raise MemoryError()
    for i, (size, _, _) in enumerate(classes):
        sizes[i] = size
    free(CLASS_SIZES)
    CLASS_SIZES, NCLASSES, SIZE_CLASSES = sizes, len(classes), classes
    PAGE_C = page
    MAX_CLASS_SIZE = sizes[NCLASSES - 1]


cpdef Py_ssize_t class_for(Py_ssize_t size):
    """The smallest class whose slot holds size bytes; -1: larger than every class (a slab of
    its own)."""
    cdef Py_ssize_t lo = 0, hi = NCLASSES, mid
    if size > MAX_CLASS_SIZE:
        return -1
    while lo < hi:
        mid = (lo + hi) >> 1
        if CLASS_SIZES[mid] < size:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef class Slab:
    """A span of discardable memory cut into equal slots; locked and unlocked as one."""

    def __cinit__(self, mem, Py_ssize_t size_class, Py_ssize_t slot_size, Py_ssize_t nslots):
        self.mem = mem
        self.size_class = size_class
        self.slot_size = slot_size
        self.nslots = nslots
        self.locked = True
        self.used = True
        self.free_slots = list(range(nslots - 1, -1, -1))  # pop() hands out slot 0 first
        self.entries = [None] * nslots
        self._rebind(mem.address)

    cdef void _rebind(self, object address):
        self.base = NULL if address is None else <char *><size_t>address

    def forget_memory(self) -> None:
        """Drop the raw address (the memory is being closed)."""
        self.base = NULL

    @property
    def nbytes(self) -> int:
        """Bytes of discardable memory the slab holds."""
        return self.mem.nbytes


cdef class CacheEntry:
    """One cached value: where its bytes are, its sizes, pins and place in the LRU list."""

    def change_pins(self, int delta, bint view=False, CacheCore cache=None) -> int:
        """Add delta pins (views if view) to the entry and its slab, atomically under the GIL
        (a view's last buffer may go in any thread, without the cache's lock), and keep the
        cache's pinned weight; returns the slab's pins left, -1 without a slab."""
        cdef bint was_pinned = self.pins > 0
        self.pins += delta
        if view:
            self.views += delta
        if cache is not None and self.linked and was_pinned != (self.pins > 0):
            cache.pinned_weight_ += self.weight if self.pins > 0 else -self.weight
        if self.slab is None:
            return -1
        self.slab.pins += delta
        return self.slab.pins

    @property
    def offset(self) -> int:
        """Byte offset of the value in its slab's memory."""
        return self.slot * self.slab.slot_size if self.slab is not None else 0


cdef class EntryView:
    """The read-only buffer of one entry handed out by DiscardableCache.view(): the entry stays
    pinned while this object lives (a memoryview of it, a slice, a numpy array made on it)."""

    cdef CacheEntry entry
    cdef object owner
    cdef object copy
    cdef char *ptr

    def __cinit__(self, owner, CacheEntry entry):
        cdef Slab slab = entry.slab
        self.entry = entry
        self.owner = owner
        if slab is None or slab.base == NULL:
            self.copy = b"" if slab is None else slab.mem.read(entry.slot * slab.slot_size,
                                                               entry.size)
            self.ptr = PyBytes_AS_STRING(self.copy)
        else:
            self.ptr = slab.base + entry.slot * slab.slot_size

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("a cache entry's view is read-only")
        PyBuffer_FillInfo(buffer, self, self.ptr, self.entry.size, 1, flags)

    def __dealloc__(self):
        cdef Slab slab
        if self.owner is None or self.entry is None:
            return
        slab = self.entry.slab
        if self.entry.change_pins(-1, True, self.owner) == 0 and not _settled(self.owner, slab):
            self.owner._last_pin_gone(slab)


cdef bint _settled(object owner, Slab slab) except -1:
    """True if _last_pin_gone would find nothing to do for a slab whose last pin went: kept,
    locked, an idle tick pending; a view's way out without the cache's lock.  Looked at only
    while no thread holds the cache's guard (a thread that does may be dropping the slab or
    ticking past it); the guard's depth changes under the GIL next to the lock itself."""
    cdef object guard = (<CacheCore>owner).guard_
    if slab.pins or slab.doomed or not slab.locked or guard is None or (<Guard>guard).depth:
        return False
    return getattr(owner, "_scheduled", False) is True


cdef class CacheCore:
    """Base of DiscardableCache: the entries, their LRU list, the hit path and the set path."""

    def __cinit__(self, *args, **kwargs):
        self.entries_ = {}
        self.partial_ = []
        self.events_ = []
        self.default_size = True

    def __setitem__(self, key, value):
        try:
            self._store(key, value)
        finally:
            if self.events_:
                self._flush()

    # ------------------------------------------------------------------ the LRU list

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
        entry.linked = False

    cdef void _append(self, CacheEntry entry) noexcept:
        entry.prev = self.tail
        entry.next = None
        if self.tail is None:
            self.head = entry
        else:
            self.tail.next = entry
        self.tail = entry
        entry.linked = True

    def _touch(self, CacheEntry entry) -> None:
        """Make a linked entry the most recently used."""
        if entry.linked and entry is not self.tail:
            self._unlink(entry)
            self._append(entry)

    def _lru(self) -> list:
        """Entries, least recently used first."""
        out = []
        cdef CacheEntry e = self.head
        while e is not None:
            out.append(e)
            e = e.next
        return out

    def _oldest_unpinned(self, CacheEntry skip=None):
        """The least recently used entry that is not pinned (nor skip), or None."""
        cdef CacheEntry e = self.head
        while e is not None and (e.pins or e is skip):
            e = e.next
        return e

    cdef int _dict_remove(self, CacheEntry entry) except -1:
        """Take entry out of the dict.  A key whose __hash__ or __eq__ raises leaves everything
        as it was and the exception goes up; a key changed since it was stored (it no longer
        finds itself) is removed by identity."""
        cdef PyObject *found = PyDict_GetItemWithError(self.entries_, entry.key)
        if found == <PyObject *>entry:
            del self.entries_[entry.key]
            return 0
        if any(e is entry for e in self.entries_.values()):
            self._remove_by_identity(entry)
        return 0

    cdef int _remove_by_identity(self, CacheEntry entry) except -1:
        """Rebuild the dict without entry, never hashing or comparing its key."""
        kept = [(k, e) for k, e in self.entries_.items() if e is not entry]
        self.entries_.clear()
        for k, e in kept:
            self.entries_[k] = e
        return 0

    def _forget(self, CacheEntry entry, bint force=False) -> None:
        """Take an entry out of the dict and the LRU list, keeping its slot (lock held).  A key
        raising in the dict raises here with nothing changed, unless force (a purged entry must
        go): then the dict is rebuilt without it."""
        try:
            self._dict_remove(entry)
        except Exception:
            if not force:
                raise
            self._remove_by_identity(entry)
        if entry.linked:
            self._unlink(entry)
        self.currsize_ -= entry.weight

    def _detach(self, CacheEntry entry, bint force=False) -> None:
        """Take an entry out of the dict and the LRU list, and free its slot (lock held)."""
        self._forget(entry, force)
        self._release_slot(entry)

    # ------------------------------------------------------------------ reads

    def get(self, key, default=None):
        """The value's bytes, or default when the key is missing or its entry was purged."""
        cdef PyObject *found = PyDict_GetItemWithError(self.entries_, key)
        cdef CacheEntry entry
        cdef Slab slab
        if found == NULL:
            self.misses_ += 1
            return default
        entry = <CacheEntry>found
        slab = entry.slab
        if slab is None:
            if entry.linked:
                self._hit(entry)
                return b""
        elif slab.locked and slab.base != NULL and entry.linked:
            slab.used = True
            self._hit(entry)
            return PyBytes_FromStringAndSize(slab.base + entry.slot * slab.slot_size, entry.size)
        value = self._get_slow(key)
        return default if value is MISSING else value

    def __getitem__(self, key):
        cdef PyObject *found = PyDict_GetItemWithError(self.entries_, key)
        cdef CacheEntry entry
        cdef Slab slab
        if found != NULL:
            entry = <CacheEntry>found
            slab = entry.slab
            if slab is not None and slab.locked and slab.base != NULL and entry.linked:
                slab.used = True
                self._hit(entry)
                return PyBytes_FromStringAndSize(slab.base + entry.slot * slab.slot_size,
                                                 entry.size)
            value = self._get_slow(key)
            if value is not MISSING:
                return value
        else:
            self.misses_ += 1
        return self.__missing__(key)

    cdef inline void _hit(self, CacheEntry entry) noexcept:
        if entry is not self.tail:
            self._unlink(entry)
            self._append(entry)
        self.hits_ += 1

    def _read(self, CacheEntry entry) -> bytes:
        """Copy an entry's bytes out (its slab locked, the lock held)."""
        cdef Slab slab = entry.slab
        if slab is None:
            return b""
        if slab.base != NULL:
            return PyBytes_FromStringAndSize(slab.base + entry.slot * slab.slot_size, entry.size)
        return slab.mem.read(entry.slot * slab.slot_size, entry.size)

    # ------------------------------------------------------------------ writes

    def _store(self, key, value):
        """Store value's bytes under key (evictions for size go to events_ when reported)."""
        cdef Py_buffer view
        cdef Py_ssize_t weight
        given = value
        try:
            PyObject_GetBuffer(value, &view, PyBUF_SIMPLE)
        except (BufferError, ValueError):  # not contiguous (a strided array): one copy
            try:
                value = memoryview(value).tobytes()
            except TypeError:
                raise TypeError(f"a cache value must be bytes-like (bytes, bytearray, "
                                f"memoryview, array...), got {type(value).__name__}") from None
            PyObject_GetBuffer(value, &view, PyBUF_SIMPLE)
        except TypeError:
            raise TypeError(f"a cache value must be bytes-like (bytes, bytearray, memoryview, "
                            f"array...), got {type(value).__name__}") from None
        try:
            weight = view.len if self.default_size else self._weigh(given)
            if weight > self.maxsize_:
                raise ValueError(f"value too large: {weight} for a cache of maxsize "
                                 f"{self.maxsize_}")
            with self.guard_:
                self._put(key, <const char *>view.buf, view.len, weight)
        finally:
            PyBuffer_Release(&view)

    cdef _put(self, key, const char *data, Py_ssize_t size, Py_ssize_t weight):
        cdef PyObject *found = PyDict_GetItemWithError(self.entries_, key)
        cdef CacheEntry old = <CacheEntry>found if found != NULL else None
        cdef CacheEntry entry
        cdef Slab slab
        if old is not None and old.pins:
            raise PinnedError(f"{key!r} is pinned: unpin it (or end its view) before replacing it")
        if self.pinned_weight_ + weight > self.maxsize_:
            raise ValueError(f"value too large for the room pinned entries leave: {weight} with "
                             f"{self.pinned_weight_} pinned, for a cache of maxsize "
                             f"{self.maxsize_}")
        if self.purged_keys_:
            self.purged_keys_.pop(key, None)
        if old is not None and old.linked and size and self._fits(old, size):
            self._write(old.slab, old.slot, data, size)
            self.currsize_ += weight - old.weight
            old.size = size
            old.weight = weight
            old.checksum = None
            old.slab.used = True
            if old is not self.tail:
                self._unlink(old)
                self._append(old)
            return self._evict_over(old)
        entry = CacheEntry.__new__(CacheEntry)
        entry.key = key
        entry.size = size
        entry.weight = weight
        if size:
            slab = self._claim(size, entry)
        try:
            if size:
                self._write(slab, entry.slot, data, size)
            # Claiming may have locked a purged slab and dropped its entries: look again.
            found = PyDict_GetItemWithError(self.entries_, key)
            old = <CacheEntry>found if found != NULL else None
            # In the dict before the LRU list: a hit finds it unlinked and takes the slow path.
            self.entries_[key] = entry
        except BaseException:  # a key raising in the dict, a write failing: as before
            if size:
                self._release_slot(entry)
            raise
        if old is not None and old.linked:
            self._unlink(old)
        self._append(entry)
        self.currsize_ += weight
        if old is not None:
            self.currsize_ -= old.weight
            self._release_slot(old)
        return self._evict_over(entry)

    cdef bint _fits(self, CacheEntry old, Py_ssize_t size):
        """The new bytes can overwrite the old in place: same slot size, slab locked."""
        cdef Slab slab = old.slab
        cdef Py_ssize_t cls
        if slab is None or not slab.locked or slab.doomed:
            return False
        cls = class_for(size)
        if cls >= 0:
            return cls == slab.size_class
        return slab.size_class < 0 and (size + PAGE_C - 1) // PAGE_C * PAGE_C == slab.slot_size

    cdef Slab _claim(self, Py_ssize_t size, CacheEntry entry):
        cdef Py_ssize_t cls = class_for(size)
        cdef Slab slab = None, candidate
        cdef list candidates
        if cls < 0:
            slab = self._new_slab(-1, size)
        else:
            candidates = <list>self.partial_[cls]
            while candidates:
                candidate = <Slab>candidates[-1]
                if not candidate.locked:
                    self._lock_slab(candidate)  # a purge empties it: still a fine slab
                if candidate.free_slots and not candidate.doomed and candidate.listed:
                    slab = candidate
                    break
                if candidates and candidates[-1] is candidate:
                    candidates.pop()
                    candidate.listed = False
            if slab is None:
                slab = self._new_slab(cls, size)
                if len(slab.free_slots) > 1:
                    candidates.append(slab)
                    slab.listed = True
        entry.slot = slab.free_slots.pop()
        if not slab.free_slots and slab.listed:
            candidates = <list>self.partial_[cls]
            if candidates[-1] is slab:
                candidates.pop()
            else:
                candidates.remove(slab)
            slab.listed = False
        entry.slab = slab
        slab.entries[entry.slot] = entry
        slab.live += 1
        slab.used = True
        return slab

    cdef int _write(self, Slab slab, Py_ssize_t slot, const char *data, Py_ssize_t size) except -1:
        if slab.base != NULL:
            memcpy(slab.base + slot * slab.slot_size, data, size)
        else:
            slab.mem.write(PyBytes_FromStringAndSize(data, size), slot * slab.slot_size)
        return 0

    cdef void _release_slot(self, CacheEntry entry) except *:
        cdef Slab slab = entry.slab
        if slab is None:
            return
        slab.entries[entry.slot] = None
        slab.free_slots.append(entry.slot)
        slab.live -= 1
        if slab.live == 0:
            self._slab_emptied(slab)
        elif not slab.listed and slab.size_class >= 0 and not slab.doomed:
            (<list>self.partial_[slab.size_class]).append(slab)
            slab.listed = True

    cdef int _evict_over(self, CacheEntry keep) except -1:
        """Evict least recently used unpinned entries (never keep) until under maxsize; each
        eviction goes to events_ when there is an on_evict to tell."""
        cdef CacheEntry victim
        while self.currsize_ > self.maxsize_:
            victim = self.head
            while victim is not None and (victim.pins or victim is keep):
                victim = victim.next
            if victim is None:
                break
            self._dict_remove(victim)  # a key raising there stops here, the cache consistent
            self._unlink(victim)
            self.currsize_ -= victim.weight
            self._release_slot(victim)
            self.evicted_for_size_ += 1
            if self.on_evict_ is not None:
                self.events_.append((victim.key, "size"))
        return 0
