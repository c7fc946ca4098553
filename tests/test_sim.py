"""The simulated kernel: every rule of issue 3, run against both unmark strategies."""
from __future__ import annotations

import errno
import threading

import pytest

from discache import PurgedPageError
from discache.sim import (
    MADV_DONTNEED,
    MADV_FREE,
    MADV_NONVOLATILE,
    MADV_VOLATILE,
    MADV_VOLATILE_ZEROFILL,
    VA_BASE,
    SimulatedKernel,
)

PS = 4096


@pytest.fixture(params=["token", "walk"])
def strategy(request):
    return request.param


@pytest.fixture
def kernel(strategy):
    return SimulatedKernel(ram_pages=64, swap_pages=0, page_size=PS, strategy=strategy)


def filled(p, npages, byte=b"d"):
    """A private mapping of npages, every page written with a recognisable pattern."""
    a = p.mmap(npages * PS)
    for i in range(npages):
        p.write(a + i * PS, byte * 8 + bytes([i]))
    return a


def pattern(byte, i):
    return byte * 8 + bytes([i])


# ------------------------------------------------------------------ basics


def test_mmap_read_write_and_alignment(kernel):
    p = kernel.spawn()
    a = p.mmap(3 * PS)
    b = p.mmap(100)  # rounded up to one page, as Linux does
    assert a % PS == 0 and b % PS == 0 and b >= a + 3 * PS
    data = bytes(range(256)) * 40
    p.write(a + 7, data)
    assert p.read(a + 7, len(data)) == data
    assert p.read(a, 7) == bytes(7)
    assert p.read(b, 100) == bytes(100)


def test_untouched_pages_use_no_frames(kernel):
    p = kernel.spawn()
    p.mmap(1000 * PS)  # more than RAM: virtual space is not RAM
    assert kernel.stats()["used_pages"] == 0


# ------------------------------------------------------------------ volatility and purges


def test_reads_and_writes_keep_volatility(kernel):
    p = kernel.spawn()
    a = filled(p, 4)
    assert p.madvise(a, 4 * PS, MADV_VOLATILE) == 0
    p.write(a, b"new")
    assert p.read(a, 3) == b"new"
    assert p.volatile_pages() == 4
    assert kernel.volatile_pages() == 4
    assert kernel.reclaim(4) == 4
    assert p.madvise(a, 4 * PS, MADV_NONVOLATILE) == 1


def test_nonvolatile_reports_no_purge(kernel):
    p = kernel.spawn()
    a = filled(p, 4)
    p.madvise(a, 4 * PS, MADV_VOLATILE)
    assert p.madvise(a, 4 * PS, MADV_NONVOLATILE) == 0
    assert p.read(a, 9) == pattern(b"d", 0)
    assert kernel.reclaim(10) == 0  # nothing volatile any more: locked memory is never purged
    assert p.read(a + 3 * PS, 9) == pattern(b"d", 3)


def test_sigbus_on_purged_volatile_page(kernel):
    p = kernel.spawn()
    a = filled(p, 4)
    p.madvise(a, 4 * PS, MADV_VOLATILE)
    assert kernel.reclaim(1) == 1  # a lap clears the referenced bits, the next takes page 0
    with pytest.raises(PurgedPageError) as info:
        p.read(a + 5, 1)
    assert info.value.address == a
    with pytest.raises(PurgedPageError):  # every touch faults again, reads and writes alike
        p.write(a, b"x")
    assert kernel.stats()["sigbus"] == 2
    assert p.read(a + PS, 9) == pattern(b"d", 1)  # the other pages are intact
    assert p.madvise(a, 4 * PS, MADV_NONVOLATILE) == 1
    assert p.read(a, 9) == bytes(9)  # after NONVOLATILE, a fresh zero page


def test_zerofill_on_purged_volatile_page(kernel):
    p = kernel.spawn()
    a = filled(p, 4)
    p.madvise(a, 4 * PS, MADV_VOLATILE_ZEROFILL)
    assert kernel.reclaim(2) == 2
    assert p.read(a, 9) == bytes(9)
    p.write(a + PS, b"again")
    assert kernel.stats()["zero_fills"] == 2
    assert kernel.stats()["sigbus"] == 0
    assert p.volatile_pages() == 4
    # The loss is still reported, although the pages are present again.
    assert p.madvise(a, 4 * PS, MADV_NONVOLATILE) == 1
    assert p.read(a + PS, 5) == b"again"


def test_remarking_switches_zerofill_to_sigbus(kernel):
    p = kernel.spawn()
    a = filled(p, 2)
    p.madvise(a, 2 * PS, MADV_VOLATILE_ZEROFILL)
    p.madvise(a, 2 * PS, MADV_VOLATILE)
    kernel.reclaim(1)
    with pytest.raises(PurgedPageError):
        p.read(a, 1)


