"""Careless use of SIGBUS mode and of unlock (issue 11, items 5, 6, 7 and 11): nothing hangs,
nothing dies that would not die without discache, and unlock never makes untouched pages
resident.  What may kill the interpreter runs in a subprocess."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import discache
from discache import _core, backends
from kernel_reclaim import reclaim

PAGE = _core.page_size()
MIB = 1 << 20
SIGBUS_RUNS = dict((info.name, info) for info in backends.available())["madvfree-sigbus"]
needs_sigbus = pytest.mark.skipif(not SIGBUS_RUNS.available,
                                  reason=f"madvfree-sigbus does not run here: {SIGBUS_RUNS.reason}")

# Every script starts with four pages of SIGBUS-mode memory holding data, unlocked, and a way
# to read it behind discache's back.
PRELUDE = """
import ctypes, faulthandler, os, signal, sys
import discache
def raw_read(mem, offset=0):
    return ctypes.string_at(mem.address + offset, 1)
"""
MAKE_MEM = """
mem = discache.allocate(4 * 4096, sigbus=True)
mem.data[:] = b"\\x07" * mem.nbytes
mem.unlock()
"""


def run(body: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run PRELUDE + body in a new interpreter; a hang fails the test (TimeoutExpired)."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---- item 5: the handler is checked again at lock() ----

REPLACEMENTS = {
    "faulthandler.enable()": "faulthandler.enable()",
    "SIG_DFL": "signal.signal(signal.SIGBUS, signal.SIG_DFL)",
    "SIG_IGN": "signal.signal(signal.SIGBUS, signal.SIG_IGN)",
    "python handler": "signal.signal(signal.SIGBUS, lambda *a: None)",
}


@needs_sigbus
@pytest.mark.parametrize("replace", REPLACEMENTS.values(), ids=REPLACEMENTS.keys())
def test_lock_of_purged_memory_survives_a_handler_replaced_after_unlock(replace):
    result = run(MAKE_MEM + replace + """
assert mem._purge() == mem.npages
print(mem.lock(), mem.purged_pages, bytes(mem.data[:3]), flush=True)
mem.unlock(); mem._purge()
try:
    mem.read(0, 1)
except discache.PurgedPageError:
    print("guarded", flush=True)
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "False 4 b'\\x00\\x00\\x00'\nguarded\n"


# ---- item 6: no ping-pong with faulthandler ----

@needs_sigbus
@pytest.mark.parametrize("guarded_calls", [1, 3])
def test_faulthandler_enabled_after_allocation_reports_a_raw_fault_once(guarded_calls):
    # faulthandler restores the handler it replaced (ours) and raises again; we must not chain
    # back to it: one traceback, then death by SIGBUS, as without discache.
    result = run(MAKE_MEM + f"""
faulthandler.enable()
for _ in range({guarded_calls}):
    assert mem.read(0, 1) == b"\\x07"   # a guarded read puts our handler back over faulthandler
mem._purge()
print("raw access", flush=True)
raw_read(mem, 4096)
print("survived", flush=True)
""")
    assert result.stdout == "raw access\n"
    assert result.returncode == -signal.SIGBUS, result.stderr[-2000:]
    assert result.stderr.count("Fatal Python error: Bus error") == 1, result.stderr[-2000:]


@needs_sigbus
def test_faulthandler_enabled_before_and_after_still_dies_once():
    result = run("faulthandler.enable()\n" + MAKE_MEM + """
faulthandler.disable(); faulthandler.enable()
mem.read(0, 1); mem._purge()
raw_read(mem)
print("survived", flush=True)
""")
    assert result.returncode == -signal.SIGBUS
    assert "survived" not in result.stdout
    assert result.stderr.count("Fatal Python error: Bus error") == 1, result.stderr[-2000:]


# ---- item 7: an ignored SIGBUS does not turn a fault into a busy loop ----

@needs_sigbus
@pytest.mark.parametrize("when", ["before allocating", "after allocating"])
def test_raw_access_to_a_purged_page_with_sigbus_ignored_dies_by_sigbus(when):
    ignore = "signal.signal(signal.SIGBUS, signal.SIG_IGN)\n"
    body = (ignore + MAKE_MEM if when == "before allocating" else MAKE_MEM + ignore) + """
assert mem.read(4096, 1) == b"\\x07"   # guarded accesses still work
mem._purge()
try:
    mem.read(0, 1)
except discache.PurgedPageError:
    print("guarded", flush=True)
raw_read(mem)
print("survived", flush=True)
"""
    result = run(body, timeout=30)
    assert result.stdout == "guarded\n"
    assert result.returncode == -signal.SIGBUS, result.stderr[-2000:]


