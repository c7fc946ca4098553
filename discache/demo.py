"""`discache demo`: decoded images in discardable memory, reclaimed by the real kernel, served
back correct."""
from __future__ import annotations

import argparse
import os
import pathlib
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TextIO

from . import force_reclaim
from .argtypes import fraction, integer, one_of, port, positive_int
from .errors import BackendUnavailableError
from .manager import (MAX_RAM_FRACTION, PAGE, DiscardableMemoryManager, default_limit,
                      physical_ram)

MODES = ("RGB", "RGBA", "L", "P")
IDLE_UNLOCK = 0.05  # seconds an image must go unused before the idle timer unlocks it


BACKENDS = ("auto", "madvfree", "memfd")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `demo` subcommand."""
    from .cli import add_subcommand

    p = add_subcommand(sub, "demo", run.__doc__ or "")
    p.add_argument("--backend", default="auto", type=one_of(BACKENDS),
                   metavar="{" + ",".join(BACKENDS) + "}",
                   help="where the bitmaps live (default: auto, madvfree on Linux)")
    p.add_argument("--images", type=positive_int, default=300, metavar="N",
                   help="images to generate (default 300)")
    p.add_argument("--size", type=positive_int, default=256, metavar="PIXELS",
                   help="width and height of each image in pixels (default 256)")
    p.add_argument("--reclaim", type=fraction, default=1 / 3, metavar="FRACTION",
                   help="share of the images the kernel is made to reclaim, from 0 to 1 "
                        "(default 1/3)")
    p.add_argument("--seed", type=integer, default=0, metavar="N",
                   help="seed of the images and of the choice (default 0)")
    p.add_argument("--metrics-port", type=port, metavar="PORT",
                   help="serve Prometheus metrics of the cache and its manager on "
                        "http://127.0.0.1:PORT/metrics while the demo runs (0: any free port)")
    p.add_argument("--keep-serving", action="store_true",
                   help="with --metrics-port: after the run, keep the cache and serve its final "
                        "numbers until interrupted (Ctrl-C or SIGTERM), so that a scrape sees them")
    p.add_argument("--record", metavar="FILE",
                   help="record the run's discardable-memory traffic to FILE, a trace that "
                        "discache simulate --trace FILE replays under every design")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (drawn on standard error, only on a terminal anyway)")
    p.set_defaults(func=run, parser=p)


# ---------------------------------------------------------------------- progress and report


class Progress:
    """A one-line progress bar redrawn in place on a terminal; silent when disabled."""

    WIDTH = 30

    def __init__(self, label: str, total: int, stream: TextIO, enabled: bool) -> None:
        self.label, self.total, self.stream, self.enabled = label, total, stream, enabled
        self.done = 0
        self._drawn = 0.0

    def advance(self, n: int = 1) -> None:
        """Count n more items; redraws at most 20 times a second."""
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._drawn >= 0.05 or self.done >= self.total):
            self._drawn = now
            filled = self.WIDTH * self.done // max(self.total, 1)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self.stream.write(f"\r{self.label:<18} [{bar}] {self.done}/{self.total}")
            self.stream.flush()

    def close(self) -> None:
        """Erase the bar."""
        if self.enabled:
            self.stream.write("\r" + " " * (self.WIDTH + 50) + "\r")
            self.stream.flush()


@dataclass
class Phase:
    """One timed step of the demo and what it did."""

    name: str
    seconds: float = 0.0
    note: str = ""
    started: float = field(default_factory=time.perf_counter, repr=False)

    def stop(self) -> None:
        """Record the time since the phase started."""
        self.seconds = time.perf_counter() - self.started


@dataclass
class DemoResult:
    """Every number the demo's table prints."""

    images: int = 0
    backend: str = ""
    bitmap_bytes: int = 0
    chosen: int = 0
    chosen_pages: int = 0  # pages the chosen bitmaps occupy
    taken_early: int = 0  # spared bitmaps the kernel took on its own (real memory pressure)
    unlocked: int = 0
    pages_reclaimed: int = 0
    rss_before: int = 0
    rss_after: int = 0
    hits: int = 0
    misses: int = 0
    purges_detected: int = 0
    regenerations: int = 0
    corrupt: int = 0
    phases: list[Phase] = field(default_factory=list)
    on_phase: Optional[Callable[[str], None]] = field(default=None, repr=False, compare=False)

    def phase(self, name: str) -> Phase:
        """Start recording a new phase."""
        if self.on_phase is not None:
            self.on_phase(name)
        self.phases.append(Phase(name))
        return self.phases[-1]

    @property
    def bytes_reclaimed(self) -> int:
        """Bytes the kernel discarded, from mincore() after MADV_PAGEOUT."""
        return self.pages_reclaimed * PAGE

    @property
    def consistent(self) -> bool:
        """Every purge was regenerated, every image was served, none more."""
        return (self.regenerations == self.purges_detected
                and self.hits + self.regenerations == self.images)

    @property
    def seconds(self) -> float:
        """Wall time of every phase."""
        return sum(phase.seconds for phase in self.phases)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _how_reclaimed(backend: str) -> str:
    if backend == "madvfree":
        return "MADV_PAGEOUT by the kernel, counted by mincore"
    return "holes punched: without swap the kernel never reclaims shmem"


