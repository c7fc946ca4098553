"""A small service that keeps a DiscardableCache under load and serves its metrics on /metrics.

    python -m discache.integrations.prometheus.service --port 9109 --seconds 60

Point Prometheus at 127.0.0.1:PORT, load discache-rules.yml and grafana-dashboard.json beside this
file, and watch the cache serve, go idle, lose entries to the kernel and regenerate them.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import random
import sys
import threading
import time
from typing import Iterator, Optional, Sequence

from discache import DiscardableCache, DiscardableMemoryManager, force_reclaim
from discache.metrics import Exporter

BATCH = 10  # operations between two chances for a scrape to read the cache and its manager


class Quiet:
    """Lets a scrape read while the load is between operations: the load runs batches inside
    `working()`, a scrape reads inside `reading()`, and a waiting scrape goes first."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._working = False
        self._readers = 0

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """One batch of operations; waits while a scrape reads or waits to."""
        with self._changed:
            while self._readers:
                self._changed.wait()
            self._working = True
        try:
            yield
        finally:
            with self._changed:
                self._working = False
                self._changed.notify_all()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """A scrape: waits for the batch under way to end, holds the next one off."""
        with self._changed:
            self._readers += 1
            while self._working:
                self._changed.wait()
        try:
            yield
        finally:
            with self._changed:
                self._readers -= 1
                self._changed.notify_all()


def make_value(key: int, size: int) -> bytes:
    """The deterministic value of a key: what the service regenerates after a purge."""
    seed = hashlib.blake2b(key.to_bytes(8, "little"), digest_size=32).digest()
    return (seed * (size // len(seed) + 1))[:size]


class LoadService:
    """Reads keys with a skewed popularity through get_or_create; every `idle_every` operations
    unlocks idle entries, every `reclaim_every` makes the kernel reclaim them, and every
    `pressure_every` reports moderate memory pressure to the manager."""

    def __init__(self, port: int = 0, backend: str = "auto", keys: int = 2000,
                 value_size: int = 16384, maxsize: int = 24 << 20, limit: int = 32 << 20,
                 idle_every: int = 500, reclaim_every: int = 3000, pressure_every: int = 7000,
                 seed: int = 1) -> None:
        self.quiet = Quiet()
        # first: a busy port fails before anything is allocated
        self.exporter = Exporter(port, hold=self.quiet.reading)
        try:
            self.manager = DiscardableMemoryManager(limit, backend)
            self.cache = DiscardableCache(maxsize, manager=self.manager)
        except BaseException:
            self.exporter.close()
            raise
        self.exporter.watch(self.cache, "service")
        self.exporter.watch(self.manager, "service-manager")
        self.keys, self.value_size = keys, value_size
        self.idle_every, self.reclaim_every = idle_every, reclaim_every
        self.pressure_every = pressure_every
        self.random = random.Random(seed)
        self.operations = 0
        self.corrupt = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        """Where /metrics is served."""
        return f"http://{self.exporter.addr}:{self.exporter.port}/metrics"

    def step(self) -> None:
        """One operation of the load."""
        key = min(int(self.random.paretovariate(1.2)) - 1, self.keys - 1)
        value = self.cache.get_or_create(key, lambda: make_value(key, self.value_size))
        if value != make_value(key, self.value_size):
            self.corrupt += 1
        self.operations += 1
        n = self.operations
        if n % self.idle_every == 0:
            self.cache.sweep(idle=0)
        if n % self.reclaim_every == 0:
            force_reclaim(self.cache)
        if n % self.pressure_every == 0:
            self.manager.on_memory_pressure("moderate")

    def run(self, seconds: float) -> None:
        """Apply the load for `seconds` or until stop()."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            # A scrape reads between batches, never halfway through a sweep (whose madvise
            # releases the GIL with the entries flagged unlocked and the manager not yet told).
            with self.quiet.working():
                for _ in range(BATCH):
                    self.step()

    def start(self, seconds: float = float("inf")) -> "LoadService":
        """Apply the load in a background thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, args=(seconds,), daemon=True,
                                        name="discache-load")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the load (metrics stay served until close)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def summary(self) -> str:
        """The counts so far, in one line."""
        stats = self.cache.stats()
        return (f"{self.operations:,} operations, {stats['hits']:,} hits, "
                f"{stats['purges_detected']:,} purges detected, "
                f"{stats['regenerations']:,} regenerations, {self.corrupt} corrupt")

    def close(self) -> None:
        """Stop the load and the /metrics server, free the cache."""
        self.stop()
        self.exporter.close()
        self.cache.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the service from the command line."""
    from discache.argtypes import one_of, port, seconds
    from discache.backends import BackendUnavailableError
    from discache.cli import Parser

    parser = Parser(prog="discache-load-service", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=port, default=9109,
                        help="/metrics port on 127.0.0.1 (default 9109; 0: any free port)")
    parser.add_argument("--seconds", type=seconds, default=60.0,
                        help="how long to run (default 60)")
    parser.add_argument("--backend", default="auto", type=one_of(("auto", "madvfree", "memfd")),
                        metavar="{auto,madvfree,memfd}", help="memory backend (default: auto)")
    parser.add_argument("--every", type=seconds, default=10.0, metavar="SECONDS",
                        help="print the counts every SECONDS (default 10)")
    args = parser.parse_args(argv)
    try:
        service = LoadService(port=args.port, backend=args.backend)
    except OSError as error:
        print(f"{parser.prog}: cannot serve metrics on 127.0.0.1:{args.port}: "
              f"{error.strerror or error} (choose another --port)", file=sys.stderr)
        return 2
    except BackendUnavailableError as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return 2
    print(f"{parser.prog}: metrics on {service.url} for {args.seconds:g} s (Ctrl-C stops)",
          flush=True)
    start = time.monotonic()
    try:
        while True:
            left = args.seconds - (time.monotonic() - start)
            if left <= 0:
                break
            service.run(min(left, args.every))
            if time.monotonic() - start < args.seconds:
                print(f"{time.monotonic() - start:6.1f} s  {service.summary()}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        service.close()
    print(f"{parser.prog}: {service.summary()}", flush=True)
    return 1 if service.corrupt else 0


if __name__ == "__main__":
    sys.exit(main())
