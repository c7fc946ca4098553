"""cachetools' own test suite, ported to run against discache.DiscardableCache and discache.cached.

Sources (tkem/cachetools, read through the project's code search; the newest stored versions that
could be read, matching cachetools 8.0.2, the version installed here):
  - tests/__init__.py   CacheTestMixin       (stored commit e82657b8)
  - tests/test_lru.py   LRUCacheTest         (stored commit 083ee5ff)
  - tests/test_cached.py DecoratorTestMixin, CacheWrapperTest, DictTest, CustomCacheTest,
                         InvalidCacheTest    (the v8 version: cached(None) raises TypeError)
Every case is run on each backend ("madvfree", "memfd", "simulated"); each cache gets its own
DiscardableMemoryManager(64 << 20, backend) as manager=.  Test names are cachetools' names; the
unittest assertions are written as plain asserts (assertEqual(a, b) -> assert a == b, assertIn ->
in, assertRaises -> pytest.raises), which changes nothing they check.

Cases ported (44 per backend; A = adapted, see the comment at each adaptation)
  CacheTestMixin (class TestCacheMixin), 13:
    test_defaults A, test_insert A, test_update A, test_delete A, test_pop A, test_popitem A,
    test_popitem_exception_context, test_missing A, test_missing_getsizeof A,
    test_getsizeof_param A, test_getsizeof_subclass A, test_pickle A, test_pickle_maxsize A
  test_lru.py (class TestLRU), 4:
    test_lru A, test_lru_getsizeof A, test_lru_update_existing A, test_lru_clear A
  test_cached.py DecoratorTestMixin + CacheWrapperTest (class TestCached), 23:
    test_decorator A, test_decorator_typed A, test_decorator_lock A, test_decorator_cond A,
    test_decorator_lock_cond A, test_decorator_cond_error A, test_decorator_wrapped A,
    test_decorator_attributes A, test_decorator_attributes_lock A, test_decorator_attributes_cond A,
    test_decorator_clear A, test_decorator_clear_lock A, test_decorator_clear_cond A,
    test_decorator_info A, test_decorator_lock_info A, test_decorator_cond_info A,
    test_decorator_lock_cond_info A, test_zero_size_cache_decorator A,
    test_zero_size_cache_decorator_lock A, test_zero_size_cache_decorator_cond A,
    test_zero_size_cache_decorator_info A, test_zero_size_cache_decorator_lock_info A,
    test_zero_size_cache_decorator_cond_info A
  test_cached.py DictTest / CustomCacheTest / InvalidCacheTest, 4:
    DictTest.test_decorator_info A (as test_dict_decorator_info),
    CustomCacheTest.test_decorator_info A (as test_custom_cache_decorator_info),
    InvalidCacheTest.test_decorator, InvalidCacheTest.test_decorator_info
    (as test_invalid_cache_decorator, test_invalid_cache_decorator_info)
  Added, 1: TestCached.test_decorator_cond_waits_for_the_caller_computing_the_key (see 6).
  Not rerun: cachetools runs DecoratorTestMixin's 13 cases a second and third time over a plain
  dict (DictTest) and a duck-typed mapping (CustomCacheTest).  discache.cached memoizes into a
  DiscardableCache, so those runs would repeat TestCached's 13 cases exactly; their one
  class-specific case each (test_decorator_info) is ported, adapted, as listed above.

Adaptations (what a bytes cache forces; each is commented where it is made)
  1. Values are bytes.  cachetools' integer value n becomes one(n) = one byte holding n where every
     value weighs 1 (cachetools' default getsizeof), and sized(n) = n bytes where the test uses
     getsizeof=lambda x: x; string values "a", "b", "updated" become one byte each.  (one(n)
     wraps at 256: test_pickle_maxsize's 2000 values repeat, which nothing there depends on.)
  2. Sizes are bytes.  getsizeof=lambda x: x over int values becomes getsizeof=len over sized()
     values (same sizes); maxsize keeps cachetools' number, now in bytes, so the same number of
     entries fit.  test_defaults asks the default getsizeof about bytes values (it weighs bytes,
     not 1 per value) and expects a TypeError for None, which has no size in bytes.
  3. None cannot be a value: setdefault(3) (default None) must raise TypeError and change
     nothing; the stored-None step of test_missing uses NONE, a one-byte stand-in.
  4. A getsizeof override equal to the default (len) would pass unseen, so the getsizeof param
     and subclass tests count the override's calls and check the cache sized the values with it.
  5. discache does not depend on cachetools: its default key function is checked to make the
     same keys as cachetools.keys.hashkey instead of being that very object.
  6. Condition waits: cachetools 8.0.2's cached() waits only while another caller computes the
     same key (`while key in pending: cond.wait()`); the stored v8.0 test counted one wait_for per
     call.  CountedCondition counts real waits (wait(), or wait_for with a false predicate), so the
     expected wait_count is 0 in these single-threaded tests (what cachetools 8.0.2 gives); one
     added two-thread case checks that a caller does wait while another computes its key.
  7. The decorated functions return one(count) instead of count.
  8. DictTest / CustomCacheTest have no dict or duck-typed cache to wrap (see above): their
     test_decorator_info checks the nearest thing, cache_info over a large cache of 3-byte values
     (currsize counts bytes) and over a DiscardableCache subclass with its own getsizeof.

The second part (TestMisuse) checks the mapping behaviours of issue 10's "Misuse found while
trying to break it" list: equal keys are one entry (str subclass, numpy.str_), a numpy array of
shape (1, 8 MiB) weighs its nbytes, a getsizeof returning a float or a negative number raises and
leaks nothing, and copy/deepcopy/pickle give independent caches with the same settings and the
live entries in LRU order.

Checked when porting: with DiscardableCache and cached swapped for cachetools 8.0.2's LRUCache
(weighing values by nbytes, storing them as bytes) and cachetools.cached, every ported and added
case of TestCacheMixin, TestLRU and TestCached passes, so a failure here is a behaviour of
discache that differs from cachetools', not an artefact of the port.
"""
import copy
import pickle
import sys