def test_subrange_unmark_reports_only_its_own_purges(kernel):
    p = kernel.spawn()
    a = filled(p, 4)
    p.madvise(a, 4 * PS, MADV_VOLATILE)
    p.read(a + 2 * PS, 1)  # all four referenced: the clock takes page 0 on its second lap
    assert kernel.reclaim(1) == 1
    assert p.madvise(a + 2 * PS, 2 * PS, MADV_NONVOLATILE) == 0
    assert p.madvise(a + PS, PS, MADV_NONVOLATILE) == 0
    assert p.madvise(a, PS, MADV_NONVOLATILE) == 1


def test_purge_before_remark_is_still_reported(kernel):
    p = kernel.spawn()
    a = filled(p, 2)
    p.madvise(a, 2 * PS, MADV_VOLATILE)
    kernel.reclaim(1)
    p.madvise(a, 2 * PS, MADV_VOLATILE)  # marking again keeps the earlier marking
    assert p.madvise(a, 2 * PS, MADV_NONVOLATILE) == 1


def test_unmark_cost_token_flat_walk_linear(strategy):
    k = SimulatedKernel(ram_pages=16, page_size=PS, strategy=strategy)
    p = k.spawn()
    costs = {}
    for n in (16, 4096):
        a = p.mmap(n * PS)
        p.madvise(a, n * PS, MADV_VOLATILE)
        before = k.stats()["pte_visits"]
        p.madvise(a, n * PS, MADV_NONVOLATILE)
        costs[n] = k.stats()["pte_visits"] - before
    if strategy == "token":
        assert costs == {16: 0, 4096: 0}
    else:
        assert costs == {16: 16, 4096: 4096}


def test_mark_cost_is_flat_for_both(strategy):
    k = SimulatedKernel(ram_pages=16, page_size=PS, strategy=strategy)
    p = k.spawn()
    a = p.mmap(4096 * PS)
    before = k.stats()["pte_visits"]
    p.madvise(a, 4096 * PS, MADV_VOLATILE)
    assert k.stats()["pte_visits"] == before


# ------------------------------------------------------------------ MADV_FREE, MADV_DONTNEED


def test_madv_free_is_lazy_and_one_shot(kernel):
    p = kernel.spawn()
    a = filled(p, 4)
    assert p.madvise(a, 4 * PS, MADV_FREE) == 0
    assert p.read(a, 9) == pattern(b"d", 0)  # not freed until reclaim; reading keeps it lazy
    p.write(a + 3 * PS, b"k")  # a write cancels the lazy free of that page
    assert kernel.stats()["lazyfree_pages"] == 3
    assert kernel.reclaim(10) == 3
    assert p.read(a, 9) == bytes(9)
    assert p.read(a + PS, 9) == bytes(9)
    assert p.read(a + 3 * PS, 9) == b"k" + pattern(b"d", 3)[1:]
    assert kernel.stats()["lazy_freed"] == 3
    assert kernel.stats()["sigbus"] == 0  # no notification, no fault: data just reads as zero
    assert p.volatile_pages() == 0


def test_madv_free_visits_every_page(kernel):
    p = kernel.spawn()
    a = p.mmap(100 * PS)
    before = kernel.stats()["pte_visits"]
    p.madvise(a, 100 * PS, MADV_FREE)
    assert kernel.stats()["pte_visits"] - before == 100


def test_madv_dontneed_drops_at_once(kernel):
    p = kernel.spawn()
    a = filled(p, 3)
    used = kernel.stats()["used_pages"]
    assert p.madvise(a, 2 * PS, MADV_DONTNEED) == 0
    assert kernel.stats()["used_pages"] == used - 2
    assert p.read(a, 9) == bytes(9)
    assert p.read(a + 2 * PS, 9) == pattern(b"d", 2)


def test_madv_free_on_shared_mapping_is_einval(kernel):
    p = kernel.spawn()
    fd = kernel.memfd_create(2 * PS)
    b = p.mmap(2 * PS, fd=fd)
    with pytest.raises(OSError) as info:
        p.madvise(b, 2 * PS, MADV_FREE)
    assert info.value.errno == errno.EINVAL


# ------------------------------------------------------------------ reclaim


