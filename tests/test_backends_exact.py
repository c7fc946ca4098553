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


def reclaim_pages(mem, pages: set[int]) -> None:
    """The kernel discards exactly `pages` of unlocked mem (drain every CPU, then page out)."""
    _core.on_every_cpu(mem._cold)
    for page in sorted(pages):
        _core.on_every_cpu(lambda: mem._pageout(False, page, 1))


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
    for generation, discarded in enumerate(rounds):
        for page in range(NPAGES):
            mem.data[page * PAGE:(page + 1) * PAGE] = page_pattern(page, generation)
        mem.unlock()
        reclaim_pages(mem, discarded)
        assert mem.npages - mem._resident_pages() == len(discarded)
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
