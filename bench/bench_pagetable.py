"""PageTable costs: mark_volatile and unmark by range size, strategy and purges; mark+unmark rate."""
import pytest

from discache import PageTable

SIZES = [1, 16, 256, 4096, 65536]
PURGED_PAGES = [0, 3]  # nothing purged, or a few pages purged (first, middle, last)
ROUNDS = 2000


def purge_a_few(pt, pages, purged):
    for page in sorted({0, pages // 2, pages - 1})[:purged]:
        pt.purge(page)


@pytest.fixture(params=["token", "walk"])
def table(request):
    pt = PageTable(65536, request.param)
    pt.populate(0, 65536)
    return pt


@pytest.mark.parametrize("purged", PURGED_PAGES)
@pytest.mark.parametrize("pages", SIZES)
def bench_unmark(benchmark, table, pages, purged):
    benchmark.group = f"unmark, {purged} purged"
    benchmark.extra_info.update(op="unmark", strategy=table.strategy, pages=pages, purged=purged)

    def setup():
        table.populate(0, pages)
        table.mark_volatile(0, pages)
        purge_a_few(table, pages, purged)

    result = benchmark.pedantic(table.unmark, args=(0, pages), setup=setup,
                                rounds=ROUNDS, warmup_rounds=50)
    assert result is (purged > 0 and pages > 0)


@pytest.mark.parametrize("purged", PURGED_PAGES)
@pytest.mark.parametrize("pages", SIZES)
def bench_mark_volatile(benchmark, table, pages, purged):
    """Marking again over pages lost in an earlier marking leaves stale marks to ignore, not clear."""
    benchmark.group = f"mark_volatile, {purged} purged"
    benchmark.extra_info.update(op="mark_volatile", strategy=table.strategy, pages=pages,
                                purged=purged)
    table.mark_volatile(0, pages)
    purge_a_few(table, pages, purged)
    assert table.unmark(0, pages) is (purged > 0)

    def setup():
        if table.is_volatile(0):
            table.unmark(0, pages)

    benchmark.pedantic(table.mark_volatile, args=(0, pages), setup=setup,
                       rounds=ROUNDS, warmup_rounds=50)


PAIRS = 10_000


def bench_mark_unmark_pairs(benchmark, table):
    """Throughput from Python: 1-page mark_volatile + unmark pairs in a plain loop."""
    benchmark.group = "mark+unmark pairs"
    benchmark.extra_info.update(op="mark+unmark", strategy=table.strategy, pages=1, purged=0,
                                pairs=PAIRS)
    mark, unmark = table.mark_volatile, table.unmark

    def pairs():
        for page in range(PAIRS):
            mark(page, 1)
            unmark(page, 1)

    benchmark.pedantic(pairs, rounds=30, warmup_rounds=2)