import cachetools.keys
import numpy
import pytest

from discache import DiscardableCache, DiscardableMemoryManager, cached

BACKENDS = ("madvfree", "memfd", "simulated")
MANAGER_BYTES = 64 << 20


def one(n):
    """cachetools' value n in a test where every value weighs 1: one byte holding n."""
    return bytes([n % 256])


def sized(n):
    """cachetools' value n in a test with getsizeof=lambda x: x: n bytes, so len(value) == n."""
    return bytes([n % 256]) * n


NONE = b"\xff"  # stands for the value None, which a bytes cache cannot hold (adaptation 3)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def manager(backend):
    return DiscardableMemoryManager(MANAGER_BYTES, backend)


@pytest.fixture
def Cache(manager):
    """cachetools' `self.Cache`: Cache(maxsize, ..., cls=a subclass) on this test's manager."""
    made = []

    def make(maxsize, cls=DiscardableCache, **kwargs):
        cache = cls(maxsize, manager=manager, **kwargs)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


# ---------------------------------------------------------------- tests/__init__.py: CacheTestMixin


class TestCacheMixin:
    def test_defaults(self, Cache):
        cache = Cache(maxsize=1)
        assert 0 == len(cache)
        assert 1 == cache.maxsize
        assert 0 == cache.currsize
        # ADAPTED (2): cachetools' default getsizeof weighs any value 1 (None, "", 0); a bytes
        # cache's default weighs a value's bytes: one byte weighs 1, an empty value 0, and None
        # (no buffer) has no size at all.
        assert 1 == cache.getsizeof(b"x")
        assert 0 == cache.getsizeof(b"")
        assert 1 == cache.getsizeof(one(0))
        with pytest.raises(TypeError):
            cache.getsizeof(None)
        assert repr(cache).startswith(cache.__class__.__name__)

    def test_insert(self, Cache):
        cache = Cache(maxsize=2)

        # ADAPTED (1): values 1..4 -> one(1)..one(4), one byte each, so maxsize=2 holds two.
        cache.update({1: one(1), 2: one(2)})
        assert 2 == len(cache)
        assert one(1) == cache[1]
        assert one(2) == cache[2]

        cache[3] = one(3)
        assert 2 == len(cache)
        assert one(3) == cache[3]
        assert 1 in cache or 2 in cache

        cache[4] = one(4)
        assert 2 == len(cache)
        assert one(4) == cache[4]
        assert 1 in cache or 2 in cache or 3 in cache

    def test_update(self, Cache):
        cache = Cache(maxsize=2)

        # ADAPTED (1): values 1, 2 -> one(1), one(2); "a", "b" -> b"a", b"b" (one byte each).
        cache.update({1: one(1), 2: one(2)})
        assert 2 == len(cache)
        assert one(1) == cache[1]
        assert one(2) == cache[2]

        cache.update({1: one(1), 2: one(2)})
        assert 2 == len(cache)
        assert one(1) == cache[1]
        assert one(2) == cache[2]

        cache.update({1: b"a", 2: b"b"})
        assert 2 == len(cache)
        assert b"a" == cache[1]
        assert b"b" == cache[2]

    def test_delete(self, Cache):
        cache = Cache(maxsize=2)

        # ADAPTED (1): values 1, 2 -> one(1), one(2).
        cache.update({1: one(1), 2: one(2)})
        assert 2 == len(cache)
        assert one(1) == cache[1]
        assert one(2) == cache[2]

        del cache[2]
        assert 1 == len(cache)
        assert one(1) == cache[1]
        assert 2 not in cache

        del cache[1]
        assert 0 == len(cache)
        assert 1 not in cache
        assert 2 not in cache

        with pytest.raises(KeyError):
            del cache[1]
        assert 0 == len(cache)
        assert 1 not in cache
        assert 2 not in cache

    def test_pop(self, Cache):
        cache = Cache(maxsize=2)

        # ADAPTED (1): values 1, 2 -> one(1), one(2).
        cache.update({1: one(1), 2: one(2)})
        assert one(2) == cache.pop(2)
        assert 1 == len(cache)
        assert one(1) == cache.pop(1)
        assert 0 == len(cache)

        with pytest.raises(KeyError):
            cache.pop(2)
        with pytest.raises(KeyError):
            cache.pop(1)
        with pytest.raises(KeyError):
            cache.pop(0)

        assert None is cache.pop(2, None)
        assert None is cache.pop(1, None)
        assert None is cache.pop(0, None)

    def test_popitem(self, Cache):
        cache = Cache(maxsize=2)

        # ADAPTED (1): values 1, 2 -> one(1), one(2); cachetools checks the popped value is among
        # the dict {1: 1, 2: 2}'s keys, here the same dict of bytes values.
        stored = {one(1): one(1), one(2): one(2)}
        cache.update({1: one(1), 2: one(2)})
        assert cache.pop(1) in stored
        assert 1 == len(cache)
        assert cache.pop(2) in stored
        assert 0 == len(cache)

        with pytest.raises(KeyError):
            cache.popitem()

    def test_popitem_exception_context(self, Cache):
        # since Python 3.7, MutableMapping.popitem() suppresses
        # exception context as implementation detail
        exception = None
        try:
            Cache(maxsize=2).popitem()
        except Exception as e:
            exception = e
        assert exception.__cause__ is None
        assert exception.__suppress_context__

    def test_missing(self, Cache):
        class DefaultCache(DiscardableCache):
            def __missing__(self, key):
                # ADAPTED (1): stores one(key) for the key, not the int key itself.
                self[key] = one(key)
                return one(key)

        cache = Cache(maxsize=2, cls=DefaultCache)

        # ADAPTED (1): every value n below is one(n), one byte, so maxsize=2 holds two.
        assert 0 == cache.currsize
        assert 2 == cache.maxsize
        assert 0 == len(cache)
        assert one(1) == cache[1]
        assert one(2) == cache[2]
        assert 2 == len(cache)
        assert 1 in cache and 2 in cache

        assert one(3) == cache[3]
        assert 2 == len(cache)
        assert 3 in cache
        assert 1 in cache or 2 in cache
        assert 1 not in cache or 2 not in cache

        assert one(4) == cache[4]
        assert 2 == len(cache)
        assert 4 in cache
        assert 1 in cache or 2 in cache or 3 in cache

        # verify __missing__() is *not* called for any operations
        # besides __getitem__()

        assert one(4) == cache.get(4)
        assert None is cache.get(5)
        assert 5 * 5 == cache.get(5, 5 * 5)
        assert 2 == len(cache)

        assert one(4) == cache.pop(4)
        with pytest.raises(KeyError):
            cache.pop(5)
        assert None is cache.pop(5, None)
        assert 5 * 5 == cache.pop(5, 5 * 5)
        assert 1 == len(cache)

        cache.clear()
        cache[1] = one(1 + 1)
        assert one(1 + 1) == cache.setdefault(1)
        assert one(1 + 1) == cache.setdefault(1, 1)
        assert one(1 + 1) == cache[1]
        assert one(2 + 2) == cache.setdefault(2, one(2 + 2))
        assert one(2 + 2) == cache.setdefault(2, None)
        assert one(2 + 2) == cache.setdefault(2)
        assert one(2 + 2) == cache[2]
        assert 2 == len(cache)
        assert 1 in cache and 2 in cache
        # ADAPTED (3): cachetools stores None here (setdefault(3) == None, one of 1 and 2
        # evicted).  A bytes cache cannot hold None: setdefault(3) must raise TypeError without
        # calling __missing__ or changing anything; then NONE, a one-byte value, takes None's
        # place for the rest of cachetools' checks.
        with pytest.raises(TypeError):
            cache.setdefault(3)
        assert 2 == len(cache)
        assert 3 not in cache
        assert 1 in cache and 2 in cache
        assert NONE == cache.setdefault(3, NONE)
        assert 2 == len(cache)
        assert 3 in cache
        assert 1 in cache or 2 in cache
        assert 1 not in cache or 2 not in cache

    def test_missing_getsizeof(self, Cache):
        class DefaultCache(DiscardableCache):
            def __missing__(self, key):
                try:
                    # ADAPTED (1, 2): stores sized(key), key bytes, for the int key itself.
                    self[key] = sized(key)
                except ValueError:
                    pass  # not stored
                return sized(key)

        # ADAPTED (2): getsizeof=lambda x: x -> len over sized() values.
        cache = Cache(maxsize=2, cls=DefaultCache, getsizeof=len)

        assert 0 == cache.currsize
        assert 2 == cache.maxsize

        # ADAPTED (1): value n -> sized(n) throughout.
        assert sized(1) == cache[1]
        assert 1 == len(cache)
        assert 1 == cache.currsize
        assert 1 in cache

        assert sized(2) == cache[2]
        assert 1 == len(cache)
        assert 2 == cache.currsize
        assert 1 not in cache
        assert 2 in cache

        assert sized(3) == cache[3]  # not stored
        assert 1 == len(cache)
        assert 2 == cache.currsize
        assert sized(1) == cache[1]
        assert 1 == len(cache)
        assert 1 == cache.currsize
        assert (1, sized(1)) == cache.popitem()

    @staticmethod
    def _test_getsizeof(cache, sizes_seen):
        assert 0 == cache.currsize
        assert 3 == cache.maxsize
        # ADAPTED (1, 2): value n -> sized(n) throughout; getsizeof gives its length.
        assert 1 == cache.getsizeof(sized(1))
        assert 2 == cache.getsizeof(sized(2))
        assert 3 == cache.getsizeof(sized(3))

        # ADAPTED (4): the override must be what sizes stored values, not the built-in default.
        sizes_seen.clear()
        cache.update({1: sized(1), 2: sized(2)})
        assert {1, 2} == set(sizes_seen)
        assert 2 == len(cache)
        assert 3 == cache.currsize
        assert sized(1) == cache[1]
        assert sized(2) == cache[2]

        cache[1] = sized(2)
        assert 1 == len(cache)
        assert 2 == cache.currsize
        assert sized(2) == cache[1]
        assert 2 not in cache

        cache.update({1: sized(1), 2: sized(2)})
        assert 2 == len(cache)
        assert 3 == cache.currsize
        assert sized(1) == cache[1]
        assert sized(2) == cache[2]

        cache[3] = sized(3)
        assert 1 == len(cache)
        assert 3 == cache.currsize
        assert sized(3) == cache[3]
        assert 1 not in cache
        assert 2 not in cache

        with pytest.raises(ValueError):
            cache[3] = sized(4)
        assert 1 == len(cache)
        assert 3 == cache.currsize
        assert sized(3) == cache[3]

        with pytest.raises(ValueError):
            cache[4] = sized(4)
        assert 1 == len(cache)
        assert 3 == cache.currsize
        assert sized(3) == cache[3]

    def test_getsizeof_param(self, Cache):
        # ADAPTED (2, 4): getsizeof=lambda x: x -> len over sized() values, counting its calls.
        sizes_seen = []

        def counting_len(value):
            sizes_seen.append(len(value))
            return len(value)

        self._test_getsizeof(Cache(maxsize=3, getsizeof=counting_len), sizes_seen)

    def test_getsizeof_subclass(self, Cache):
        sizes_seen = []

        class SizedCache(DiscardableCache):
            def getsizeof(self, value):
                # ADAPTED (2, 4): `return value` -> len(value) of sized() values, counted.
                sizes_seen.append(len(value))
                return len(value)

        self._test_getsizeof(Cache(maxsize=3, cls=SizedCache), sizes_seen)

    def test_pickle(self, Cache):
        source = Cache(maxsize=2)
        # ADAPTED (1): values 1..4 -> one(1)..one(4).
        source.update({1: one(1), 2: one(2)})

        cache = pickle.loads(pickle.dumps(source))
        assert source == cache

        assert 2 == len(cache)
        assert one(1) == cache[1]
        assert one(2) == cache[2]

        cache[3] = one(3)
        assert 2 == len(cache)
        assert one(3) == cache[3]
        assert 1 in cache or 2 in cache

        cache[4] = one(4)
        assert 2 == len(cache)
        assert one(4) == cache[4]
        assert 1 in cache or 2 in cache or 3 in cache

        assert cache == pickle.loads(pickle.dumps(cache))

    def test_pickle_maxsize(self, Cache):
        # test empty cache, single element, large cache (recursion limit)
        for n in [0, 1, sys.getrecursionlimit() * 2]:
            source = Cache(maxsize=n)
            # ADAPTED (1): value i -> one(i), one byte, so maxsize=n (bytes) holds n entries.
            source.update((i, one(i)) for i in range(n))
            cache = pickle.loads(pickle.dumps(source))
            assert n == len(cache)
            assert source == cache


