"""The pressure monitor: real PSI triggers, discovery, the meminfo fallback, clean start/stop."""
import base64
import gc
import mmap
import os
import tempfile
import threading
import time

import pytest

from discache.pressure import (
    DEFAULT_TRIGGERS, PROC_PRESSURE, PressureMonitor, PressureUnavailableError, Trigger,
    cgroup_pressure_file, find_pressure_source, read_meminfo,
)

HAS_PSI = os.path.exists(PROC_PRESSURE)
needs_psi = pytest.mark.skipif(not HAS_PSI, reason="this kernel has no PSI (/proc/pressure)")


def armable_pressure_file():
    """A PSI file this process may arm a 2 s trigger on (the kernel refuses some), or None.

    Arming only registers a poll trigger for the open file; it changes no cgroup setting."""
    for path in filter(None, [cgroup_pressure_file(), PROC_PRESSURE]):
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.write(fd, b"some 500000 2000000\0")
            return path
        except OSError:
            pass
        finally:
            os.close(fd)
    return None


PSI_FILE = armable_pressure_file() if HAS_PSI else None
needs_trigger = pytest.mark.skipif(
    PSI_FILE is None, reason="this kernel refuses PSI triggers from this process (EINVAL/EPERM)")


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def psi_some_total():
    with open(PROC_PRESSURE) as f:
        return int(f.readline().split("total=")[1])


def open_fds():
    gc.collect()  # fds of earlier tests' garbage must not close in the middle of a comparison
    return set(os.listdir("/proc/self/fd"))


def monitor_threads():
    return [t for t in threading.enumerate() if t.name == "discache-pressure"]


class PageCacheThrash:
    """Real memory stall without using much memory: page a 64 MiB disk file out
    (MADV_PAGEOUT) and read it back, so that refaults of working-set pages stall."""

    SIZE = 64 << 20

    def __init__(self, directory):
        self.path = os.path.join(directory, "thrash.bin")
        with open(self.path, "wb") as f:
            for _ in range(self.SIZE >> 20):
                f.write(os.urandom(1 << 20))
            f.flush()
            os.fsync(f.fileno())  # MADV_PAGEOUT skips dirty pages
        self.fd = os.open(self.path, os.O_RDONLY)
        self.map = mmap.mmap(self.fd, self.SIZE, prot=mmap.PROT_READ)

    def round(self):
        for _ in range(2):
            for offset in range(0, self.SIZE, mmap.PAGESIZE):
                self.map[offset]
        self.map.madvise(21)  # MADV_PAGEOUT

    def close(self):
        self.map.close()
        os.close(self.fd)
        os.unlink(self.path)


