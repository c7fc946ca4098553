"""PageTable: states, exact purge answers, token generations, costs, bad arguments."""
import threading

import pytest

from discache import PageTable
from discache.sim._sim import MAX_PAGES, MAX_TOKEN_BITS
from pagetable_model import PageTableModel

STRATEGIES = ["token", "walk"]


@pytest.fixture(params=STRATEGIES)
def strategy(request):
    return request.param


def snapshot(pt):
    """Everything observable about a table, to prove an operation changed nothing."""
    return pt.states(), pt.volatile_ranges(), pt.pte_visits, pt.record_visits


def test_states_through_a_life_cycle(strategy):
    pt = PageTable(8, strategy)
    assert pt.state(0) == "absent"
    assert pt.populate(0, 4) == 4
    assert pt.populate(2, 4) == 2
    assert [pt.state(p) for p in range(8)] == ["present"] * 6 + ["absent"] * 2
    pt.mark_volatile(0, 8)
    assert [pt.state(p) for p in range(8)] == ["volatile"] * 6 + ["absent"] * 2
    assert pt.purge(3) is True
    assert pt.state(3) == "purged"
    assert pt.purge(3) is False, "a purged page cannot be purged twice"
    assert pt.purge(7) is False, "an absent page has nothing to discard"
    assert pt.unmark(0, 8) is True
    assert pt.state(3) == "absent", "after unmark a purged page faults in fresh"
    assert pt.state(2) == "present"
    assert pt.unmark(0, 8) is False


def test_purge_needs_volatile(strategy):
    pt = PageTable(4, strategy)
    pt.populate(0, 4)
    assert pt.purge(1) is False
    assert pt.state(1) == "present"


def test_issue_example_sub_range_answers_are_exact(strategy):
    pt = PageTable(1000, strategy)
    pt.populate(0, 1000)
    pt.mark_volatile(0, 1000)
    assert pt.purge(900)
    assert pt.unmark(0, 100) is False
    assert pt.unmark(100, 900) is True
    assert pt.volatile_ranges() == []


def test_sub_range_unmark_keeps_the_rest_exact(strategy):
    pt = PageTable(100, strategy)
    pt.populate(0, 100)
    pt.mark_volatile(0, 100)
    pt.purge(10)
    pt.purge(80)
    assert pt.unmark(40, 20) is False  # the middle: nothing lost there
    assert pt.state(10) == pt.state(80) == "purged"
    assert pt.unmark(60, 40) is True  # the right piece holds page 80
    assert pt.unmark(0, 40) is True  # the left piece holds page 10


def test_remark_after_unmark_does_not_resurrect_purges(strategy):
    pt = PageTable(16, strategy)
    pt.populate(0, 16)
    pt.mark_volatile(0, 16)
    pt.purge(5)
    assert pt.unmark(0, 16) is True
    pt.mark_volatile(0, 16)
    assert pt.state(5) == "absent", "a stale purge mark must not read as purged"
    assert pt.unmark(0, 16) is False


def test_marking_again_keeps_an_earlier_loss(strategy):
    pt = PageTable(32, strategy)
    pt.populate(0, 32)
    pt.mark_volatile(4, 8)
    pt.purge(6)
    pt.mark_volatile(0, 32)  # overlaps the first marking: the loss must not be forgotten
    assert pt.state(6) == "purged"
    assert pt.unmark(0, 32) is True


def test_refaulting_a_purged_page_still_reports_the_loss(strategy):
    pt = PageTable(4, strategy)
    pt.populate(0, 4)
    pt.mark_volatile(0, 4)
    pt.purge(2)
    pt.populate(2, 1)  # zero-fill refault while still volatile
    assert pt.state(2) == "volatile"
    assert pt.purge(2) is True
    assert pt.unmark(0, 4) is True
    assert pt.volatile_ranges() == []


def test_discard_is_not_a_purge(strategy):
    pt = PageTable(4, strategy)
    pt.populate(0, 4)
    pt.mark_volatile(0, 4)
    assert pt.discard(0, 4) == 4
    assert pt.discard(0, 4) == 0
    assert [pt.state(p) for p in range(4)] == ["absent"] * 4
    assert pt.unmark(0, 4) is False