def test_reclaim_takes_volatile_pages_first_with_a_second_chance(kernel):
    p = kernel.spawn()
    a = filled(p, 4)  # non-volatile, the oldest pages of all
    v = filled(p, 4, b"v")
    p.madvise(v, 4 * PS, MADV_VOLATILE)
    # Every page was just written: the clock's first lap only clears the referenced bits of the
    # volatile pages, the second takes the first of them.
    assert kernel.reclaim(1) == 1
    with pytest.raises(PurgedPageError):
        p.read(v, 1)
    p.read(v + 2 * PS, 1)  # page 2 of v is used again since that pass, pages 1 and 3 are not
    assert kernel.reclaim(2) == 2
    assert p.read(v + 2 * PS, 1) == b"v"
    for i in (1, 3):
        with pytest.raises(PurgedPageError):
            p.read(v + i * PS, 1)
    assert p.read(a, 9) == pattern(b"d", 0)  # locked pages are never taken, however old


def test_swap_gives_recently_used_pages_a_second_chance():
    k = SimulatedKernel(ram_pages=8, swap_pages=16, page_size=PS)
    p = k.spawn()
    a = filled(p, 4)
    assert k.reclaim(1) == 1  # one lap clears every referenced bit, the next swaps page 0 out
    p.read(a + 2 * PS, 1)
    assert k.reclaim(2) == 2  # pages 1 and 3; page 2 was used since the last pass
    assert k.stats()["swap_ins"] == 0
    assert p.read(a + 2 * PS, 9) == pattern(b"d", 2)
    assert k.stats()["swap_ins"] == 0
    for i in (0, 1, 3):
        assert p.read(a + i * PS, 9) == pattern(b"d", i)
    assert k.stats()["swap_ins"] == 3


def test_swapless_reclaim_frees_only_volatile_pages(kernel):
    p = kernel.spawn()
    a = filled(p, 8)
    scanned = kernel.stats()["reclaim_scanned"]
    assert kernel.reclaim(8) == 0
    # Nothing volatile and nothing lazily freed: the swapless policy does not age at all.
    assert kernel.stats()["reclaim_scanned"] == scanned
    p.madvise(a + 4 * PS, 4 * PS, MADV_VOLATILE)
    assert kernel.reclaim(8) == 4
    # Only the volatile range is scanned: a lap clears the four referenced bits, a lap purges.
    assert kernel.stats()["reclaim_scanned"] == scanned + 8
    assert p.read(a, 9) == pattern(b"d", 0)


def test_swapless_scan_cost_is_bounded_by_the_volatile_pages(kernel):
    p = kernel.spawn()
    filled(p, 40)  # locked pages: the hand never visits them
    v = filled(p, 8, b"v")
    p.madvise(v, 8 * PS, MADV_VOLATILE)
    before = kernel.stats()["reclaim_scanned"]
    assert kernel.reclaim(8) == 8
    # A lap over the 8 volatile entries to clear their referenced bits, a lap to purge them.
    assert kernel.stats()["reclaim_scanned"] - before == 16
    assert kernel.reclaim(8) == 0
    # Purged entries are still visited (once: a lap that clears no bit ends the call).
    assert kernel.stats()["reclaim_scanned"] - before == 24


def test_a_page_shared_after_fork_gets_one_second_chance(kernel):
    p = kernel.spawn()
    a = filled(p, 4)
    p.madvise(a, 4 * PS, MADV_VOLATILE)
    c = p.fork()  # every page shared, volatile in both
    before = kernel.stats()["reclaim_scanned"]
    # One lap clears each frame's bit once (not once per process), the next takes page 0.
    assert kernel.reclaim(1) == 1
    assert kernel.stats()["reclaim_scanned"] - before == 9
    c.read(a + 2 * PS, 1)  # the child's access protects the frame for the parent too
    assert kernel.reclaim(2) == 2
    assert p.read(a + 2 * PS, 9) == pattern(b"d", 2)
    for proc in (p, c):
        for i in (0, 1, 3):
            with pytest.raises(PurgedPageError):
                proc.read(a + i * PS, 1)


def test_direct_reclaim_on_full_ram(kernel):
    p = kernel.spawn()
    v = filled(p, 40, b"v")
    p.madvise(v, 40 * PS, MADV_VOLATILE)
    a = p.mmap(40 * PS)
    p.touch(a, 40 * PS, write=True)  # 80 pages into 64 frames: volatile ones go
    s = kernel.stats()
    assert s["direct_reclaims"] >= 1
    assert s["purged_pages"] >= 16
    assert p.madvise(v, 40 * PS, MADV_NONVOLATILE) == 1


def test_memory_error_when_nothing_can_be_freed(kernel):
    p = kernel.spawn()
    a = p.mmap(100 * PS)
    p.touch(a, 64 * PS, write=True)
    with pytest.raises(MemoryError):
        p.touch(a + 64 * PS, PS, write=True)
    assert kernel.stats()["used_pages"] == 64
    assert p.read(a, 1) == b"\0"