def format_table(result: DemoResult) -> str:
    """The phases with their times, then the counters."""
    from .cli import wrap

    rows = [f"{'phase':<18} {'time':>8}  what happened"]
    rows += [wrap(f"{p.name:<18} {p.seconds:>7.2f}s  ", p.note, 29) for p in result.phases]
    rows.append(f"{'total':<18} {result.seconds:>7.2f}s")
    rows.append("")
    counters = [
        ("images", f"{result.images}"),
        ("hits", f"{result.hits}"),
        ("purges detected", f"{result.purges_detected}"),
        ("regenerations", f"{result.regenerations}"),
        ("bytes reclaimed", f"{result.bytes_reclaimed} ({_mib(result.bytes_reclaimed)}, "
                            f"{result.pages_reclaimed} pages, {_how_reclaimed(result.backend)})"),
        ("process RSS", f"{_mib(result.rss_before)} -> {_mib(result.rss_after)} "
                        "around the reclaim"),
        ("corrupt", f"{result.corrupt}"),
    ]
    rows += [wrap(f"{name:<18} ", value, 19) for name, value in counters]
    return "\n".join(rows)


# ---------------------------------------------------------------------- the images


def draw_image(seed: int, size: int) -> Any:
    """A varied picture: a rotated, tinted gradient, shapes and a label, in one of MODES."""
    from PIL import Image, ImageDraw, ImageOps

    rng = random.Random(seed)
    ramp = Image.radial_gradient("L") if seed % 2 else Image.linear_gradient("L")
    ramp = ramp.rotate(rng.uniform(0, 360)).resize((size, size))
    low = tuple(rng.randrange(256) for _ in range(3))
    high = tuple(rng.randrange(256) for _ in range(3))
    image = ImageOps.colorize(ramp, low, high).convert("RGBA")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(3, 9)):
        box = sorted(rng.randrange(size) for _ in range(2)), sorted(rng.randrange(size)
                                                                    for _ in range(2))
        xy = (box[0][0], box[1][0], box[0][1], box[1][1])
        fill = tuple(rng.randrange(256) for _ in range(4))
        shape = rng.choice((draw.ellipse, draw.rectangle, draw.line))
        if shape is draw.line:
            shape(xy, fill=fill, width=rng.randrange(1, 6))
        else:
            shape(xy, fill=fill)
    draw.text((4, 4), f"#{seed}", fill=(255, 255, 255, 255))
    mode = MODES[seed % len(MODES)]
    if mode == "P":
        return image.convert("RGB").quantize(colors=rng.randrange(8, 65))
    return image if mode == "RGBA" else image.convert(mode)