# ---------------------------------------------------------------- tests/test_lru.py


class TestLRU:
    def test_lru(self, Cache):
        cache = Cache(maxsize=2)

        # ADAPTED (1): values 1..5 -> one(1)..one(5), one byte each, so maxsize=2 holds two.
        cache[1] = one(1)
        cache[2] = one(2)
        cache[3] = one(3)

        assert len(cache) == 2
        assert cache[2] == one(2)
        assert cache[3] == one(3)
        assert 1 not in cache

        cache[2]
        cache[4] = one(4)
        assert len(cache) == 2
        assert cache[2] == one(2)
        assert cache[4] == one(4)
        assert 3 not in cache

        cache[5] = one(5)
        assert len(cache) == 2
        assert cache[4] == one(4)
        assert cache[5] == one(5)
        assert 2 not in cache

    def test_lru_getsizeof(self, Cache):
        # ADAPTED (2): getsizeof=lambda x: x -> len; value n -> sized(n), n bytes.
        cache = Cache(maxsize=3, getsizeof=len)

        cache[1] = sized(1)
        cache[2] = sized(2)

        assert len(cache) == 2
        assert cache[1] == sized(1)
        assert cache[2] == sized(2)

        cache[3] = sized(3)

        assert len(cache) == 1
        assert cache[3] == sized(3)
        assert 1 not in cache
        assert 2 not in cache

        with pytest.raises(ValueError):
            cache[4] = sized(4)
        assert len(cache) == 1
        assert cache[3] == sized(3)

    def test_lru_update_existing(self, Cache):
        cache = Cache(maxsize=2)

        # ADAPTED (1): values 1..3 -> one(1)..one(3); "updated" -> b"u", one byte like every
        # other value here (b"updated" would weigh 7 and not fit maxsize=2).
        cache[1] = one(1)
        cache[2] = one(2)
        cache[1] = b"u"
        cache[3] = one(3)

        assert cache[1] == b"u"
        assert 3 in cache
        assert 2 not in cache

    def test_lru_clear(self, Cache):
        cache = Cache(maxsize=2)

        # ADAPTED (1): values 1..5 -> one(1)..one(5).
        cache[1] = one(1)
        cache[2] = one(2)
        cache.clear()

        assert 0 == len(cache)
        assert 0 == cache.currsize

        # verify LRU order is reset after clear
        cache[3] = one(3)
        cache[4] = one(4)
        cache[3]  # access 3 to make it most recently used
        cache[5] = one(5)  # should evict 4 (least recently used)

        assert 2 == len(cache)
        assert 3 in cache
        assert 5 in cache
        assert 4 not in cache