def test_swap_out_and_in_keeps_data():
    k = SimulatedKernel(ram_pages=8, swap_pages=16, page_size=PS)
    p = k.spawn()
    a = filled(p, 8)
    v = p.mmap(PS)
    assert k.reclaim(4) == 4  # no volatile page: four go to swap (the clock's pages 0-3)
    s = k.stats()
    assert s["swap_outs"] == 4 and s["swap_used"] == 4
    for i in range(8):
        assert p.read(a + i * PS, 9) == pattern(b"d", i)
    assert k.stats()["swap_ins"] == 4
    p.write(v, b"v")
    p.madvise(v, PS, MADV_VOLATILE)
    before = k.stats()
    # With swap too, volatile pages are discarded before anything is swapped.
    assert k.reclaim(1) == 1
    after = k.stats()
    assert after["purged_pages"] - before["purged_pages"] == 1
    assert after["swap_outs"] == before["swap_outs"]


def test_volatile_pages_are_never_swapped():
    k = SimulatedKernel(ram_pages=8, swap_pages=16, page_size=PS)
    p = k.spawn()
    v = filled(p, 4, b"v")
    p.madvise(v, 4 * PS, MADV_VOLATILE)
    assert k.reclaim(8) == 4
    assert k.stats()["swap_outs"] == 0


# ------------------------------------------------------------------ fork and copy-on-write


def test_fork_copy_on_write(kernel):
    p = kernel.spawn()
    a = filled(p, 2)
    c = p.fork()
    assert kernel.stats()["used_pages"] == 2
    c.write(a, b"child")
    assert p.read(a, 5) == b"ddddd"
    assert c.read(a, 5) == b"child"
    assert kernel.stats()["cow_faults"] == 1
    assert kernel.stats()["used_pages"] == 3


def test_shared_page_discarded_only_when_every_mapping_is_volatile(kernel):
    p = kernel.spawn()
    a = filled(p, 4)
    c = p.fork()
    p.madvise(a, 4 * PS, MADV_VOLATILE)
    assert (p.volatile_pages(), c.volatile_pages(), kernel.volatile_pages()) == (4, 0, 0)
    assert kernel.reclaim(4) == 0
    c.madvise(a, 2 * PS, MADV_VOLATILE)
    # Per-process counts add up to 6 marked pages; 2 physical pages can go.
    assert (p.volatile_pages(), c.volatile_pages(), kernel.volatile_pages()) == (4, 2, 2)
    assert kernel.reclaim(4) == 2
    for proc in (p, c):
        with pytest.raises(PurgedPageError):
            proc.read(a, 1)
    assert c.read(a + 2 * PS, 9) == pattern(b"d", 2)
    assert p.madvise(a, 4 * PS, MADV_NONVOLATILE) == 1
    assert c.madvise(a, 4 * PS, MADV_NONVOLATILE) == 1


def test_per_process_counts_exceed_physical_after_fork(kernel):
    p = kernel.spawn()
    a = filled(p, 5)
    p.madvise(a, 5 * PS, MADV_VOLATILE)
    children = [p.fork(), p.fork()]  # the marks are inherited with the mappings
    counts = [proc.volatile_pages() for proc in [p, *children]]
    assert counts == [5, 5, 5]
    assert kernel.volatile_pages() == 5  # the thread's "3x the number of actual volatile pages"
    children[0].write(a, b"own")  # a private copy: now two physical pages back page 0
    assert kernel.volatile_pages() == 6


def test_child_inherits_purge_marks(kernel):
    p = kernel.spawn()
    a = filled(p, 2)
    p.madvise(a, 2 * PS, MADV_VOLATILE)
    kernel.reclaim(1)
    c = p.fork()
    with pytest.raises(PurgedPageError):
        c.read(a, 1)
    assert c.madvise(a, 2 * PS, MADV_NONVOLATILE) == 1
    assert p.madvise(a, 2 * PS, MADV_NONVOLATILE) == 1


def test_exit_frees_private_pages_and_keeps_shared_ones(kernel):
    p = kernel.spawn()
    a = filled(p, 3)
    c = p.fork()
    c.write(a, b"c")
    c.exit()
    assert kernel.stats()["used_pages"] == 3
    assert p.read(a, 9) == pattern(b"d", 0)
    p.exit()
    assert kernel.stats()["used_pages"] == 0


# ------------------------------------------------------------------ shared files


