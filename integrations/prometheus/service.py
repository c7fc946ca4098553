"""A small service that keeps a DiscardableCache under load and serves its metrics on /metrics.

    python -m discache.integrations.prometheus.service --port 9109 --seconds 60

Point Prometheus at 127.0.0.1:PORT, load discache-rules.yml and grafana-dashboard.json beside this
file, and watch the cache serve, go idle, lose entries to the kernel and regenerate them.
"""
from __future__ import annotations

import argparse
import hashlib
import random
import sys
import threading
import time
from typing import Optional, Sequence

from discache import DiscardableCache, DiscardableMemoryManager, force_reclaim
from discache.metrics import Exporter


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
        self.manager = DiscardableMemoryManager(limit, backend)
        self.cache = DiscardableCache(maxsize, manager=self.manager)
        self.exporter = Exporter(port)
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

    def close(self) -> None:
        """Stop the load and the /metrics server, free the cache."""
        self.stop()
        self.exporter.close()
        self.cache.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the service from the command line."""
    parser = argparse.ArgumentParser(prog="discache-load-service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=9109, help="/metrics port on 127.0.0.1")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run")
    parser.add_argument("--backend", default="auto", help="memory backend (default: auto)")
    args = parser.parse_args(argv)
    service = LoadService(port=args.port, backend=args.backend)
    print(f"metrics on {service.url}", flush=True)
    try:
        service.run(args.seconds)
    except KeyboardInterrupt:
        pass
    finally:
        service.close()
    stats = service.cache.stats()
    print(f"{service.operations} operations, {stats['hits']} hits, "
          f"{stats['purges_detected']} purges detected, {stats['regenerations']} regenerations, "
          f"{service.corrupt} corrupt")
    return 1 if service.corrupt else 0


if __name__ == "__main__":
    sys.exit(main())