# ---------------------------------------------------------------- tests/test_cached.py


class CountedLock:
    def __init__(self):
        self.count = 0

    def __enter__(self):
        self.count += 1

    def __exit__(self, *exc):
        pass


class CountedCondition(CountedLock):
    # ADAPTED (6): counts real waits, a wait() or a wait_for() whose predicate is false (the
    # stored v8.0 test counted every wait_for call; cachetools 8.0.2 calls wait() only while
    # another caller computes the key).
    def __init__(self):
        CountedLock.__init__(self)
        self.wait_count = 0
        self.notify_count = 0

    def wait(self, timeout=None):
        self.wait_count += 1
        return True

    def wait_for(self, predicate, timeout=None):
        result = predicate()
        if not result:
            self.wait_count += 1
        return result

    def notify(self, n=1):
        self.notify_count += 1

    def notify_all(self):
        self.notify_count += 1


def same_keys_as_hashkey(key):
    """True if `key` makes the keys cachetools.keys.hashkey makes (adaptation 5): the same plain
    tuples for positional arguments; with keyword arguments the separator is each library's own
    object (discache does not import cachetools), so there the properties are compared: keys
    independent of keyword order, distinct from positional calls, equal for equal calls."""
    calls = [((0,), {}), ((1,), {}), ((1.0,), {}), ((1, "x"), {})]
    positional = all(key(*a, **kw) == cachetools.keys.hashkey(*a, **kw)
                     and hash(key(*a, **kw)) == hash(cachetools.keys.hashkey(*a, **kw))
                     for a, kw in calls)
    keywords = (key(1, a=2, b=3) == key(1, b=3, a=2)
                and hash(key(1, a=2, b=3)) == hash(key(1, b=3, a=2))
                and key(1, a=2) != key(1, "a", 2) and key(1, a=2) != key(1, a=3)
                and key(b=(3,)) == key(b=(3,)))
    return positional and keywords