@needs_sigbus
def test_an_ignored_sigbus_sent_by_kill_stays_ignored():
    # Only a fault cannot be ignored; a SIGBUS sent by another process is ignored as asked.
    result = run("signal.signal(signal.SIGBUS, signal.SIG_IGN)\n" + MAKE_MEM + """
os.kill(os.getpid(), signal.SIGBUS)
mem._purge()
try:
    mem.read(0, 1)
except discache.PurgedPageError:
    print("still alive and guarded", flush=True)
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "still alive and guarded\n"


@needs_sigbus
def test_a_sigbus_sent_by_kill_with_no_previous_handler_kills():
    result = run(MAKE_MEM + """
os.kill(os.getpid(), signal.SIGBUS)
print("survived", flush=True)
""")
    assert result.returncode == -signal.SIGBUS and result.stdout == ""


# ---- item 11: unlock never makes untouched pages resident ----

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def mapping_rss(address: int) -> int:
    """Rss of the mapping starting at address, from /proc/self/smaps (zero pages not counted)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                inside = int(head.split("-")[0], 16) == address
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping at {address:#x}")


def mincore_resident(address: int, npages: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    vec = (ctypes.c_ubyte * npages)()
    if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(npages * PAGE), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(v & 1 for v in vec)


def test_unlock_of_never_written_memory_keeps_it_out_of_ram():
    mem = discache.allocate(256 * MIB, "madvfree")
    try:
        before = rss_bytes()
        mem.unlock()
        assert mem._resident_pages() == 0
        assert mem.lock() is True and mem.purged_pages == 0
        assert mem._resident_pages() == 0
        assert rss_bytes() - before < 8 * MIB
        assert mem.read(mem.nbytes - 8, 8) == bytes(8)
    finally:
        mem.close()


def test_only_written_pages_get_cookies_and_only_they_can_be_purged():
    mem = discache.allocate(64 * MIB, "madvfree")
    try:
        written = [0, 1, 2, 1000, mem.npages - 1]
        for page in written:
            mem.write(b"data%d" % page, page * PAGE)
        mem.unlock()
        assert mem._resident_pages() == len(written)
        assert mem.lock() is True
        for page in written:
            assert mem.read(page * PAGE, 12).startswith(b"data%d" % page)
        mem.unlock()
        gone = reclaim(mem, at_least=1)
        assert gone <= set(range(mem.npages))
        assert mem.lock() is False
        assert mem.purged_pages == len(gone & set(written))
        assert mem._resident_pages() == len(written)  # the lock re-dirtied exactly these
        for page in set(written) - gone:
            assert mem.read(page * PAGE, 12).startswith(b"data%d" % page)
    finally:
        mem.close()


def test_a_page_holding_the_untouched_mark_is_still_checked():
    # The saved word of an untouched page is a mark; a page whose own first word equals it must
    # still be restored when intact and reported when purged.
    mark = _core._COOKIE_UNTOUCHED_MARK.to_bytes(8, sys.byteorder)
    mem = discache.allocate(2 * _core._COOKIE_MINCORE_PAGES * PAGE, "madvfree")
    try:
        for page in range(mem.npages):
            mem.write(mark if page % 2 == 0 else (mark[0] ^ 1).to_bytes(1, "little") + mark[1:],
                      page * PAGE)
        mem.unlock()
        assert mem.lock() is True
        assert mem.read(0, 8) == mark and mem.read(2 * PAGE, 8) == mark
        mem.unlock()
        gone = reclaim(mem, at_least=1)
        assert mem.lock() is False and mem.purged_pages == len(gone)
        for page in set(range(mem.npages)) - gone:
            assert mem.read(page * PAGE, 8)[1:] == mark[1:]
    finally:
        mem.close()


def test_pagemap_tells_no_swapped_page_in_resident_memory():
    # What unlock reads when swap is configured (this machine has none: only the read is tested).
    mem = discache.allocate(_core._COOKIE_MINCORE_PAGES * PAGE, "madvfree")
    try:
        mem.data[:] = b"\x01" * mem.nbytes
        assert _core._swapped_pages(mem.address, mem.npages) == 0
    finally:
        mem.close()


def test_small_ranges_keep_the_blind_cookie_path():
    # Below the mincore threshold every page gets its cookie (no system call added), so a
    # never-written page can be discarded and is reported: a false "purged", never a false
    # "intact".
    mem = discache.allocate(PAGE, "madvfree")
    try:
        mem.unlock()
        assert mem._resident_pages() == 1
        reclaim(mem, at_least=1)
        assert mem.lock() is False
    finally:
        mem.close()


def test_segment_spans_of_never_written_pages_stay_out_of_ram():
    npages = 64 * MIB // PAGE
    segment = _core.Segment(npages, "madvfree")
    try:
        segment.unlock_span(0, npages)
        assert segment.resident_pages() == 0
        assert segment.lock_span(0, npages) == 0
        segment.write(5 * PAGE, b"kept")
        segment.unlock_spans([(0, 100), (100, npages - 100)])
        assert segment.resident_pages() == 1
        assert segment.lock_span(0, npages) == 0
        assert segment.read(5 * PAGE, 4) == b"kept"
        assert mincore_resident(segment.address, npages) == 1
    finally:
        segment.close()


@needs_sigbus
def test_sigbus_allocation_and_unlock_keep_never_written_memory_out_of_ram():
    mem = discache.allocate(128 * MIB, sigbus=True)
    try:
        assert mapping_rss(mem.address) < MIB
        mem.data[7 * PAGE] = ord("x")
        mem.unlock()
        assert mapping_rss(mem.address) < MIB
        assert mem.read(mem.nbytes - 4, 4) == bytes(4)  # zeros, not a PurgedPageError
        assert mem.read(7 * PAGE, 1) == b"x"
        mem._pageout(first=0, count=mem.npages)
        assert mem.read(100 * PAGE, 4) == bytes(4)      # never written: never discarded
    finally:
        mem.close()
