"""Random operation sequences: PageTable ('token', 'walk') against the pure-Python model."""
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from discache import PageTable
from pagetable_model import PageTableModel

NPAGES = 48
spans = st.integers(0, NPAGES - 1).flatmap(
    lambda first: st.tuples(st.just(first), st.integers(1, NPAGES - first))
)
pages = st.integers(0, NPAGES - 1)


class AgainstModel(RuleBasedStateMachine):
    """Every answer of every implementation equals the model's."""

    def __init__(self):
        super().__init__()
        self.model = PageTableModel(NPAGES)
        self.tables = [
            PageTable(NPAGES, "token"),
            PageTable(NPAGES, "walk"),
            PageTable(NPAGES, "token", token_bits=3),  # renumbers often
            PageTable(NPAGES, "token", token_bits=1),  # wraps: stale marks alias
        ]

    def apply(self, name, *args):
        want = getattr(self.model, name)(*args)
        for table in self.tables:
            assert getattr(table, name)(*args) == want, (table, name, args)

    @rule(span=spans)
    def populate(self, span):
        self.apply("populate", *span)

    @rule(span=spans)
    def discard(self, span):
        self.apply("discard", *span)

    @rule(span=spans)
    def mark_volatile(self, span):
        self.apply("mark_volatile", *span)

    @rule(span=spans)
    def unmark(self, span):
        self.apply("unmark", *span)

    @rule(page=pages)
    def purge(self, page):
        self.apply("purge", page)

    @rule(page=pages)
    def purge_then_refault(self, page):
        self.apply("purge", page)
        self.apply("populate", page, 1)

    @invariant()
    def same_states(self):
        want = self.model.states()
        for table in self.tables:
            got = table.states()
            if table.token_wraps == 0:
                assert got == want, table
            else:  # a wrap may only turn "absent" (0) into "purged" (3): never a false intact
                assert all(g == w or (g, w) == (3, 0) for g, w in zip(got, want)), table
            volatile = [table.is_volatile(p) for p in range(NPAGES)]
            assert volatile == self.model.volatile


AgainstModel.TestCase.settings = settings(max_examples=300, stateful_step_count=60)
TestAgainstModel = AgainstModel.TestCase


@pytest.mark.parametrize("strategy", ["token", "walk"])
def test_model_agrees_on_the_issue_example(strategy):
    for table in (PageTable(1000, strategy), PageTableModel(1000)):
        table.populate(0, 1000)
        table.mark_volatile(0, 1000)
        table.purge(900)
        assert (table.unmark(0, 100), table.unmark(100, 900)) == (False, True)