def _rss() -> int:
    """Resident bytes of this process (the kernel's count, /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def image_cache_class() -> Any:
    """ImageCache: from the source checkout this discache runs from (its integrations/ at the
    repository's root), else as installed (discache.integrations).  The checkout comes first:
    another discache installed in development mode would map discache.integrations elsewhere."""
    import importlib.util

    checkout = pathlib.Path(__file__).resolve().parent.parent
    spec = importlib.util.find_spec("integrations") if (checkout / "integrations").is_dir() \
        else None
    if spec is not None and spec.origin and \
            pathlib.Path(spec.origin).resolve().parent.parent == checkout:
        from integrations.imagecache import ImageCache  # type: ignore[no-redef]
    else:
        from .integrations.imagecache import ImageCache
    return ImageCache


def _same(a: Any, b: Any) -> bool:
    return (a.mode, a.size, a.getpalette(), a.tobytes()) == (b.mode, b.size, b.getpalette(),
                                                              b.tobytes())


# ---------------------------------------------------------------------- the run


def run_demo(images: int, size: int, backend: str = "auto", reclaim: float = 1 / 3,
             seed: int = 0, progress: Optional[Callable[[str, int], Progress]] = None,
             on_phase: Optional[Callable[[str, Any], None]] = None,
             on_done: Optional[Callable[[DemoResult, Any], None]] = None) -> DemoResult:
    """Generate, decode, idle, reclaim a chosen share through the kernel, access all again and
    compare every image with its file; returns the numbers.  on_phase(name, image_cache) is
    called as each phase starts (for metrics exporters and tests), on_done(result, image_cache)
    at the end, before the cache is closed."""
    ImageCache = image_cache_class()
    progress = progress or (lambda label, total: Progress(label, total, sys.stderr, False))
    bitmap_bound = images * (size * size * 4 + 1088)  # RGBA pixels, header and palette
    limit = max(default_limit(), bitmap_bound + (bitmap_bound >> 2))
    if limit > physical_ram() // MAX_RAM_FRACTION:
        raise ValueError(f"{images} images of {size}x{size} need up to {_mib(bitmap_bound)}, more "
                         "than a quarter of this machine's RAM: lower --images or --size")
    manager = DiscardableMemoryManager(limit, backend)
    result = DemoResult(images=images, backend=manager.backend)
    cache = ImageCache(limit, backend, manager=manager, idle_unlock=IDLE_UNLOCK)
    if on_phase is not None:
        result.on_phase = lambda name: on_phase(name, cache)
    try:
        _run_phases(result, cache, size, reclaim, seed, progress)
        if on_done is not None:
            on_done(result, cache)
    finally:
        cache.close()
    return result


def _wait_until_idle(cache: Any, timeout: float = 100 * IDLE_UNLOCK) -> int:
    """Do nothing until the cache's idle timer has unlocked every bitmap; how many it unlocked."""
    deadline = time.monotonic() + timeout
    while cache.manager.stats()["locked_bytes"] and time.monotonic() < deadline:
        time.sleep(IDLE_UNLOCK / 10)
    if cache.manager.stats()["locked_bytes"]:
        raise RuntimeError(f"the idle timer left bitmaps locked after {timeout:.1f} s")
    return len(cache)


def _run_phases(result: DemoResult, cache: Any, size: int, reclaim: float, seed: int,
                progress: Callable[[str, int], Progress]) -> None:
    from PIL import Image

    images, backend = result.images, result.backend

    with tempfile.TemporaryDirectory(prefix="discache-demo-") as tmp:
        paths = [pathlib.Path(tmp, f"image{i:05d}.png") for i in range(images)]

        step, bar = result.phase("generate PNGs"), progress("generate", images)
        for i, path in enumerate(paths):
            draw_image(seed * 1_000_003 + i, size).save(path, compress_level=1)
            bar.advance()
        bar.close()
        step.stop()
        on_disk = sum(path.stat().st_size for path in paths)
        step.note = (f"{images} images of {size}x{size} ({', '.join(MODES)}), "
                     f"{_mib(on_disk)} of PNG")

        step, bar = result.phase("decode into cache"), progress("decode", images)
        weights = []
        for i, path in enumerate(paths):
            before = cache.currsize
            cache.get_or_create(i, path)
            weights.append(cache.currsize - before)  # this bitmap's bytes
            bar.advance()
        bar.close()
        step.stop()
        result.bitmap_bytes = cache.currsize
        step.note = f"{len(cache)} bitmaps, {_mib(result.bitmap_bytes)} in discardable memory"

        step = result.phase("go idle")
        result.unlocked = _wait_until_idle(cache)
        step.stop()
        step.note = (f"{result.unlocked} bitmaps unlocked by the idle timer, nothing called "
                     f"({'MADV_FREE' if backend == 'madvfree' else backend})")

        step = result.phase("kernel reclaim")
        chosen = set(random.Random(seed).sample(range(images), round(images * reclaim)))
        spared = [i for i in range(images) if i not in chosen]
        result.chosen = len(chosen)
        result.chosen_pages = sum(-(-weights[i] // PAGE) for i in chosen)
        result.rss_before = _rss()
        before = cache.stats()  # purges found while pinning count with the access phase's
        pinned = []
        for i in spared:  # pinned bitmaps are locked: the kernel cannot take them
            try:
                cache.pin(i)
                pinned.append(i)
            except KeyError:  # already taken by the kernel under real pressure: a purge
                result.taken_early += 1
        result.pages_reclaimed = force_reclaim(cache)
        for i in pinned:
            cache.unpin(i)
        result.rss_after = _rss()
        cache.sweep(idle=0)  # the spared bitmaps go back to unlocked, reclaimable but intact
        step.stop()
        step.note = (f"{len(chosen)} bitmaps chosen ({result.chosen_pages} pages), "
                     f"{result.pages_reclaimed} pages gone")
        if result.taken_early:
            step.note += f"; {result.taken_early} others taken by the kernel on its own"

        step, bar = result.phase("access again"), progress("access", images)
        order = list(range(images))
        random.Random(seed + 1).shuffle(order)
        served = {}
        for i in order:
            served[i] = cache.get_or_create(i, paths[i])
            bar.advance()
        bar.close()
        step.stop()
        after = cache.stats()
        for name in ("hits", "misses", "purges_detected", "regenerations"):
            setattr(result, name, after[name] - before[name])
        step.note = (f"{result.hits} hits, {result.purges_detected} purges detected, "
                     f"{result.regenerations} regenerated from their PNG")

        step, bar = result.phase("verify"), progress("verify", images)
        for i, path in enumerate(paths):
            with Image.open(path) as source:
                source.load()
                result.corrupt += not _same(served[i], source)
            bar.advance()
        bar.close()
        step.stop()
        step.note = f"{images} images compared pixel for pixel with their PNG: " \
                    f"{result.corrupt} corrupt"


def run(args: argparse.Namespace) -> int:
    """Show the kernel reclaiming cached images, and the cache serving only correct ones.

    Generates PNG images, decodes them into an image cache in discardable memory, lets them go
    idle (unlocked), makes the real kernel reclaim a share of them (MADV_PAGEOUT), reads every
    image again (regenerating what was purged) and compares each one with its PNG, pixel for
    pixel.  Exit status: 0, 1 if an image was corrupt or the counters disagree, 2 for a bad
    option or a missing Pillow."""
    if args.keep_serving and args.metrics_port is None:
        args.parser.error("--keep-serving serves metrics: give --metrics-port PORT too")
    exporter = None
    if args.metrics_port is not None:
        from .metrics import Exporter

        try:
            exporter = Exporter(args.metrics_port)
        except OSError as error:
            print(f"discache demo: cannot serve metrics on 127.0.0.1:{args.metrics_port}: "
                  f"{error.strerror or error}", file=sys.stderr)
            return 2
        print(f"discache demo: metrics on http://127.0.0.1:{exporter.port}/metrics", flush=True)

    def export(name: str, cache: Any) -> None:
        if exporter is not None and not exporter.collector.watched():
            exporter.watch(cache, "demo")
            exporter.watch(cache.manager, "demo-manager")

    printed: list[int] = []

    def report(result: DemoResult, cache: Any) -> None:
        printed.append(print_result(result))
        if args.keep_serving:
            serve_until_interrupted(exporter)

    enabled = args.progress and sys.stderr.isatty()
    recorder = None
    if args.record is not None:
        from . import tracing

        try:
            recorder = tracing.start(args.record)
        except (OSError, RuntimeError) as error:
            print(f"discache demo: cannot record to {args.record}: "
                  f"{getattr(error, 'strerror', None) or error}", file=sys.stderr)
            return 2
    try:
        try:
            result = run_demo(args.images, args.size, args.backend, args.reclaim, args.seed,
                              lambda label, total: Progress(label, total, sys.stderr, enabled),
                              export if exporter is not None else None, report)
        finally:
            if recorder is not None:
                tracing.stop()
        if recorder is not None:
            print(f"discache demo: {recorder.events:,} events recorded to {args.record} "
                  f"(replay: discache simulate --trace {args.record})")
    except ModuleNotFoundError as error:
        if error.name != "PIL":
            raise
        from .cli import install_command

        print(f"discache demo: Pillow is missing (the demo draws and decodes images with it): "
              f"{install_command('Pillow')}", file=sys.stderr)
        return 2
    except (BackendUnavailableError, ValueError) as error:
        print(f"discache demo: {error}", file=sys.stderr)
        return 2
    finally:
        if exporter is not None:
            exporter.close()
    return printed[0] if printed else exit_code(result)


def print_result(result: DemoResult) -> int:
    """Print the table; the exit code it calls for."""
    print(f"discache demo: backend {result.backend} (real kernel), page {PAGE} bytes, "
          f"pid {os.getpid()}")
    print(format_table(result))
    sys.stdout.flush()
    return exit_code(result)


def serve_until_interrupted(exporter: Any) -> None:
    """Keep serving the final numbers until Ctrl-C or SIGTERM."""
    import signal
    import threading

    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    print(f"discache demo: serving the final numbers on http://127.0.0.1:{exporter.port}/metrics "
          "until interrupted (Ctrl-C)", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("discache demo: stopped serving", flush=True)


def exit_code(result: DemoResult) -> int:
    """0 when every image was correct and the counters add up; 1 otherwise, saying why."""
    if result.corrupt:
        print(f"FAILED: {result.corrupt} corrupt image(s) were served", file=sys.stderr)
        return 1
    if not result.consistent:
        print("FAILED: the counters do not add up (hits + regenerations != images, or "
              "regenerations != purges detected)", file=sys.stderr)
        return 1
    return 0