class TestCached:
    @pytest.fixture(autouse=True)
    def _cache_factory(self, Cache):
        self._make = Cache

    def cache(self, minsize):
        # cachetools' CacheWrapperTest.cache: Cache(maxsize=minsize); one() values weigh 1 byte.
        return self._make(maxsize=minsize)

    def func(self, *args, **kwargs):
        if hasattr(self, "count"):
            self.count += 1
        else:
            self.count = 0
        # ADAPTED (7): returns one(count), a one-byte value, instead of count.
        return one(self.count)

    def error_func(self, *args, **kwargs):
        raise ValueError("test error")

    def test_decorator(self):
        cache = self.cache(2)
        wrapper = cached(cache)(self.func)

        # ADAPTED (7): results n -> one(n).
        assert len(cache) == 0
        assert wrapper(0) == one(0)
        assert len(cache) == 1
        assert cachetools.keys.hashkey(0) in cache
        assert cachetools.keys.hashkey(1) not in cache
        assert cachetools.keys.hashkey(1.0) not in cache

        assert wrapper(1) == one(1)
        assert len(cache) == 2
        assert cachetools.keys.hashkey(0) in cache
        assert cachetools.keys.hashkey(1) in cache
        assert cachetools.keys.hashkey(1.0) in cache

        assert wrapper(1) == one(1)
        assert len(cache) == 2

        assert wrapper(1.0) == one(1)
        assert len(cache) == 2

        assert wrapper(1.0) == one(1)
        assert len(cache) == 2

    def test_decorator_typed(self):
        cache = self.cache(3)
        key = cachetools.keys.typedkey
        wrapper = cached(cache, key=key)(self.func)

        # ADAPTED (7): results n -> one(n).
        assert len(cache) == 0
        assert wrapper(0) == one(0)
        assert len(cache) == 1
        assert cachetools.keys.typedkey(0) in cache
        assert cachetools.keys.typedkey(1) not in cache
        assert cachetools.keys.typedkey(1.0) not in cache

        assert wrapper(1) == one(1)
        assert len(cache) == 2
        assert cachetools.keys.typedkey(0) in cache
        assert cachetools.keys.typedkey(1) in cache
        assert cachetools.keys.typedkey(1.0) not in cache

        assert wrapper(1) == one(1)
        assert len(cache) == 2

        assert wrapper(1.0) == one(2)
        assert len(cache) == 3
        assert cachetools.keys.typedkey(0) in cache
        assert cachetools.keys.typedkey(1) in cache
        assert cachetools.keys.typedkey(1.0) in cache

        assert wrapper(1.0) == one(2)
        assert len(cache) == 3

    def test_decorator_lock(self):
        cache = self.cache(2)
        lock = CountedLock()
        wrapper = cached(cache, lock=lock)(self.func)

        # ADAPTED (7): results n -> one(n).
        assert len(cache) == 0
        assert wrapper(0) == one(0)
        assert lock.count == 2
        assert wrapper(1) == one(1)
        assert lock.count == 4
        assert wrapper(1) == one(1)
        assert lock.count == 5

    def test_decorator_cond(self):
        cache = self.cache(2)
        lock = cond = CountedCondition()
        wrapper = cached(cache, condition=cond)(self.func)

        # ADAPTED (7): results n -> one(n).  ADAPTED (6): wait_count 1, 2, 3 -> 0: nobody else
        # computes the key, so nobody waits.
        assert len(cache) == 0
        assert wrapper(0) == one(0)
        assert lock.count == 3
        assert cond.wait_count == 0
        assert cond.notify_count == 1
        assert wrapper(1) == one(1)
        assert lock.count == 6
        assert cond.wait_count == 0
        assert cond.notify_count == 2
        assert wrapper(1) == one(1)
        assert lock.count == 7
        assert cond.wait_count == 0
        assert cond.notify_count == 2

    def test_decorator_lock_cond(self):
        cache = self.cache(2)
        lock = CountedLock()
        cond = CountedCondition()
        wrapper = cached(cache, lock=lock, condition=cond)(self.func)

        # ADAPTED (7): results n -> one(n).  ADAPTED (6): wait_count 1, 2, 3 -> 0.
        assert len(cache) == 0
        assert wrapper(0) == one(0)
        assert lock.count == 3
        assert cond.wait_count == 0
        assert cond.notify_count == 1
        assert wrapper(1) == one(1)
        assert lock.count == 6
        assert cond.wait_count == 0
        assert cond.notify_count == 2
        assert wrapper(1) == one(1)
        assert lock.count == 7
        assert cond.wait_count == 0
        assert cond.notify_count == 2

    def test_decorator_cond_error(self):
        cache = self.cache(2)
        lock = cond = CountedCondition()
        wrapper = cached(cache, condition=cond)(self.error_func)

        with pytest.raises(ValueError):
            wrapper(0)
        assert len(cache) == 0
        assert lock.count == 2
        # ADAPTED (6): wait_count 1 -> 0.
        assert cond.wait_count == 0
        assert cond.notify_count == 1

        # verify pending set is cleaned up, otherwise this might deadlock
        with pytest.raises(ValueError):
            wrapper(0)
        assert len(cache) == 0
        assert lock.count == 4
        # ADAPTED (6): wait_count 2 -> 0.
        assert cond.wait_count == 0
        assert cond.notify_count == 2

    def test_decorator_cond_waits_for_the_caller_computing_the_key(self):
        # ADDED for adaptation (6): with wait_count 0 in the single-threaded cases, this checks
        # the waiting itself: a second caller of the same key waits on the condition while the
        # first computes it, then returns the first one's value without calling the function.
        import threading

        class RecordingCondition(threading.Condition):
            def __init__(self):
                super().__init__()
                self.waiting = threading.Event()

            def wait(self, timeout=None):
                self.waiting.set()
                return super().wait(timeout)

        cond = RecordingCondition()
        computing, release = threading.Event(), threading.Event()
        calls = []

        def slow(*args):
            calls.append(args)
            computing.set()
            assert release.wait(30)
            return b"slow"

        wrapper = cached(self.cache(8), condition=cond)(slow)
        results = []
        first = threading.Thread(target=lambda: results.append(wrapper(0)), daemon=True)
        second = threading.Thread(target=lambda: results.append(wrapper(0)), daemon=True)
        try:
            first.start()
            assert computing.wait(30)
            second.start()
            assert cond.waiting.wait(30)
        finally:
            release.set()
        first.join(30)
        second.join(30)
        assert results == [b"slow", b"slow"]
        assert calls == [(0,)]

    def test_decorator_wrapped(self):
        cache = self.cache(2)
        wrapper = cached(cache)(self.func)

        assert wrapper.__wrapped__ == self.func

        # ADAPTED (7): results n -> one(n).
        assert len(cache) == 0
        assert wrapper.__wrapped__(0) == one(0)
        assert len(cache) == 0
        assert wrapper(0) == one(1)
        assert len(cache) == 1
        assert wrapper(0) == one(1)
        assert len(cache) == 1

    def test_decorator_attributes(self):
        cache = self.cache(2)
        wrapper = cached(cache)(self.func)

        assert wrapper.cache is cache
        # ADAPTED (5): `wrapper.cache_key is cachetools.keys.hashkey` -> makes the same keys.
        assert same_keys_as_hashkey(wrapper.cache_key)
        assert wrapper.cache_lock is None
        assert wrapper.cache_condition is None
        assert not hasattr(wrapper, "cache_info")

    def test_decorator_attributes_lock(self):
        cache = self.cache(2)
        lock = CountedLock()
        wrapper = cached(cache, lock=lock)(self.func)

        assert wrapper.cache is cache
        # ADAPTED (5): `wrapper.cache_key is cachetools.keys.hashkey` -> makes the same keys.
        assert same_keys_as_hashkey(wrapper.cache_key)
        assert wrapper.cache_lock is lock
        assert wrapper.cache_condition is None
        assert not hasattr(wrapper, "cache_info")

    def test_decorator_attributes_cond(self):
        cache = self.cache(2)
        lock = cond = CountedCondition()
        wrapper = cached(cache, condition=cond)(self.func)

        assert wrapper.cache is cache
        # ADAPTED (5): `wrapper.cache_key is cachetools.keys.hashkey` -> makes the same keys.
        assert same_keys_as_hashkey(wrapper.cache_key)
        assert wrapper.cache_lock is lock
        assert wrapper.cache_condition is cond
        assert not hasattr(wrapper, "cache_info")

    def test_decorator_clear(self):
        cache = self.cache(2)
        wrapper = cached(cache)(self.func)
        # ADAPTED (7): result 0 -> one(0).
        assert wrapper(0) == one(0)
        assert len(cache) == 1
        wrapper.cache_clear()
        assert len(cache) == 0

    def test_decorator_clear_lock(self):
        cache = self.cache(2)
        lock = CountedLock()
        wrapper = cached(cache, lock=lock)(self.func)
        # ADAPTED (7): result 0 -> one(0).
        assert wrapper(0) == one(0)
        assert len(cache) == 1
        assert lock.count == 2
        wrapper.cache_clear()
        assert len(cache) == 0
        assert lock.count == 3

    def test_decorator_clear_cond(self):
        cache = self.cache(2)
        lock = cond = CountedCondition()
        wrapper = cached(cache, condition=cond)(self.func)
        # ADAPTED (7): result 0 -> one(0).
        assert wrapper(0) == one(0)
        assert len(cache) == 1
        assert lock.count == 3
        wrapper.cache_clear()
        assert len(cache) == 0
        assert lock.count == 4

    # ------------------------------------------------ CacheWrapperTest's own cases

    def test_decorator_info(self):
        cache = self.cache(2)
        wrapper = cached(cache, info=True)(self.func)
        # ADAPTED (7): results n -> one(n); currsize counts their bytes, 1 per result as before.
        assert wrapper.cache_info() == (0, 0, 2, 0)
        assert wrapper(0) == one(0)
        assert wrapper.cache_info() == (0, 1, 2, 1)
        assert wrapper(1) == one(1)
        assert wrapper.cache_info() == (0, 2, 2, 2)
        assert wrapper(0) == one(0)
        assert wrapper.cache_info() == (1, 2, 2, 2)
        wrapper.cache_clear()
        assert len(cache) == 0
        assert wrapper.cache_info() == (0, 0, 2, 0)

    def test_decorator_lock_info(self):
        cache = self.cache(2)
        lock = CountedLock()
        wrapper = cached(cache, lock=lock, info=True)(self.func)
        # ADAPTED (7): results n -> one(n).
        assert wrapper.cache_info() == (0, 0, 2, 0)
        assert lock.count == 1
        assert wrapper(0) == one(0)
        assert lock.count == 3
        assert wrapper.cache_info() == (0, 1, 2, 1)
        assert lock.count == 4
        assert wrapper(1) == one(1)
        assert lock.count == 6
        assert wrapper.cache_info() == (0, 2, 2, 2)
        assert lock.count == 7
        assert wrapper(0) == one(0)
        assert lock.count == 8
        assert wrapper.cache_info() == (1, 2, 2, 2)
        assert lock.count == 9
        wrapper.cache_clear()
        assert lock.count == 10
        assert len(cache) == 0
        assert wrapper.cache_info() == (0, 0, 2, 0)
        assert lock.count == 11

    def test_decorator_cond_info(self):
        cache = self.cache(2)
        lock = cond = CountedCondition()
        wrapper = cached(cache, condition=cond, info=True)(self.func)
        # ADAPTED (7): results n -> one(n).
        assert wrapper.cache_info() == (0, 0, 2, 0)
        assert lock.count == 1
        assert wrapper(0) == one(0)
        assert lock.count == 4
        assert wrapper.cache_info() == (0, 1, 2, 1)
        assert lock.count == 5
        assert wrapper(1) == one(1)
        assert lock.count == 8
        assert wrapper.cache_info() == (0, 2, 2, 2)
        assert lock.count == 9
        assert wrapper(0) == one(0)
        assert lock.count == 10
        assert wrapper.cache_info() == (1, 2, 2, 2)
        assert lock.count == 11
        wrapper.cache_clear()
        assert lock.count == 12
        assert len(cache) == 0
        assert wrapper.cache_info() == (0, 0, 2, 0)
        assert lock.count == 13

    def test_decorator_lock_cond_info(self):
        cache = self.cache(2)
        lock = CountedLock()
        cond = CountedCondition()
        wrapper = cached(cache, lock=lock, condition=cond, info=True)(self.func)
        # ADAPTED (7): results n -> one(n).
        assert wrapper.cache_info() == (0, 0, 2, 0)
        assert lock.count == 1
        assert wrapper(0) == one(0)
        assert lock.count == 4
        assert wrapper.cache_info() == (0, 1, 2, 1)
        assert lock.count == 5
        assert wrapper(1) == one(1)
        assert lock.count == 8
        assert wrapper.cache_info() == (0, 2, 2, 2)
        assert lock.count == 9
        assert wrapper(0) == one(0)
        assert lock.count == 10
        assert wrapper.cache_info() == (1, 2, 2, 2)
        assert lock.count == 11
        wrapper.cache_clear()
        assert lock.count == 12
        assert len(cache) == 0
        assert wrapper.cache_info() == (0, 0, 2, 0)
        assert lock.count == 13

    def test_zero_size_cache_decorator(self):
        cache = self.cache(0)
        wrapper = cached(cache)(self.func)

        # ADAPTED (7): result 0 -> one(0), one byte: too large for maxsize=0, returned uncached.
        assert len(cache) == 0
        assert wrapper(0) == one(0)
        assert len(cache) == 0

    def test_zero_size_cache_decorator_lock(self):
        cache = self.cache(0)
        lock = CountedLock()
        wrapper = cached(cache, lock=lock)(self.func)

        # ADAPTED (7): result 0 -> one(0).
        assert len(cache) == 0
        assert wrapper(0) == one(0)
        assert len(cache) == 0
        assert lock.count == 2

    def test_zero_size_cache_decorator_cond(self):
        cache = self.cache(0)
        lock = cond = CountedCondition()
        wrapper = cached(cache, condition=cond)(self.func)

        # ADAPTED (7): result 0 -> one(0).
        assert len(cache) == 0
        assert wrapper(0) == one(0)
        assert len(cache) == 0
        assert lock.count == 3

    def test_zero_size_cache_decorator_info(self):
        cache = self.cache(0)
        wrapper = cached(cache, info=True)(self.func)

        # ADAPTED (7): result 0 -> one(0).
        assert wrapper.cache_info() == (0, 0, 0, 0)
        assert wrapper(0) == one(0)
        assert wrapper.cache_info() == (0, 1, 0, 0)

    def test_zero_size_cache_decorator_lock_info(self):
        cache = self.cache(0)
        lock = CountedLock()
        wrapper = cached(cache, lock=lock, info=True)(self.func)

        # ADAPTED (7): result 0 -> one(0).
        assert len(cache) == 0
        assert wrapper.cache_info() == (0, 0, 0, 0)
        assert lock.count == 1
        assert wrapper(0) == one(0)
        assert len(cache) == 0
        assert lock.count == 3
        assert wrapper.cache_info() == (0, 1, 0, 0)
        assert lock.count == 4

    def test_zero_size_cache_decorator_cond_info(self):
        cache = self.cache(0)
        lock = cond = CountedCondition()
        wrapper = cached(cache, condition=cond, info=True)(self.func)

        # ADAPTED (7): result 0 -> one(0).
        assert len(cache) == 0
        assert wrapper.cache_info() == (0, 0, 0, 0)
        assert lock.count == 1
        assert wrapper(0) == one(0)
        assert len(cache) == 0
        assert lock.count == 4
        assert wrapper.cache_info() == (0, 1, 0, 0)
        assert lock.count == 5

    # ------------------------------------------------ DictTest, CustomCacheTest, InvalidCacheTest

    def test_dict_decorator_info(self):
        # ADAPTED (8): cachetools' DictTest wraps a plain dict and expects maxsize None and
        # currsize len(dict).  discache.cached wraps a DiscardableCache; the nearest case is a
        # cache as roomy as a dict with 3-byte results: maxsize is the cache's, currsize its bytes.
        maxsize = 1 << 20
        cache = self._make(maxsize=maxsize)
        calls = []

        def func(*args):
            calls.append(args)
            return one(len(calls)) * 3  # 3 bytes, distinct per call

        wrapper = cached(cache, info=True)(func)
        assert wrapper.cache_info() == (0, 0, maxsize, 0)
        first = wrapper(0)
        assert len(first) == 3
        assert wrapper.cache_info() == (0, 1, maxsize, 3)
        assert wrapper(1) != first
        assert wrapper.cache_info() == (0, 2, maxsize, 6)
        assert wrapper(0) == first
        assert wrapper.cache_info() == (1, 2, maxsize, 6)
        wrapper.cache_clear()
        assert len(cache) == 0
        assert wrapper.cache_info() == (0, 0, maxsize, 0)

    def test_custom_cache_decorator_info(self):
        # ADAPTED (8): cachetools' CustomCacheTest wraps a duck-typed mapping (maxsize None,
        # currsize len).  The nearest discache case: a user's DiscardableCache subclass with its
        # own getsizeof (1 per value, cachetools' default) over 3-byte results; cache_info must
        # report the subclass's maxsize and currsize.
        class CountingCache(DiscardableCache):
            def getsizeof(self, value):
                return 1

        cache = self._make(2, cls=CountingCache)
        calls = []

        def func(*args):
            calls.append(args)
            return one(len(calls)) * 3

        wrapper = cached(cache, info=True)(func)
        assert wrapper.cache_info() == (0, 0, 2, 0)
        first = wrapper(0)
        assert wrapper.cache_info() == (0, 1, 2, 1)
        wrapper(1)
        assert wrapper.cache_info() == (0, 2, 2, 2)
        assert wrapper(0) == first
        assert wrapper.cache_info() == (1, 2, 2, 2)
        wrapper.cache_clear()
        assert len(cache) == 0
        assert wrapper.cache_info() == (0, 0, 2, 0)

    def test_invalid_cache_decorator(self):
        # passing cache=None is no longer supported since (cachetools) v8.0.0
        with pytest.raises(TypeError, match="None"):
            cached(None)

    def test_invalid_cache_decorator_info(self):
        # passing cache=None is no longer supported since (cachetools) v8.0.0
        with pytest.raises(TypeError, match="None"):
            cached(None, info=True)