def test_shared_file_volatility_applies_to_every_mapping(kernel):
    fd = kernel.memfd_create(4 * PS)
    p, q = kernel.spawn(), kernel.spawn()
    b = p.mmap(4 * PS, fd=fd)
    q.mmap(PS)  # different layout: the file lands at another address in q
    d = q.mmap(4 * PS, fd=fd)
    assert b != d
    p.write(b, b"shared")
    assert q.read(d, 6) == b"shared"
    q.madvise(d, 4 * PS, MADV_VOLATILE)
    assert p.volatile_pages() == 4 and q.volatile_pages() == 4
    assert kernel.volatile_pages() == 1
    assert kernel.reclaim(4) == 1
    for proc, addr in ((p, b), (q, d)):
        with pytest.raises(PurgedPageError) as info:
            proc.read(addr, 1)
        assert info.value.address == addr
    assert p.madvise(b, 4 * PS, MADV_NONVOLATILE) == 1
    assert q.volatile_pages() == 0
    assert q.read(d, 6) == bytes(6)


def test_shared_file_zerofill_like_ashmem(kernel):
    fd = kernel.memfd_create(2 * PS)
    p = kernel.spawn()
    c = p.fork()
    b = p.mmap(2 * PS, fd=fd)
    d = c.mmap(2 * PS, fd=fd)
    p.write(b, b"x")
    p.madvise(b, 2 * PS, MADV_VOLATILE_ZEROFILL)
    kernel.reclaim(2)
    assert c.read(d, 1) == b"\0"
    assert c.madvise(d, 2 * PS, MADV_NONVOLATILE) == 1


def test_shared_file_pages_outlive_unmap_until_close(kernel):
    fd = kernel.memfd_create(PS)
    p = kernel.spawn()
    b = p.mmap(PS, fd=fd)
    p.write(b, b"keep")
    p.munmap(b, PS)
    b = p.mmap(PS, fd=fd)
    assert p.read(b, 4) == b"keep"
    kernel.close(fd)
    assert p.read(b, 4) == b"keep"
    p.munmap(b, PS)
    assert kernel.stats()["used_pages"] == 0
    with pytest.raises(OSError) as info:
        p.mmap(PS, fd=fd)
    assert info.value.errno == errno.EBADF


def test_fork_shares_file_mappings(kernel):
    fd = kernel.memfd_create(PS)
    p = kernel.spawn()
    b = p.mmap(PS, fd=fd)
    c = p.fork()
    c.write(b, b"from child")
    assert p.read(b, 10) == b"from child"
    assert kernel.stats()["cow_faults"] == 0


# ------------------------------------------------------------------ bad input


def assert_errno(code, fn, *args):
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == code, info.value
    return info.value


def snapshot(kernel, *procs):
    return (kernel.stats()["used_pages"], kernel.volatile_pages(),
            [(p.volatile_pages(), p.pager.table.states(0, 64), p.pager.table.volatile_ranges())
             for p in procs])


def test_einval_unaligned_address(kernel):
    p = kernel.spawn()
    a = filled(p, 2)
    before = snapshot(kernel, p)
    for advice in (MADV_VOLATILE, MADV_NONVOLATILE, MADV_FREE, MADV_DONTNEED):
        assert_errno(errno.EINVAL, p.madvise, a + 1, PS, advice)
    assert_errno(errno.EINVAL, p.munmap, a + 1, PS)
    assert snapshot(kernel, p) == before


def test_einval_unaligned_or_negative_length(kernel):
    p = kernel.spawn()
    a = filled(p, 2)
    before = snapshot(kernel, p)
    assert_errno(errno.EINVAL, p.madvise, a, PS + 1, MADV_VOLATILE)
    assert_errno(errno.EINVAL, p.madvise, a, -PS, MADV_VOLATILE)
    assert_errno(errno.EINVAL, p.munmap, a, 100)
    assert_errno(errno.EINVAL, p.munmap, a, 0)
    assert_errno(errno.EINVAL, p.mmap, 0)
    assert snapshot(kernel, p) == before
    assert p.madvise(a, 0, MADV_VOLATILE) == 0  # an empty range is fine, as in Linux


def test_einval_unknown_advice(kernel):
    p = kernel.spawn()
    a = filled(p, 2)
    before = snapshot(kernel, p)
    for advice in (-1, 0x7777, 17):
        assert_errno(errno.EINVAL, p.madvise, a, PS, advice)
    assert snapshot(kernel, p) == before


