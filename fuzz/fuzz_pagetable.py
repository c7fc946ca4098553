#!/usr/bin/env python3
"""Fuzz the compiled PageTable (both strategies, small token counters) against tests/pagetable_model.py."""
from __future__ import annotations

from _harness import atheris, checked, is_int, main, pick_int, REJECTED

with atheris.instrument_imports():
    from discache import PageTable
    from pagetable_model import PageTableModel

SPAN_OPS = ("populate", "discard", "mark_volatile", "unmark")
PAGE_OPS = ("purge", "state", "is_volatile")
ERRORS = (ValueError, IndexError, TypeError, OverflowError)


def expected_error(npages: int, first, count) -> type[BaseException] | None:
    """The exception PageTable documents for a span (None: valid)."""
    if not is_int(first) or not is_int(count):
        return TypeError
    if count <= 0:
        return ValueError
    if first < 0 or first >= npages or count > npages - first:
        return IndexError
    return None


def observe(table) -> tuple:
    """Everything a caller can see of a table's page states."""
    return table.states(), [table.is_volatile(p) for p in range(table.npages)]


def same_states(table, model) -> None:
    got, volatile = observe(table)
    want = model.states()
    if table.token_wraps == 0:
        assert got == want, (table.strategy, table.token_bits, got, want)
    else:  # a wrap may only turn "absent" into "purged": never a false intact
        assert all(g == w or (g, w) == (3, 0) for g, w in zip(got, want)), (got, want)
    assert volatile == model.volatile


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    npages = fdp.ConsumeIntInRange(1, 40)
    bits = fdp.PickValueInList([1, 2, 3, 30])
    model = PageTableModel(npages)
    tables = [PageTable(npages, "token", token_bits=bits), PageTable(npages, "walk")]
    for _ in range(fdp.ConsumeIntInRange(1, 60)):
        op = fdp.ConsumeIntInRange(0, len(SPAN_OPS) + len(PAGE_OPS))
        if op < len(SPAN_OPS):
            name = SPAN_OPS[op]
            args = (pick_int(fdp, -2, npages + 1), pick_int(fdp, -1, npages + 1))
            error = expected_error(npages, *args)
        elif op < len(SPAN_OPS) + len(PAGE_OPS):
            name = PAGE_OPS[op - len(SPAN_OPS)]
            args = (pick_int(fdp, -2, npages + 1),)
            error = expected_error(npages, args[0], 1)
        else:
            name = "states"
            args = (pick_int(fdp, -2, npages + 1), pick_int(fdp, -1, npages + 1))
            error = expected_error(npages, *args)
        if all(is_int(a) for a in args) or (name == "states" and is_int(args[0])
                                             and args[1] is None):
            # integer arguments: the model raises the documented exception, or answers
            try:
                want, error = getattr(model, name)(*args), None
            except (ValueError, IndexError) as e:
                want, error = REJECTED, type(e)
        else:
            want = REJECTED
        for table in tables:
            got = checked(lambda: getattr(table, name)(*args), ERRORS, lambda: observe(table))
            if got is REJECTED or error:
                # the documented exception, and nothing else
                try:
                    getattr(table, name)(*args)
                except ERRORS as e:
                    assert isinstance(e, error), (name, args, e, error)
                else:
                    raise AssertionError(f"{name}{args} was accepted, expected {error.__name__}")
                continue
            if name in ("state", "states") and table.token_wraps:
                continue  # checked by same_states with the wrap's allowance
            assert got == want, (table.strategy, table.token_bits, name, args, got, want)
        for table in tables:
            same_states(table, model)


if __name__ == "__main__":
    main(test_one_input)
