"""The madvfree backends report exactly the pages the kernel discarded: checked page by page."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import discache
from discache import _core, backends
from kernel_reclaim import reclaim

PAGE = _core.page_size()
NPAGES = 24
MADVFREE = [info.name for info in backends.available()
            if info.name.startswith("madvfree") and info.available]


def reclaim_pages(mem, pages: set[int]) -> set[int]:
    """Have the kernel discard `pages` of unlocked mem; returns the pages really gone (mincore).

    The kernel may discard other unlocked pages on its own: the truth is what mincore() says,
    and lock() must match it.
    """
    gone: set[int] = set()
    for page in sorted(pages):
        gone |= reclaim(mem, page, 1)
    return gone


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
        asked = discarded
        discarded = reclaim_pages(mem, asked)
        assert asked <= discarded
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
