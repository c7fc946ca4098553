"""SharedCache.get hit (4 KiB, set by another process) against the ways processes share a cache.

Run: python -m pytest bench/bench_shared_cache.py --benchmark-only -s

Every row names its baseline (`baseline`, same op) and its `target` ratio in extra_info, like
bench_cache.py, so discache.benchreport pairs them; the module also prints the ratios measured in
this run when it ends (-s shows them).  Targets:
  SharedCache.get hit <= 2x DiscardableCache.get hit (in-process, madvfree);
  SharedCache.get hit <= 0.01x (100 times faster than) a GET of the same 4 KiB from a local
  memcached (pymemcache), a local Redis (redis-py), each on the loopback and started here, and a
  multiprocessing.Manager().dict() proxy's get.
memcached and redis-server are Debian's (`apt-get install -y memcached redis-server`); a row
whose server or client is missing skips, saying how to install it.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

from discache import SharedCache
from discache.cache import DiscardableCache
from discache.manager import DiscardableMemoryManager

VALUE = bytes(range(256)) * 16  # 4 KiB
KEYS = [f"image-{i}" for i in range(1000)]
HOT = "image-500"
LIMIT = 64 << 20
GROUP = "shared get hit, 4 KiB value"
SHARED = "SharedCache"
INSTALL = "apt-get update && apt-get install -y memcached redis-server"
MEDIANS: dict[tuple[str, str], float] = {}

pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=1000, max_time=0.5)


def mark(benchmark, op: str, impl: str, baseline: str | None = None,
         target: float | None = None) -> None:
    benchmark.group = GROUP
    benchmark.extra_info.update(op=op, impl=impl, nbytes=len(VALUE))
    if baseline is not None:
        benchmark.extra_info.update(baseline=baseline, target=target)


def record(benchmark, op: str, impl: str) -> None:
    if benchmark.stats is not None:
        MEDIANS[(op, impl)] = benchmark.stats.stats.median


@pytest.fixture(scope="module", autouse=True)
def ratio_summary():
    """Print the ratios of this run when the module ends."""
    yield
    lines = ["", f"SharedCache.get hit, 4 KiB, against its baselines (medians of this run):"]
    for (op, impl), cost in sorted(MEDIANS.items()):
        if impl == SHARED:
            continue
        shared = MEDIANS.get((op, SHARED))
        if shared is None:
            continue
        lines.append(f"  {impl:<34} {cost * 1e6:9.3f} us   SharedCache {shared * 1e6:7.3f} us"
                     f"   SharedCache/baseline {shared / cost:8.4f}"
                     f"   baseline/SharedCache {cost / shared:7.1f}")
    print("\n".join(lines), file=sys.__stdout__)


def _fill_from_another_process(name: str) -> None:
    """Set every key in a process of its own: the hits below read another process's entries."""
    code = (f"import discache; c = discache.SharedCache({name!r}, {LIMIT}, create=False)\n"
            f"for i in range(1000): c[f'image-{{i}}'] = bytes(range(256)) * 16\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def shared():
    name = f"bench-{uuid.uuid4().hex[:10]}"
    cache = SharedCache(name, LIMIT)
    _fill_from_another_process(name)
    assert len(cache) == len(KEYS)
    yield cache
    cache.close()
    SharedCache.unlink(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(argv: list[str], port: int) -> subprocess.Popen:
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited: {server.stderr.read().decode()}")
            time.sleep(0.05)
    server.kill()
    raise RuntimeError(f"{argv[0]} did not listen on port {port}")


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(5)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _shared_row(benchmark, shared, op: str, baseline: str, target: float) -> None:
    mark(benchmark, op, SHARED, baseline, target)
    assert benchmark(shared.get, HOT) == VALUE
    record(benchmark, op, SHARED)


# ---------------------------------------------------------------- against DiscardableCache


def bench_discardable_get(benchmark):
    """The in-process baseline: a DiscardableCache hit (madvfree)."""
    impl = "DiscardableCache[madvfree]"
    mark(benchmark, "in-process", impl)
    cache = DiscardableCache(LIMIT, manager=DiscardableMemoryManager(LIMIT, "madvfree"))
    for key in KEYS:
        cache[key] = VALUE
    assert benchmark(cache.get, HOT) == VALUE
    record(benchmark, "in-process", impl)
    cache.close()


def bench_shared_get_vs_discardable(benchmark, shared):
    _shared_row(benchmark, shared, "in-process", "DiscardableCache[madvfree]", 2.0)


# ---------------------------------------------------------------- against memcached


@pytest.fixture(scope="module")
def memcached():
    pymemcache = pytest.importorskip("pymemcache", reason="pip install pymemcache")
    binary = shutil.which("memcached")
    if binary is None:
        pytest.skip(f"memcached is not installed: {INSTALL}")
    port = free_port()
    argv = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64"]
    if os.geteuid() == 0:
        argv += ["-u", "root"]  # memcached refuses to run as root without being told so
    server = start_server(argv, port)
    client = pymemcache.Client(("127.0.0.1", port), no_delay=True)
    for key in KEYS:
        client.set(key, VALUE)
    yield client
    client.close()
    stop(server)


def bench_memcached_get(benchmark, memcached):
    impl = "memcached GET (pymemcache)"
    mark(benchmark, "memcached", impl)
    assert benchmark(memcached.get, HOT) == VALUE
    record(benchmark, "memcached", impl)


def bench_shared_get_vs_memcached(benchmark, shared):
    _shared_row(benchmark, shared, "memcached", "memcached GET (pymemcache)", 0.01)


# ---------------------------------------------------------------- against Redis


@pytest.fixture(scope="module")
def redis_client():
    redis = pytest.importorskip("redis", reason="pip install redis")
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(f"redis-server is not installed: {INSTALL}")
    port = free_port()
    server = start_server([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--daemonize", "no"], port)
    client = redis.Redis(host="127.0.0.1", port=port)
    for key in KEYS:
        client.set(key, VALUE)
    yield client
    client.close()
    stop(server)


def bench_redis_get(benchmark, redis_client):
    impl = "Redis GET (redis-py)"
    mark(benchmark, "redis", impl)
    assert benchmark(redis_client.get, HOT) == VALUE
    record(benchmark, "redis", impl)


def bench_shared_get_vs_redis(benchmark, shared):
    _shared_row(benchmark, shared, "redis", "Redis GET (redis-py)", 0.01)


# ---------------------------------------------------------------- against a Manager dict


@pytest.fixture(scope="module")
def manager_dict():
    manager = multiprocessing.Manager()
    shared = manager.dict()
    shared.update({key: VALUE for key in KEYS})
    yield shared
    manager.shutdown()


def bench_manager_dict_get(benchmark, manager_dict):
    impl = "multiprocessing.Manager().dict()"
    mark(benchmark, "manager", impl)
    assert benchmark(manager_dict.get, HOT) == VALUE
    record(benchmark, "manager", impl)


def bench_shared_get_vs_manager(benchmark, shared):
    _shared_row(benchmark, shared, "manager", "multiprocessing.Manager().dict()", 0.01)