def test_is_volatile_and_ranges(strategy):
    pt = PageTable(10, strategy)
    pt.mark_volatile(2, 3)
    pt.mark_volatile(7, 1)
    assert [pt.is_volatile(p) for p in range(10)] == [
        False, False, True, True, True, False, False, True, False, False]
    firsts = [(first, count) for first, count, _token, _n in pt.volatile_ranges()]
    assert firsts == [(2, 3), (7, 1)]


@pytest.mark.parametrize("npages", [1, 16, 256, 4096, 65536])
@pytest.mark.parametrize("purged", [0, 3])
def test_token_unmark_visits_no_page_entry(npages, purged):
    pt = PageTable(65536, "token")
    pt.populate(0, npages)
    before = pt.pte_visits
    pt.mark_volatile(0, npages)
    for page in range(min(purged, npages)):
        pt.purge(page)
    visits_by_purges = min(purged, npages)
    assert pt.pte_visits - before == visits_by_purges
    assert pt.unmark(0, npages) is (purged > 0)
    assert pt.pte_visits - before == visits_by_purges, "unmark of a whole range walks nothing"
    assert pt.record_visits == 0


@pytest.mark.parametrize("npages", [1, 256, 65536])
def test_walk_unmark_visits_every_page(npages):
    pt = PageTable(65536, "walk")
    pt.populate(0, npages)
    before = pt.pte_visits
    pt.mark_volatile(0, npages)
    assert pt.pte_visits == before, "v14 marks through the VMA: no page walk"
    pt.unmark(0, npages)
    assert pt.pte_visits - before == npages


def test_token_sub_range_unmark_costs_purge_records_not_pages():
    pt = PageTable(65536, "token")
    pt.populate(0, 65536)
    pt.mark_volatile(0, 65536)
    for page in (5, 60000):
        pt.purge(page)
    before = pt.pte_visits
    assert pt.unmark(100, 50000) is False
    assert pt.pte_visits == before
    assert 0 < pt.record_visits <= 4


def test_counter_overflow_renumbers_and_stays_exact():
    pt = PageTable(8, "token", token_bits=2)
    model = PageTableModel(8)
    for t in (pt, model):
        t.populate(0, 8)
    for round_ in range(12):  # many more marks than the 3 tokens a 2-bit counter has
        for t in (pt, model):
            t.mark_volatile(round_ % 8, 1)
            t.mark_volatile(7, 1)
        assert pt.purge(round_ % 8) == model.purge(round_ % 8)
        assert pt.states() == model.states()
        for t in (pt, model):
            t.populate(round_ % 8, 1)
        assert pt.unmark(round_ % 8, 1) == model.unmark(round_ % 8, 1)
        assert pt.states() == model.states()
    assert pt.renumbers > 0
    assert pt.token_wraps == 0


def test_counter_wrap_gives_false_purged_never_false_intact():
    pt = PageTable(4, "token", token_bits=1)  # a single token value
    pt.populate(0, 4)
    pt.mark_volatile(3, 1)  # stays live: one range is too many to renumber a 1-bit counter
    pt.mark_volatile(0, 1)  # the counter wraps
    assert pt.purge(0)
    assert pt.unmark(0, 1) is True
    pt.mark_volatile(0, 1)  # wraps again: page 0's stale mark now aliases the new token
    assert pt.token_wraps == 2
    assert pt.state(0) == "purged", "the documented false 'purged' (a page lost long ago)"
    assert pt.unmark(0, 1) is False, "unmark answers from purge records, exact even after a wrap"


@pytest.mark.parametrize("seed", range(20))
def test_small_counters_never_answer_intact_for_a_loss(seed):
    import random

    rng = random.Random(seed)
    pt = PageTable(24, "token", token_bits=rng.choice([1, 2, 3]))
    model = PageTableModel(24)
    for _ in range(400):
        op = rng.randrange(5)
        first = rng.randrange(24)
        count = rng.randint(1, 24 - first)
        if op == 0:
            assert pt.populate(first, count) == model.populate(first, count)
        elif op == 1:
            pt.mark_volatile(first, count)
            model.mark_volatile(first, count)
        elif op == 2:
            assert pt.unmark(first, count) == model.unmark(first, count)
        else:
            assert pt.purge(first) == model.purge(first)
        for page in range(24):
            got, want = pt.state(page), model.state(page)
            # A wrap may only turn "absent" into "purged"; every other answer is exact.
            assert got == want or (got, want) == ("purged", "absent"), (page, got, want)