def test_enomem_unmapped_range_changes_nothing(kernel):
    p = kernel.spawn()
    a = filled(p, 2)
    b = filled(p, 2)
    p.munmap(a + PS, PS)  # a hole between the two mappings
    before = snapshot(kernel, p)
    for advice in (MADV_VOLATILE, MADV_VOLATILE_ZEROFILL, MADV_NONVOLATILE, MADV_FREE,
                   MADV_DONTNEED):
        assert_errno(errno.ENOMEM, p.madvise, a, 4 * PS, advice)
        assert_errno(errno.ENOMEM, p.madvise, b + 2 * PS, PS, advice)
        assert_errno(errno.ENOMEM, p.madvise, VA_BASE - PS, PS, advice)
    assert snapshot(kernel, p) == before
    assert p.read(b, 9) == pattern(b"d", 0)


def test_efault_on_access_outside_mappings(kernel):
    p = kernel.spawn()
    a = p.mmap(PS)
    assert_errno(errno.EFAULT, p.read, a + PS, 1)
    assert_errno(errno.EFAULT, p.write, a + PS - 1, b"ab")
    assert_errno(errno.EFAULT, p.read, 0, 1)


def test_bad_fd_and_bad_file_offsets(kernel):
    p = kernel.spawn()
    assert_errno(errno.EBADF, p.mmap, PS, 99)
    fd = kernel.memfd_create(2 * PS)
    assert_errno(errno.EINVAL, p.mmap, PS, fd, 5)
    assert_errno(errno.EINVAL, p.mmap, 2 * PS, fd, PS)
    assert_errno(errno.EINVAL, kernel.memfd_create, 0)
    assert_errno(errno.EFBIG, kernel.memfd_create, 1 << 60)
    assert_errno(errno.EBADF, kernel.close, 99)


def test_exited_process_raises(kernel):
    p = kernel.spawn()
    a = p.mmap(PS)
    p.exit()
    for call in (lambda: p.read(a, 1), lambda: p.write(a, b"x"), lambda: p.mmap(PS),
                 lambda: p.madvise(a, PS, MADV_VOLATILE), lambda: p.fork(), p.exit,
                 lambda: p.munmap(a, PS), p.volatile_pages):
        with pytest.raises(ProcessLookupError, match="exited"):
            call()


def test_enomem_when_address_space_is_full():
    k = SimulatedKernel(ram_pages=8, page_size=PS, va_pages=16)
    p = k.spawn()
    p.mmap(12 * PS)
    assert_errno(errno.ENOMEM, p.mmap, 8 * PS)


def test_bad_kernel_arguments():
    with pytest.raises(ValueError):
        SimulatedKernel(ram_pages=0)
    with pytest.raises(ValueError):
        SimulatedKernel(ram_pages=8, page_size=1000)
    with pytest.raises(ValueError):
        SimulatedKernel(ram_pages=8, strategy="fast")
    k = SimulatedKernel(ram_pages=8)
    with pytest.raises(ValueError):
        k.reclaim(-1)


def test_munmap_forgets_volatility(kernel):
    p = kernel.spawn()
    a = filled(p, 2)
    p.madvise(a, 2 * PS, MADV_VOLATILE)
    kernel.reclaim(1)
    p.munmap(a, 2 * PS)
    assert p.volatile_pages() == 0
    b = p.mmap(2 * PS)
    assert b == a
    assert p.read(b, 1) == b"\0"
    p.madvise(b, 2 * PS, MADV_VOLATILE)
    assert p.madvise(b, 2 * PS, MADV_NONVOLATILE) == 0


# ------------------------------------------------------------------ scale


