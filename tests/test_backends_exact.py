"""The madvfree backends report exactly the pages the kernel discarded: checked page by page."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import discache
from discache import _core, backends

PAGE = _core.page_size()
NPAGES = 24
MADVFREE = [info.name for info in backends.available()
            if info.name.startswith("madvfree") and info.available]


def reclaim_pages(mem, pages: set[int]) -> set[int]:
    """Have the kernel discard `pages` of unlocked mem; returns the pages really gone (mincore).

    The kernel may keep a page, or discard other unlocked pages on its own: the truth is what
    mincore() says, and lock() must match it.
    """
    for page in sorted(pages):
        mem._force_reclaim(page, 1)
    return {page for page in range(mem.npages) if not mem._resident_pages(page, 1)}


def page_pattern(page: int, generation: int) -> bytes:
    return bytes([(page * 5 + generation) % 250 + 1]) * PAGE


@pytest.fixture(scope="module", params=MADVFREE)
def mem(request):
    mem = discache.allocate(NPAGES * PAGE, request.param)
    yield mem
    mem.close()


@settings(max_examples=25, deadline=None)
@given(rounds=st.lists(st.sets(st.integers(0, NPAGES - 1), max_size=NPAGES),
                       min_size=1, max_size=4))
def test_lock_reports_exactly_the_discarded_pages(mem, rounds):
    if not mem.is_locked:  # a failed example may leave it unlocked for the next one
        mem.lock()
    for generation, discarded in enumerate(rounds):
        for page in range(NPAGES):
            mem.data[page * PAGE:(page + 1) * PAGE] = page_pattern(page, generation)
        mem.unlock()
        discarded = reclaim_pages(mem, discarded)
        if mem.sigbus:
            for page in range(NPAGES):  # unlocked reads: data, or the error, never zeros
                if page in discarded:
                    with pytest.raises(discache.PurgedPageError) as info:
                        mem.read(page * PAGE, 1)
                    assert info.value.address == mem.address + page * PAGE
                else:
                    assert mem.read(page * PAGE, PAGE) == page_pattern(page, generation)
        assert mem.lock() is (not discarded)
        assert mem.purged_pages == len(discarded)
        for page in range(NPAGES):
            content = bytes(mem.data[page * PAGE:(page + 1) * PAGE])
            expected = bytes(PAGE) if page in discarded else page_pattern(page, generation)
            assert content == expected, f"page {page}"


@pytest.mark.parametrize("name", MADVFREE)
def test_force_reclaim_discards_nearly_every_page_asked(name):
    # The test above checks lock() against what the kernel really did; this one checks that
    # the kernel really did discard what force_reclaim asked for, nearly always.
    mem = discache.allocate(NPAGES * PAGE, name)
    try:
        asked = discarded = 0
        for generation in range(10):
            mem.data[:] = page_pattern(generation, generation) * NPAGES
            mem.unlock()
            for page in range(0, NPAGES, 2):
                discarded += mem._force_reclaim(page, 1)
                asked += 1
            mem.lock()
            assert mem.purged_pages <= NPAGES // 2
        assert discarded >= 0.9 * asked, (discarded, asked)
    finally:
        mem.close()
