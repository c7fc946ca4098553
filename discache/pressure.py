"""Memory-pressure monitoring: Linux PSI triggers (or /proc/meminfo where PSI is missing)."""
from __future__ import annotations

import base64
import logging
import os
import select
import stat
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from .errors import DiscacheError

log = logging.getLogger(__name__)

LEVELS = ("moderate", "critical")
PROC_PRESSURE = "/proc/pressure/memory"
UNPRIVILEGED_WINDOW_US = 2_000_000  # the kernel only takes multiples of 2 s from non-root


class PressureUnavailableError(DiscacheError):
    """No source of memory-pressure events on this machine; the message says why."""


@dataclass(frozen=True)
class Trigger:
    """A PSI trigger: report `level` when tasks stall `stall_us` within `window_us`."""

    kind: str  # "some" (any task stalled) or "full" (all non-idle tasks stalled)
    stall_us: int
    window_us: int
    level: str

    def __post_init__(self) -> None:
        if self.kind not in ("some", "full"):
            raise ValueError(f"trigger kind must be 'some' or 'full', got {self.kind!r}")
        if self.level not in LEVELS:
            raise ValueError(f"trigger level must be one of {LEVELS}, got {self.level!r}")
        if not 500_000 <= self.window_us <= 10_000_000:
            raise ValueError(f"window_us must be 500000..10000000, got {self.window_us}")
        if not 0 < self.stall_us <= self.window_us:
            raise ValueError(f"stall_us must be in 1..window_us, got {self.stall_us}")

    def text(self) -> bytes:
        """What is written to the pressure file to arm this trigger."""
        return f"{self.kind} {self.stall_us} {self.window_us}".encode() + b"\0"

    def for_unprivileged(self) -> "Trigger":
        """The same trigger with its window rounded up to the 2 s multiples non-root may use."""
        window = -(-self.window_us // UNPRIVILEGED_WINDOW_US) * UNPRIVILEGED_WINDOW_US
        stall = max(1, self.stall_us * window // self.window_us)
        return Trigger(self.kind, stall, window, self.level)


# Moderate: some task stalled 5% of 2 s; critical: every task stalled 5% of 2 s.
DEFAULT_TRIGGERS = (
    Trigger("some", 100_000, 2_000_000, "moderate"),
    Trigger("full", 100_000, 2_000_000, "critical"),
)


def cgroup_pressure_file() -> Optional[str]:
    """This process's cgroup v2 memory.pressure, or None when there is none."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = next((line.strip()[3:] for line in f if line.startswith("0::")), None)
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    if rel is None:
        return None
    for fields in mounts:
        sep = fields.index("-")
        if fields[sep + 1] == "cgroup2":
            path = os.path.join(fields[4], rel.lstrip("/"), "memory.pressure")
            if os.path.exists(path):
                return path
    return None


def find_pressure_source() -> tuple[str, str]:
    """(path, why) of the PSI file to watch: systemd's, the cgroup's, or the system's."""
    watch = os.environ.get("MEMORY_PRESSURE_WATCH")
    if watch and watch != "/dev/null":
        return watch, "MEMORY_PRESSURE_WATCH (set by systemd)"
    cgroup = cgroup_pressure_file()
    if cgroup:
        return cgroup, "this process's cgroup"
    if os.path.exists(PROC_PRESSURE):
        return PROC_PRESSURE, "the whole system"
    raise PressureUnavailableError(
        "no PSI memory pressure file: the kernel lacks CONFIG_PSI or was booted with psi=0; "
        "use source='meminfo' to watch MemAvailable instead")


def may_use_short_windows() -> bool:
    """Only CAP_SYS_RESOURCE may arm windows that are not multiples of 2 s (root may lack it)."""
    try:
        with open("/proc/self/status") as f:
            caps = next(line for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caps.split()[1], 16) >> 24 & 1)


def systemd_trigger() -> Optional[bytes]:
    """The trigger systemd asks services to write (MEMORY_PRESSURE_WRITE, base64), if any."""
    data = os.environ.get("MEMORY_PRESSURE_WRITE")
    return base64.b64decode(data) if data else None


def read_meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            parts = value.split()
            out[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


class PressureMonitor:
    """Calls `callback(level)` from a daemon thread when the kernel reports memory pressure.

    source="auto" uses PSI where present, else polls /proc/meminfo; "psi" or "meminfo" force one.
    """

    def __init__(
        self,
        callback: Callable[[str], None],
        *,
        source: str = "auto",
        path: Optional[str] = None,
        triggers: Iterable[Trigger] = DEFAULT_TRIGGERS,
        meminfo_interval: float = 1.0,
        meminfo_thresholds: tuple[float, float] = (0.10, 0.05),
    ) -> None:
        if source not in ("auto", "psi", "meminfo"):
            raise ValueError(f"source must be 'auto', 'psi' or 'meminfo', got {source!r}")
        if not callable(callback):
            raise TypeError("callback must be callable")
        moderate, critical = meminfo_thresholds
        if not 0 <= critical <= moderate <= 1:
            raise ValueError("meminfo_thresholds must be (moderate, critical), 1 >= m >= c >= 0")
        if meminfo_interval <= 0:
            raise ValueError(f"meminfo_interval must be positive, got {meminfo_interval}")
        self.callback = callback
        self.triggers = tuple(triggers)
        if not self.triggers:
            raise ValueError("at least one trigger is needed")
        self.meminfo_interval = meminfo_interval
        self.meminfo_thresholds = (moderate, critical)
        self.events: Counter = Counter()
        self.error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._fds: list[tuple[int, str]] = []
        self._wake_r = self._wake_w = -1
        self.requested = "psi" if path is not None and source == "auto" else source
        self.source, self.path, self.reason = self._choose(source, path)

    def _choose(self, source: str, path: Optional[str]) -> tuple[str, Optional[str], str]:
        if source == "meminfo":
            return "meminfo", "/proc/meminfo", "asked for"
        if path is not None:
            return "psi", path, "given"
        try:
            found, why = find_pressure_source()
            return "psi", found, why
        except PressureUnavailableError as exc:
            if source == "psi":
                raise
            return "meminfo", "/proc/meminfo", f"PSI unavailable: {exc}"

    @property
    def running(self) -> bool:
        """True while the monitoring thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "PressureMonitor":
        """Arm the triggers (errors raise here, in the caller's thread) and start watching."""
        if self._thread is not None:
            raise RuntimeError("the monitor is already started")
        if self.source == "psi":
            try:
                self._arm()
            except PressureUnavailableError as exc:
                if self.requested != "auto":
                    raise
                self.source, self.path, self.reason = "meminfo", "/proc/meminfo", str(exc)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        target = self._watch_psi if self.source == "psi" else self._watch_meminfo
        self._thread = threading.Thread(target=target, name="discache-pressure", daemon=True)
        self._thread.start()
        return self

    def _arm(self) -> None:
        custom = systemd_trigger() if self.path == os.environ.get("MEMORY_PRESSURE_WATCH") else None
        wanted: list[tuple[bytes, str]]
        self._check_psi_file()
        if custom is not None:
            wanted = [(custom, "moderate")]
        else:
            unprivileged = not may_use_short_windows()
            wanted = [((t.for_unprivileged() if unprivileged else t).text(), t.level)
                      for t in self.triggers]
        try:
            for text, level in wanted:
                fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                self._fds.append((fd, level))
                os.write(fd, text)
        except OSError as exc:
            self._close_fds()
            hint = (" (this kernel takes triggers on /proc/pressure only from CAP_SYS_RESOURCE)"
                    if self.path == PROC_PRESSURE else "")
            raise PressureUnavailableError(
                f"cannot arm a PSI trigger on {self.path}: {exc}{hint}") from exc

    def _check_psi_file(self) -> None:
        """Refuse a regular file that is not a PSI file: its triggers would never fire."""
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                return  # systemd may hand over a FIFO or socket instead
            with open(self.path, "rb") as f:
                head = f.read(11)
        except OSError as exc:
            raise PressureUnavailableError(f"cannot read {self.path}: {exc}") from exc
        if head != b"some avg10=":
            raise PressureUnavailableError(f"{self.path} is not a PSI pressure file")

    def _report(self, level: str) -> None:
        self.events[level] += 1
        try:
            self.callback(level)
        except Exception:  # a failing callback must not end the monitoring
            log.exception("discache pressure callback failed for level %r", level)

    def _watch_psi(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        levels = {}
        for fd, level in self._fds:
            poller.register(fd, select.POLLPRI)
            levels[fd] = level
        try:
            while True:
                for fd, mask in poller.poll():
                    if fd == self._wake_r:
                        return
                    if mask & select.POLLERR:
                        raise PressureUnavailableError(f"{self.path} went away")
                    if mask & select.POLLPRI:
                        self._report(levels[fd])
        except BaseException as exc:
            self.error = exc

    def _watch_meminfo(self) -> None:
        moderate, critical = self.meminfo_thresholds
        try:
            while True:
                info = read_meminfo()
                free = info["MemAvailable"] / info["MemTotal"]
                if free <= critical:
                    self._report("critical")
                elif free <= moderate:
                    self._report("moderate")
                ready, _, _ = select.select([self._wake_r], [], [], self.meminfo_interval)
                if ready:
                    return
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        """Stop the thread and close every file descriptor; safe to call twice."""
        if self._thread is not None:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
            self._thread.join()
            self._thread = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._close_fds()

    def _close_fds(self) -> None:
        for fd, _ in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> "PressureMonitor":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"PressureMonitor(source={self.source!r}, path={self.path!r}, "
                f"running={self.running}, events={dict(self.events)})")

