"""SIGBUS mode: a purged page raises PurgedPageError through the accessors; nothing dies."""
from __future__ import annotations

import faulthandler
import os
import subprocess
import sys
import textwrap
import threading

import pytest

import discache
from discache import _core, backends
from kernel_reclaim import reclaim

PAGE = _core.page_size()

_runs = dict((info.name, info) for info in backends.available())["madvfree-sigbus"]
pytestmark = pytest.mark.skipif(
    not _runs.available, reason=f"madvfree-sigbus does not run here: {_runs.reason}")


@pytest.fixture
def mem():
    """Four pages of SIGBUS-mode memory holding a pattern, unlocked."""
    mem = discache.allocate(4 * PAGE, sigbus=True)
    mem.data[:] = bytes(range(256)) * (4 * PAGE // 256)
    mem.unlock()
    yield mem
    mem.close()


def purge(mem) -> None:
    """Discard every page now by MADV_DONTNEED (exact); kernel reclaim is tested below."""
    assert mem._purge() == mem.npages


def test_reads_after_kernel_reclaim_raise_on_exactly_the_reclaimed_pages(mem):
    gone = reclaim(mem, at_least=2)
    for page in range(mem.npages):
        if page in gone:
            with pytest.raises(discache.PurgedPageError) as info:
                mem.read(page * PAGE, 1)
            assert info.value.address == mem.address + page * PAGE
        else:
            assert mem.read(page * PAGE, 4) == bytes(range(4))
    assert mem.lock() is False and mem.purged_pages == len(gone)


def test_sigbus_mode_is_the_madvfree_sigbus_backend():
    mem = discache.allocate(PAGE, "madvfree", sigbus=True)
    try:
        assert mem.backend == "madvfree-sigbus" and mem.sigbus
    finally:
        mem.close()


def test_unlocked_intact_memory_reads_through_the_accessors(mem):
    assert mem.read(0, 4) == bytes(range(4))
    target = bytearray(3)
    assert mem.readinto(target, PAGE + 1) == 3 and target == bytes((1, 2, 3))
    assert mem.write(b"abc", 2 * PAGE) == 3
    assert mem.lock() is True
    assert mem.read(2 * PAGE, 3) == b"abc"


def test_reading_a_purged_page_raises_purged_page_error(mem):
    assert faulthandler.is_enabled()  # pytest's handler must keep working beside ours
    purge(mem)
    with pytest.raises(discache.PurgedPageError) as info:
        mem.read(PAGE + 10, 5)
    assert info.value.address == mem.address + PAGE
    assert isinstance(info.value, discache.PurgedError)
    with pytest.raises(discache.PurgedPageError):
        mem.readinto(bytearray(10), 3 * PAGE)
    # A purged page keeps faulting until it is filled: the error repeats, never zeros.
    with pytest.raises(discache.PurgedPageError):
        mem.read(0, 1)


def test_writing_a_purged_page_raises_and_writes_nothing(mem):
    purge(mem)
    with pytest.raises(discache.PurgedPageError) as info:
        mem.write(b"xyz", 2 * PAGE - 1)
    assert info.value.address == mem.address + PAGE
    assert mem.lock() is False
    assert mem.purged_pages == 4
    assert mem.read() == bytes(4 * PAGE)


def test_lock_after_purge_fills_the_pages(mem):
    purge(mem)
    assert mem.lock() is False
    assert bytes(mem.data) == bytes(4 * PAGE)  # raw access is safe again: no SIGBUS
    mem.data[:3] = b"new"
    mem.unlock()
    assert mem.read(0, 3) == b"new"
    assert mem.lock() is True


def test_policy_purge_raises_too(mem):
    allocator_purged = mem._purge()
    assert allocator_purged == 4
    with pytest.raises(discache.PurgedPageError):
        mem.read(0, 1)
    assert mem.lock() is False


def test_guarded_reads_work_in_other_threads(mem):
    purge(mem)
    errors = []

    def reader():
        try:
            mem.read(0, 1)
        except discache.PurgedPageError as error:
            errors.append(error)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 4 and all(e.address == mem.address for e in errors)


def test_raw_access_is_only_offered_while_locked(mem):
    with pytest.raises(RuntimeError, match="unlocked"):
        mem.data
    with pytest.raises(RuntimeError, match="unlocked"):
        memoryview(mem)


def test_many_purges_and_faults_keep_the_interpreter_alive():
    mem = discache.allocate(32 * PAGE, sigbus=True)
    try:
        for round_ in range(20):
            mem.data[:] = bytes([round_ + 1]) * mem.nbytes
            mem.unlock()
            purge(mem)
            for page in range(0, 32, 3):
                with pytest.raises(discache.PurgedPageError):
                    mem.read(page * PAGE, 1)
            assert mem.lock() is False and mem.purged_pages == 32
    finally:
        mem.close()


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_foreign_sigbus_still_reaches_faulthandler():
    # A SIGBUS outside discache's guarded accesses (here: touching a truncated file mapping)
    # must go to the previous handler, faulthandler, and kill the process as it would without us.
    result = _run("""
        import faulthandler, mmap, os, tempfile
        faulthandler.enable()
        import discache
        mem = discache.allocate(4096, sigbus=True)
        mem.unlock(); discache.force_reclaim(mem)
        try:
            mem.read(0, 1)
        except discache.PurgedPageError:
            print("caught ours", flush=True)
        with tempfile.TemporaryFile() as f:
            f.truncate(4096)
            m = mmap.mmap(f.fileno(), 4096)
            f.truncate(0)
            m[0]
        print("survived a foreign SIGBUS", flush=True)
    """)
    assert "caught ours" in result.stdout
    assert "survived" not in result.stdout
    assert result.returncode == -7  # SIGBUS
    assert "Fatal Python error: Bus error" in result.stderr


def test_handler_is_reinstalled_after_faulthandler_takes_sigbus_back():
    result = _run("""
        import faulthandler
        import discache
        mem = discache.allocate(4096, sigbus=True)
        mem.unlock(); discache.force_reclaim(mem)
        faulthandler.enable()  # installs its handler over ours
        try:
            mem.read(0, 1)
        except discache.PurgedPageError:
            print("caught", flush=True)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "caught\n"


def test_a_forked_child_keeps_sigbus_mode(mem):
    # fork() drops the userfaultfd registration; the child registers the mapping again.
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only, never return into pytest
        code = 1
        try:
            assert mem.read(0, 4) == bytes(range(4))
            # Pages shared with the parent are not paged out; make them the child's own first.
            assert mem.lock() is True
            mem.data[:] = b"child" * (mem.nbytes // 5) + b"c" * (mem.nbytes % 5)
            mem.unlock()
            gone = min(reclaim(mem))
            try:
                mem.read(gone * PAGE, 1)
            except discache.PurgedPageError:
                code = 0 if mem.lock() is False and mem.purged_pages >= 1 else 3
            else:
                code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's registration is untouched: its pages are still there, and still guarded.
    assert mem.read(0, 4) == bytes(range(4))
    purge(mem)
    with pytest.raises(discache.PurgedPageError):
        mem.read(0, 1)