# ---------------------------------------------------------------- issue 10: misuse of the mapping


def reproduce(cache, how):
    """copy.copy, copy.deepcopy or a pickle round trip of `cache`."""
    if how == "copy":
        return copy.copy(cache)
    if how == "deepcopy":
        return copy.deepcopy(cache)
    return pickle.loads(pickle.dumps(cache))


class TestMisuse:
    @pytest.mark.parametrize("twin", [type("Name", (str,), {}), numpy.str_],
                             ids=["str-subclass", "numpy.str_"])
    def test_equal_keys_are_one_entry(self, Cache, twin):
        cache = Cache(maxsize=1 << 20)
        cache["key"] = b"by str"
        assert twin("key") in cache
        assert cache[twin("key")] == b"by str"
        cache[twin("key")] = b"by twin"
        assert len(cache) == 1
        assert cache["key"] == b"by twin"
        assert cache.currsize == len(b"by twin")
        del cache[twin("key")]
        assert "key" not in cache and len(cache) == 0 and cache.currsize == 0

        cache[twin("other")] = b"by twin"
        assert cache.get("other") == b"by twin"
        assert cache.pop("other") == b"by twin"
        assert len(cache) == 0

    def test_equal_numbers_are_one_entry(self, Cache):
        cache = Cache(maxsize=1 << 20)
        cache[1] = b"int"
        cache[1.0] = b"float"
        cache[True] = b"bool"
        assert len(cache) == 1 and cache[1] == b"bool" and cache.currsize == 4

    def test_numpy_array_weighs_its_nbytes(self, Cache, manager):
        row = numpy.resize(numpy.arange(251, dtype=numpy.uint8), (1, 8 << 20))
        assert len(row) == 1 and row.nbytes == 8 << 20
        cache = Cache(maxsize=12 << 20)
        assert cache.getsizeof(row) == row.nbytes
        cache["row"] = row
        assert cache.currsize == row.nbytes
        assert cache["row"] == row.tobytes()
        # A second one does not fit beside the first: the first goes, maxsize holds.
        cache["again"] = row
        assert list(cache) == ["again"] and cache.currsize == row.nbytes <= cache.maxsize

        small = Cache(maxsize=4 << 20)
        allocated = manager.stats()["allocated_bytes"]
        with pytest.raises(ValueError, match="too large"):
            small["row"] = row
        assert "row" not in small and small.currsize == 0
        assert manager.stats()["allocated_bytes"] == allocated

    @pytest.mark.parametrize("getsizeof, error", [
        (lambda value: float(len(value)), TypeError),
        (lambda value: -1, ValueError),
        (lambda value: None, TypeError),
    ], ids=["float", "negative", "None"])
    def test_bad_getsizeof_raises_and_leaks_nothing(self, Cache, manager, getsizeof, error):
        cache = Cache(maxsize=1 << 20, getsizeof=getsizeof)
        allocated = manager.stats()["allocated_bytes"]
        for key in range(50):
            with pytest.raises(error):
                cache[key] = sized(100)
        assert len(cache) == 0 and cache.currsize == 0
        assert manager.stats()["allocated_bytes"] == allocated

    def test_bad_size_from_a_subclass_keeps_the_old_value(self, Cache, manager):
        class Picky(DiscardableCache):
            def getsizeof(self, value):
                return -1 if bytes(value[:1]) == b"-" else len(value)

        cache = Cache(maxsize=1 << 20, cls=Picky)
        cache["key"] = b"good"
        allocated = manager.stats()["allocated_bytes"]
        for _ in range(50):
            with pytest.raises(ValueError):
                cache["key"] = b"-bad"
        assert cache["key"] == b"good" and len(cache) == 1 and cache.currsize == 4
        assert manager.stats()["allocated_bytes"] == allocated

    @pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
    def test_reproduction_is_independent(self, Cache, how):
        cache = Cache(maxsize=3 * 100, getsizeof=len, verify=True, idle_unlock=5.0)
        for key in "abc":
            cache[key] = key.encode() * 100
        cache["a"]  # least recently used first: b, c, a
        twin = reproduce(cache, how)
        try:
            assert twin is not cache and type(twin) is type(cache)
            assert (twin.maxsize, twin.verify, twin.idle_unlock) == (300, True, 5.0)
            assert twin.getsizeof(b"xyz") == 3
            if how != "pickle":
                assert twin.manager is cache.manager
            assert len(twin) == 3 and twin.currsize == cache.currsize == 300
            assert twin.popitem() == ("b", b"b" * 100)
            assert "b" in cache and len(cache) == 3

            twin["d"] = b"d" * 100
            assert "d" not in cache
            del cache["c"]
            assert twin["c"] == b"c" * 100
            cache["a"] = b"A" * 100
            assert twin["a"] == b"a" * 100
            assert cache.popitem() == ("b", b"b" * 100)
            assert sorted(twin) == ["a", "c", "d"] and sorted(cache) == ["a"]
        finally:
            twin.close()