def test_state_names_and_codes(strategy):
    pt = PageTable(4, strategy)
    pt.populate(1, 3)
    pt.mark_volatile(2, 2)
    pt.purge(3)
    assert pt.states() == bytes([0, 1, 2, 3])
    assert pt.states(2, 2) == bytes([2, 3])


def test_bookkeeping_is_four_bytes_a_page():
    pt = PageTable(1 << 20)
    assert pt.nbytes < 4 * (1 << 20) + 4096


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(npages=0), ValueError, "npages"),
        (dict(npages=-1), ValueError, "npages"),
        (dict(npages=MAX_PAGES + 1), ValueError, "npages"),
        (dict(npages=1 << 80), ValueError, "npages"),
        (dict(npages=4, strategy="fast"), ValueError, "strategy"),
        (dict(npages=4, token_bits=0), ValueError, "token_bits"),
        (dict(npages=4, token_bits=MAX_TOKEN_BITS + 1), ValueError, "token_bits"),
        (dict(npages=4.0), TypeError, None),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        PageTable(**kwargs)


SPAN_METHODS = ["populate", "discard", "mark_volatile", "unmark"]
BAD_SPANS = [
    (0, 0, ValueError, "count must be a positive"),
    (0, -1, ValueError, "count must be a positive"),
    (-1, 1, IndexError, "outside the table"),
    (16, 1, IndexError, "outside the table"),
    (10, 7, IndexError, "run past the end"),
    (1 << 70, 1, IndexError, "outside the table"),
    (0, 1 << 70, IndexError, "run past the end"),
]


@pytest.mark.parametrize("method", SPAN_METHODS)
@pytest.mark.parametrize("first, count, error, match", BAD_SPANS)
def test_span_methods_reject_bad_spans_and_change_nothing(strategy, method, first, count, error, match):
    pt = PageTable(16, strategy)
    pt.populate(0, 12)
    pt.mark_volatile(2, 8)
    pt.purge(4)
    before = snapshot(pt)
    with pytest.raises(error, match=match):
        getattr(pt, method)(first, count)
    assert snapshot(pt) == before


@pytest.mark.parametrize("method", ["purge", "state", "is_volatile"])
@pytest.mark.parametrize("page", [-1, 16, 1 << 70])
def test_page_methods_reject_pages_outside_and_change_nothing(strategy, method, page):
    pt = PageTable(16, strategy)
    pt.populate(0, 16)
    pt.mark_volatile(0, 16)
    before = snapshot(pt)
    with pytest.raises(IndexError, match="outside the table"):
        getattr(pt, method)(page)
    assert snapshot(pt) == before


@pytest.mark.parametrize("method", SPAN_METHODS)
def test_non_integers_are_type_errors(method):
    pt = PageTable(16)
    with pytest.raises(TypeError):
        getattr(pt, method)(0.0, 1)
    with pytest.raises(TypeError):
        getattr(pt, method)("0", 1)


def test_concurrent_threads_on_disjoint_spans_match_sequential_use(strategy):
    npages, threads = 1 << 16, 4
    per = npages // threads
    pt = PageTable(npages, strategy)
    errors = []

    def work(index):
        try:
            base = index * per
            for _ in range(50):
                pt.populate(base, per)  # large enough to release the GIL
                pt.mark_volatile(base, per)
                pt.purge(base + 1)
                assert pt.unmark(base, per) is True
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    assert pt.volatile_ranges() == []
    lost = {index * per + 1 for index in range(threads)}  # purged, then unmarked: faults in fresh
    assert pt.states() == bytes(0 if page in lost else 1 for page in range(npages))


@pytest.mark.parametrize("strategy", ["token", "walk"])
def test_states_of_a_huge_negative_first_page_is_an_index_error(strategy):
    # found by fuzz/fuzz_pagetable.py: npages - first overflowed and raised a ValueError about a
    # nonsense negative count instead of the documented IndexError
    table = PageTable(4, strategy)
    for first in (-(1 << 64), -(1 << 63), -5):
        with pytest.raises(IndexError):
            table.states(first)
    with pytest.raises(IndexError, match=r"\[2, 2 \+ 9223372036854775807\)"):
        table.populate(2, (1 << 63) - 1)  # the message no longer shows an overflowed sum