@pytest.fixture
def thrash():
    directory = tempfile.mkdtemp(dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    t = PageCacheThrash(directory)
    yield t
    t.close()
    os.rmdir(directory)


@needs_trigger
def test_a_real_psi_trigger_reports_real_stall(thrash):
    levels = []
    trigger = Trigger("some", 10_000, 2_000_000, "moderate")
    with PressureMonitor(levels.append, path=PSI_FILE, triggers=[trigger]) as monitor:
        assert monitor.source == "psi"
        before = psi_some_total()
        deadline = time.monotonic() + 20
        while not monitor.events["moderate"] and time.monotonic() < deadline:
            thrash.round()
        stalled_us = psi_some_total() - before
        if stalled_us < 10_000 and not monitor.events["moderate"]:
            pytest.skip(f"could not cause real memory stall here (only {stalled_us} us)")
        assert wait_for(lambda: monitor.events["moderate"] >= 1, 5), (stalled_us, monitor)
    assert levels and set(levels) == {"moderate"}
    assert monitor.error is None


def test_discovery_prefers_systemd_then_cgroup_then_proc(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMORY_PRESSURE_WATCH", str(tmp_path / "watch"))
    assert find_pressure_source() == (str(tmp_path / "watch"), "MEMORY_PRESSURE_WATCH (set by systemd)")
    monkeypatch.setenv("MEMORY_PRESSURE_WATCH", "/dev/null")  # systemd's "disabled"
    if HAS_PSI:
        path, why = find_pressure_source()
        assert path.endswith("memory.pressure") or path == PROC_PRESSURE
        with open(path) as f:
            assert f.read().startswith("some avg10=")
    monkeypatch.delenv("MEMORY_PRESSURE_WATCH")


@needs_trigger
def test_systemd_trigger_is_written_as_given(monkeypatch):
    monkeypatch.setenv("MEMORY_PRESSURE_WATCH", PSI_FILE)
    monkeypatch.setenv("MEMORY_PRESSURE_WRITE",
                       base64.b64encode(b"some 50000 2000000").decode())
    with PressureMonitor(lambda level: None, source="psi") as monitor:
        assert monitor.path == PSI_FILE
        assert len(monitor._fds) == 1
    monkeypatch.setenv("MEMORY_PRESSURE_WRITE", base64.b64encode(b"nonsense").decode())
    with pytest.raises(PressureUnavailableError, match="cannot arm"):
        PressureMonitor(lambda level: None, source="psi").start()


@needs_trigger
def test_start_stop_leaks_no_thread_and_no_fd():
    fds = open_fds()
    for _ in range(20):
        monitor = PressureMonitor(lambda level: None, path=PSI_FILE).start()
        assert monitor.source == "psi"
        assert monitor.running and len(monitor_threads()) == 1
        monitor.stop()
        monitor.stop()  # twice is fine
        assert not monitor.running
    assert monitor_threads() == []
    assert open_fds() == fds


def test_auto_falls_back_to_meminfo_when_the_kernel_refuses_triggers(tmp_path):
    if PSI_FILE is not None and HAS_PSI and PSI_FILE != PROC_PRESSURE:
        # /proc/pressure may refuse where the cgroup file accepts: then auto must still work.
        with PressureMonitor(lambda level: None, path=PROC_PRESSURE) as monitor:
            assert monitor.source in ("psi", "meminfo")
            assert monitor.running
    with PressureMonitor(lambda level: None) as monitor:
        assert monitor.running
        assert monitor.source == ("psi" if PSI_FILE else "meminfo"), monitor.reason


def test_meminfo_fallback_reports_levels_and_stops_cleanly():
    fds = open_fds()
    levels = []
    info = read_meminfo()
    free = info["MemAvailable"] / info["MemTotal"]
    # Thresholds around the real free fraction: first "moderate", then "critical".
    with PressureMonitor(levels.append, source="meminfo", meminfo_interval=0.01,
                         meminfo_thresholds=(min(1.0, free + 0.05), 0.0)) as monitor:
        assert monitor.source == "meminfo"
        assert wait_for(lambda: len(levels) >= 2, 5)
    assert set(levels) == {"moderate"}
    levels.clear()
    with PressureMonitor(levels.append, source="meminfo", meminfo_interval=0.01,
                         meminfo_thresholds=(1.0, 1.0)):
        assert wait_for(lambda: len(levels) >= 2, 5)
    assert set(levels) == {"critical"}
    assert monitor_threads() == [] and open_fds() == fds


def test_a_failing_callback_does_not_stop_monitoring():
    calls = []

    def callback(level):
        calls.append(level)
        raise RuntimeError("boom")

    with PressureMonitor(callback, source="meminfo", meminfo_interval=0.01,
                         meminfo_thresholds=(1.0, 0.0)) as monitor:
        assert wait_for(lambda: len(calls) >= 3, 5)
        assert monitor.running and monitor.error is None


def test_unprivileged_windows_are_rounded_to_two_seconds():
    t = Trigger("some", 100_000, 1_000_000, "moderate").for_unprivileged()
    assert (t.stall_us, t.window_us) == (200_000, 2_000_000)
    t = Trigger("full", 150_000, 2_000_000, "critical").for_unprivileged()
    assert (t.stall_us, t.window_us) == (150_000, 2_000_000)
    assert all(t.window_us % 2_000_000 == 0 for t in DEFAULT_TRIGGERS)


@pytest.mark.parametrize("args, match", [
    (("half", 1, 1_000_000, "moderate"), "kind"),
    (("some", 1, 1_000_000, "severe"), "level"),
    (("some", 1, 100, "moderate"), "window_us"),
    (("some", 0, 1_000_000, "moderate"), "stall_us"),
    (("some", 2_000_000, 1_000_000, "moderate"), "stall_us"),
])
def test_bad_triggers(args, match):
    with pytest.raises(ValueError, match=match):
        Trigger(*args)


def test_bad_monitor_arguments(tmp_path):
    with pytest.raises(ValueError, match="source"):
        PressureMonitor(print, source="dmesg")
    with pytest.raises(TypeError, match="callable"):
        PressureMonitor("print")
    with pytest.raises(ValueError, match="thresholds"):
        PressureMonitor(print, source="meminfo", meminfo_thresholds=(0.05, 0.10))
    with pytest.raises(ValueError, match="interval"):
        PressureMonitor(print, source="meminfo", meminfo_interval=0)
    with pytest.raises(ValueError, match="trigger"):
        PressureMonitor(print, triggers=[])
    not_psi = tmp_path / "memory.pressure"
    not_psi.write_text("hello")
    fds = open_fds()
    with pytest.raises(PressureUnavailableError, match="not a PSI"):
        PressureMonitor(print, path=str(not_psi)).start()
    assert open_fds() == fds
    with pytest.raises(PressureUnavailableError, match="cannot read"):
        PressureMonitor(print, path=str(tmp_path / "missing")).start()
    monitor = PressureMonitor(print, source="meminfo").start()
    with pytest.raises(RuntimeError, match="already started"):
        monitor.start()
    monitor.stop()


@needs_trigger
def test_real_stall_makes_the_manager_purge(thrash):
    from discache.manager import PAGE, DiscardableMemoryManager

    manager = DiscardableMemoryManager(16 * PAGE, "madvfree", segment_bytes=16 * PAGE)
    mems = [manager.allocate(2 * PAGE) for _ in range(8)]
    for mem in mems:
        mem.unlock()
    trigger = Trigger("some", 10_000, 2_000_000, "moderate")
    manager.watch_pressure(path=PSI_FILE, triggers=[trigger])
    try:
        deadline = time.monotonic() + 20
        while not manager.counters["pressure_moderate"] and time.monotonic() < deadline:
            thrash.round()
        if not manager.counters["pressure_moderate"]:
            pytest.skip("could not cause real memory stall here")
    finally:
        manager.stop()
    assert manager.bytes_resident <= manager.limit // 2, "moderate: down to half the limit"
    assert sum(not mem.lock() for mem in mems) >= 4
    assert monitor_threads() == []
