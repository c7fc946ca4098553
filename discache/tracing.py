"""Recording a program's discardable-memory traffic as a trace that `discache simulate --trace`
replays under every design (format: docs/sim.md, "Recorded traces").

`with discache.record_trace("app.trace"):` records a block, `DISCACHE_TRACE=app.trace` a whole
program (checked once, when discache is imported), `discache demo --record FILE` the demo.  The
library calls the recorder from one line at each event (`if tracing.active is not None: ...`), so
a program that does not record pays one global lookup per event."""
from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import threading
import warnings
import weakref
from collections import deque
from typing import Any, Iterator, Optional

ENVIRONMENT = "DISCACHE_TRACE"
PROCESS = "app"  # the one process of a recorded trace
FLUSH_LINES = 4096  # lines buffered before they are written out

# The recorder of this process, or None when nothing is recorded (every hook checks this).
active: Optional["Recorder"] = None
_switch = threading.Lock()  # starting and stopping a recording


class _Span:
    """What the recorder knows of one memory: its trace name and pages."""

    __slots__ = ("name", "npages", "filled", "taken")

    def __init__(self, name: str, npages: int) -> None:
        self.name = name
        self.npages = npages
        self.filled = False  # every page written since allocation or the last loss
        self.taken = 0  # pages a recorded reclaim or purge took since the last unlock


class Recorder:
    """Writes the events of every discardable memory of this process to a trace file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.pid = os.getpid()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                           0o644)
        self._lines: deque[str] = deque()
        self._spans: dict[int, _Span] = {}  # id(memory) -> its record, while it lives
        self._serial = itertools.count(1)
        self._flushing = threading.RLock()  # a collection may emit (and flush) mid-flush
        self.events = 0
        from . import __version__, _core

        self.page = _core.page_size()
        self._emit(f"# discache {__version__} trace, pid {self.pid}, page {self.page} bytes; "
                   "sizes in pages (docs/sim.md)")
        self._emit(f"spawn {PROCESS}")

    # ------------------------------------------------------------ output

    def _emit(self, line: str) -> None:
        self._lines.append(line)
        self.events += 1
        if len(self._lines) >= FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        """Write the buffered lines out (a forked child never does: its parent owns them)."""
        if os.getpid() != self.pid:
            return
        with self._flushing:
            out = []
            with contextlib.suppress(IndexError):
                while True:
                    out.append(self._lines.popleft())
            if out and self._fd >= 0:
                data = ("\n".join(out) + "\n").encode()
                while data:
                    data = data[os.write(self._fd, data):]

    def finish(self) -> None:
        """Flush and close the file; later events are ignored."""
        self.flush()
        with self._flushing:
            if self._fd >= 0 and os.getpid() == self.pid:
                os.close(self._fd)
            self._fd = -1

    # ------------------------------------------------------------ names

    def _span(self, mem: Any, unlocked: bool = True) -> _Span:
        """mem's record; memory allocated before the recording started is introduced here, as
        filled, and unlocked if it was before this event."""
        span = self._spans.get(id(mem))
        if span is None:
            span = self._new(mem)
            span.filled = True
            self._emit(f"write {PROCESS} {span.name} 0 {span.npages}")
            if unlocked:
                self._emit(f"unlock {PROCESS} {span.name} 0 {span.npages}")
        return span

    def _new(self, mem: Any) -> _Span:
        span = _Span(f"m{next(self._serial)}", int(mem.npages))
        self._spans[id(mem)] = span
        with contextlib.suppress(TypeError):  # a memory without weak references
            weakref.finalize(mem, self._dropped, id(mem), span)
        self._emit(f"mmap {PROCESS} {span.name} {span.npages}")
        return span

    def _dropped(self, key: int, span: _Span) -> None:
        """A memory collected without close(): its pages are released."""
        if self._spans.get(key) is span:
            del self._spans[key]
            self._emit(f"munmap {PROCESS} {span.name}")

    # ------------------------------------------------------------ events (the hooks)

    def allocate(self, mem: Any) -> None:
        """New memory, locked."""
        self._new(mem)

    def lock(self, mem: Any, lost: int) -> None:
        """mem was locked; the real lock found `lost` pages purged.  A loss no recorded reclaim
        or purge explains was the kernel's own: a `lost` line places it just before the lock."""
        span = self._span(mem)
        line = f"{PROCESS} {span.name} 0 {span.npages}"
        if lost > span.taken:
            self._emit(f"lost {line}")
        if lost:
            span.filled = False
        self._emit(f"lock {line} {lost}")

    def unlock(self, mem: Any) -> None:
        """mem was unlocked; if the recorder saw no write fill it since it was allocated or found
        purged, it was filled through its address (a cache's slab), which the recorder cannot
        see: a write of every page comes first."""
        span = self._span(mem, unlocked=False)
        line = f"{PROCESS} {span.name} 0 {span.npages}"
        if not span.filled:
            span.filled = True
            self._emit(f"write {line}")
        span.taken = 0
        self._emit(f"unlock {line}")

    def access(self, mem: Any, offset: int, size: int, write: bool) -> None:
        """Bytes [offset, offset+size) of mem were read or written through the library."""
        if size <= 0:
            return
        page = self.page
        first = offset // page
        count = (offset + size - 1) // page - first + 1
        span = self._span(mem, unlocked=not getattr(mem, "is_locked", False))
        if write and first == 0 and count >= span.npages:
            span.filled = True
        self._emit(f"{'write' if write else 'read'} {PROCESS} {span.name} {first} {count}")

    def close(self, mem: Any) -> None:
        """mem was closed: its pages are released."""
        span = self._spans.pop(id(mem), None)
        if span is not None:
            self._emit(f"munmap {PROCESS} {span.name}")

    def purge(self, mem: Any) -> None:
        """A policy discarded unlocked mem (a manager's limit or age, memory pressure, _purge)."""
        if mem is None:  # collected meanwhile: its release is recorded
            return
        span = self._span(mem)
        span.taken = span.npages
        self._emit(f"purge {PROCESS} {span.name} 0 {span.npages}")

    def reclaim(self, mem: Any, gone: int) -> None:
        """discache.force_reclaim made the kernel reclaim unlocked mem; `gone` pages went."""
        span = self._span(mem)
        span.taken += gone
        self._emit(f"pageout {PROCESS} {span.name} 0 {span.npages} {gone}")

    def detected(self, mem: Any, offset: int) -> None:
        """An access to unlocked mem found the page at offset purged (SIGBUS mode): the kernel
        took it before, so a `lost` line goes before the access."""
        span = self._span(mem)
        span.taken = span.npages
        access = self._lines[-1] if self._lines else ""
        if access.startswith(("read ", "write ")) and access.split()[2] == span.name:
            self._lines.pop()  # the access that faulted goes after the purge it found
            self.events -= 1
        else:
            access = f"read {PROCESS} {span.name} {offset // self.page} 1"
        self._emit(f"lost {PROCESS} {span.name} 0 {span.npages}")
        self._emit(access)