def test_a_million_pages_with_few_bytes_each():
    n = 1 << 20
    k = SimulatedKernel(ram_pages=n, page_size=PS)
    p = k.spawn()
    a = p.mmap(n * PS)
    assert p.touch(a, n * PS, write=True) == n
    assert k.stats()["used_pages"] == n
    p.madvise(a, n * PS, MADV_VOLATILE)
    assert k.reclaim(n // 2) == n // 2
    assert p.madvise(a, n * PS, MADV_NONVOLATILE) == 1
    assert p.touch(a, n * PS) == n // 2
    # Bookkeeping per resident page: a frame's 2-byte mapcount, flags byte and free-set bit, plus
    # the 4-byte slot and 4-byte page table entry of its mapping (and the range table, a few
    # bytes in all): no LRU links, no reverse map.
    assert k.stats()["bookkeeping_bytes"] / n < 11.2
    assert k.core.nbytes / n < 3.2


def test_freed_frames_are_reused_lowest_first():
    # 5000 frames: the free set has three levels (a bit per frame, a bit per word, a top word)
    k = SimulatedKernel(ram_pages=5000, page_size=256)
    p = k.spawn()
    a = p.mmap(5001 * 256)
    p.touch(a, 5000 * 256, write=True)
    assert [frame for frame, _, _, _ in k.core.resident()] == list(range(1, 5001))
    for page in (1, 70, 4095, 4999):
        p.madvise(a + page * 256, 256, MADV_DONTNEED)
    assert k.stats()["free_pages"] == 4
    frames = []
    for page in (4999, 70, 4095, 1):
        p.touch(a + page * 256, 256)
        frames.append(p.pager.slot(page))
    assert frames == [2, 71, 4096, 5000]
    assert k.stats()["free_pages"] == 0
    with pytest.raises(MemoryError):
        p.touch(a + 5000 * 256, 256)


# ------------------------------------------------------------------ the GIL-free fast path


def mixed_kernel(strategy):
    """A kernel whose 6000-page mapping mixes every kind of page a touch can meet."""
    k = SimulatedKernel(ram_pages=8000, swap_pages=1000, page_size=256, strategy=strategy)
    p = k.spawn()
    a = p.mmap(6000 * 256)
    p.touch(a, 3000 * 256, write=True)
    c = p.fork()
    p.madvise(a + 1000 * 256, 500 * 256, MADV_VOLATILE_ZEROFILL)
    p.madvise(a + 1500 * 256, 500 * 256, MADV_VOLATILE)
    assert k.reclaim(300) == 300  # nothing discardable (the child is not volatile): to swap
    c.madvise(a + 1000 * 256, 1000 * 256, MADV_VOLATILE)
    assert k.reclaim(700) == 700  # purges in both ranges, SIGBUS ones included
    p.touch(a + 3000 * 256, 200 * 256, write=True)  # private pages, for MADV_FREE to act on
    p.madvise(a + 2900 * 256, 300 * 256, MADV_FREE)
    assert k.stats()["swap_outs"] == 300 and k.stats()["purged_pages"] == 700
    assert k.stats()["lazyfree_pages"] == 200
    return k, p, c, a


def touch_skipping(p, addr, npages, write, step):
    """Touch npages from addr, `step` pages a call, skipping SIGBUS pages; (fresh, SIGBUS pages)."""
    fresh, lost = 0, []
    page = 0
    while page < npages:
        n = min(step, npages - page)
        try:
            fresh += p.touch(addr + page * 256, n * 256, write)
            page += n
        except PurgedPageError as e:
            lost.append(e.address)
            page = (e.address - addr) // 256 + 1
    return fresh, lost


@pytest.mark.parametrize("write", [False, True])
def test_bulk_touch_matches_page_by_page(strategy, write):
    k1, p1, c1, a = mixed_kernel(strategy)
    k2, p2, c2, _ = mixed_kernel(strategy)
    assert k1.stats() == k2.stats()
    # one call (GIL released over runs of plain pages) vs one call per page (always the slow path)
    r1 = touch_skipping(p1, a, 6000, write, 6000)
    r2 = touch_skipping(p2, a, 6000, write, 1)
    # (the counts of fresh pages differ: a SIGBUS loses the count of the call it interrupts)
    assert r1[1] == r2[1] and len(r1[1]) == 200
    s1, s2 = k1.stats(), k2.stats()
    assert s1 == s2
    assert s1["zero_page_faults"] > 3000 and s1["zero_fills"] == 500 and s1["swap_ins"] == 300
    assert s1["cow_faults"] > 0 if write else s1["cow_faults"] == 0
    assert s1["lazyfree_pages"] == (0 if write else 200)
    assert k1.core.resident() == k2.core.resident()
    assert p1.pager.table.states() == p2.pager.table.states()


# ------------------------------------------------------------------ documented details


def test_madv_free_leaves_cow_shared_pages_alone(kernel):
    p = kernel.spawn()
    a = filled(p, 2)
    p.fork()
    p.madvise(a, 2 * PS, MADV_FREE)
    assert kernel.stats()["lazyfree_pages"] == 0
    assert kernel.reclaim(2) == 0


def test_dontneed_keeps_an_earlier_purge_reported(kernel):
    p = kernel.spawn()
    a = filled(p, 2)
    p.madvise(a, 2 * PS, MADV_VOLATILE)
    kernel.reclaim(1)
    p.madvise(a, 2 * PS, MADV_DONTNEED)
    with pytest.raises(PurgedPageError):
        p.read(a, 1)
    assert p.read(a + PS, 1) == b"\0"  # dropped, not purged: a zero page
    assert p.madvise(a, 2 * PS, MADV_NONVOLATILE) == 1


def test_dontneed_on_shared_mapping_keeps_the_file_pages(kernel):
    fd = kernel.memfd_create(PS)
    p = kernel.spawn()
    b = p.mmap(PS, fd=fd)
    p.write(b, b"kept")
    assert p.madvise(b, PS, MADV_DONTNEED) == 0
    assert p.read(b, 4) == b"kept"


def test_one_report_per_purge_of_a_shared_file(kernel):
    fd = kernel.memfd_create(PS)
    p, q = kernel.spawn(), kernel.spawn()
    b, d = p.mmap(PS, fd=fd), q.mmap(PS, fd=fd)
    p.write(b, b"x")
    p.madvise(b, PS, MADV_VOLATILE)
    kernel.reclaim(1)
    assert q.madvise(d, PS, MADV_NONVOLATILE) == 1
    assert p.madvise(b, PS, MADV_NONVOLATILE) == 0


def test_copy_on_write_source_is_pinned_during_direct_reclaim(kernel):
    k = SimulatedKernel(ram_pages=4, page_size=PS, strategy=kernel.strategy)
    p = k.spawn()
    a = filled(p, 4)
    p.madvise(a, 4 * PS, MADV_VOLATILE)
    c = p.fork()  # inherits the marks: every page is volatile in both
    c.write(a + 1, b"C")  # reclaim would take page 0 first, but it is the copy's source
    assert c.read(a, 9) == b"dCdddddd\x00"
    assert p.read(a, 9) == pattern(b"d", 0)
    assert k.stats()["purged_pages"] >= 1 and k.stats()["cow_faults"] == 1


def test_fork_refuses_more_than_65535_sharers():
    k = SimulatedKernel(ram_pages=4, page_size=PS, va_pages=4)
    p = k.spawn()
    a = p.mmap(PS)
    p.touch(a, PS, write=True)
    frame = p.pager.slot(0)
    for _ in range(65534):
        p.fork()
    assert k.core.mapcount(frame) == 65535
    assert_errno(errno.EAGAIN, p.fork)
    assert k.core.mapcount(frame) == 65535
    assert len(k.processes) == 65535


def test_threads_calling_the_compiled_parts_keep_the_kernel_consistent():
    k = SimulatedKernel(ram_pages=20000, page_size=256)
    procs = [k.spawn() for _ in range(3)]
    addrs = [p.mmap(8192 * 256) for p in procs]
    for p, a in zip(procs, addrs):
        p.madvise(a, 4096 * 256, MADV_VOLATILE)
    errors = []

    def worker(p, a):
        try:
            for _ in range(20):
                for first in (0, 4096):  # a volatile half and a locked half, 4096 pages each
                    try:
                        p.touch(a + first * 256, 4096 * 256, write=True)
                    except PurgedPageError:
                        p.madvise(a, 4096 * 256, MADV_NONVOLATILE)
                        p.madvise(a, 4096 * 256, MADV_VOLATILE)
                p.madvise(a + 4096 * 256, 4096 * 256, MADV_DONTNEED)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def reclaimer():
        for _ in range(200):
            k.reclaim(500)

    threads = [threading.Thread(target=worker, args=pa) for pa in zip(procs, addrs)]
    threads.append(threading.Thread(target=reclaimer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(k.core.resident()) == k.stats()["used_pages"]
    for p in procs:
        states = p.pager.table.states(0, 8192)
        for page in range(8192):
            assert (states[page] in (1, 2)) == (p.pager.slot(page) != 0)


def test_swapped_page_shared_by_fork_comes_back_to_each_process():
    k = SimulatedKernel(ram_pages=4, swap_pages=8, page_size=PS)
    p = k.spawn()
    a = filled(p, 2)
    c = p.fork()
    assert k.reclaim(2) == 2  # both shared pages go to swap, one slot each for both processes
    assert k.stats()["swap_used"] == 2
    assert c.read(a, 9) == pattern(b"d", 0)  # the child gets its own copy back
    assert k.stats()["swap_used"] == 2  # the parent still needs the slot
    assert p.read(a, 9) == pattern(b"d", 0)
    assert k.stats()["swap_used"] == 1
    c.exit()
    p.munmap(a, 2 * PS)
    assert k.stats()["swap_used"] == 0 and k.stats()["used_pages"] == 0


def test_shared_file_pages_swap_when_locked():
    k = SimulatedKernel(ram_pages=4, swap_pages=8, page_size=PS)
    fd = k.memfd_create(4 * PS)
    p = k.spawn()
    b = p.mmap(4 * PS, fd=fd)
    for i in range(4):
        p.write(b + i * PS, pattern(b"f", i))
    assert k.reclaim(4) == 4
    assert k.stats()["swap_outs"] == 4 and k.stats()["purged_pages"] == 0
    q = k.spawn()
    d = q.mmap(4 * PS, fd=fd)
    assert [q.read(d + i * PS, 9) for i in range(4)] == [pattern(b"f", i) for i in range(4)]