def _publish(recorder: Optional["Recorder"]) -> None:
    """Make recorder the one the library reports to (the compiled memory keeps its own copy)."""
    global active
    from . import _core

    active = recorder
    _core._set_recorder(recorder)


def start(path: str | os.PathLike) -> Recorder:
    """Start recording this process's discardable memory to path."""
    with _switch:
        if active is not None:
            raise RuntimeError(f"already recording a trace to {active.path}")
        _publish(Recorder(path))
        return active


def stop() -> Optional[Recorder]:
    """Stop recording; the file is complete.  Returns the recorder (None if none ran)."""
    with _switch:
        recorder = active
        _publish(None)
    if recorder is not None:
        recorder.finish()
    return recorder


@contextlib.contextmanager
def record_trace(path: str | os.PathLike) -> Iterator[Recorder]:
    """Record every allocation, lock, unlock, access, close, forced reclaim and detected purge of
    discardable memory in this process to path, as a trace `discache simulate --trace` replays."""
    recorder = start(path)
    try:
        yield recorder
    finally:
        if active is recorder:
            stop()


def _forget_in_child() -> None:
    # The parent records; a forked child is another process, not in its trace.
    _publish(None)


os.register_at_fork(after_in_child=_forget_in_child)


def start_from_environment() -> None:
    """Record the whole program when DISCACHE_TRACE names a file ("{pid}" in it: the process
    id, for programs that start others)."""
    path = os.environ.get(ENVIRONMENT)
    if not path or active is not None:
        return
    path = path.replace("{pid}", str(os.getpid()))
    try:
        start(path)
    except OSError as error:  # the program runs on, unrecorded: say so, do not stop it
        warnings.warn(f"{ENVIRONMENT}: cannot record to {path}: {error.strerror or error}",
                      RuntimeWarning, stacklevel=2)
        return
    atexit.register(stop)


__all__ = ["Recorder", "record_trace", "start", "stop"]
