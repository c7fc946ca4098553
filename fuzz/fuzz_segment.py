#!/usr/bin/env python3
"""Fuzz discache._core.Segment's span methods: spans in and out of range, lock sequences."""
from __future__ import annotations

from _harness import atheris, checked, is_int, main, pick_int, REJECTED

with atheris.instrument_imports():
    from discache import _core

PAGE = _core.page_size()
ERRORS = (ValueError, IndexError, TypeError, OverflowError)
SPAN_METHODS = ("lock_span", "unlock_span", "discard_span", "claim_span", "release_span",
                "reclaim_span", "resident_pages")


def span_error(npages: int, first, count):
    if not is_int(first) or not is_int(count):
        return (TypeError, OverflowError)  # the arguments convert in order: either comes first
    if not (-(1 << 63) <= first < 1 << 63 and -(1 << 63) <= count < 1 << 63):
        return (OverflowError,)
    if count <= 0:
        return (ValueError,)
    if first < 0 or first > npages - count:
        return (IndexError,)
    return None


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    npages = fdp.ConsumeIntInRange(1, 6)
    seg = _core.Segment(npages, fdp.PickValueInList(["madvfree", "memfd"]))
    model = bytearray(seg.nbytes)
    locked = [True] * npages

    def snapshot():
        return bytes(seg.read(0, seg.nbytes)), list(locked)

    try:
        for _ in range(fdp.ConsumeIntInRange(1, 30)):
            op = fdp.ConsumeIntInRange(0, 5)
            first, count = pick_int(fdp, -1, npages + 1), pick_int(fdp, -1, npages + 1)
            error = span_error(npages, first, count)
            if op == 0:  # any method, refused spans only (valid ones below keep the contract)
                name = fdp.PickValueInList(list(SPAN_METHODS))
                if name == "resident_pages" and is_int(first) and is_int(count) \
                        and -(1 << 63) <= count < 0:
                    # a negative count means "to the end"
                    error = span_error(npages, first, npages - first)
                if error:
                    got = checked(lambda: getattr(seg, name)(first, count), ERRORS, snapshot)
                    assert got is REJECTED, (name, first, count, got)
                    try:
                        getattr(seg, name)(first, count)
                    except error:
                        pass
                    except ERRORS as e:
                        raise AssertionError(f"{name}({first}, {count}): {e!r}, not {error}")
            elif op == 1 and not error:
                pages = range(first, first + count)
                if all(not locked[p] for p in pages):
                    lost = seg.lock_span(first, count)
                    assert 0 <= lost <= count
                    start, end = first * PAGE, (first + count) * PAGE
                    if lost == 0:
                        assert seg.read(start, end - start) == bytes(model[start:end]), \
                            "pages reported intact changed"
                    else:
                        model[start:end] = seg.read(start, end - start)
                    for p in pages:
                        locked[p] = True
                elif all(locked[p] for p in pages):
                    seg.unlock_span(first, count)
                    for p in pages:
                        locked[p] = False
            elif op == 2 and not error and not any(locked[first:first + count]):
                if fdp.ConsumeBool():
                    seg.reclaim_span(first, count)
                else:
                    seg.discard_span(first, count)
            elif op == 3:
                offset = pick_int(fdp, -2, seg.nbytes + 2)
                payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, PAGE + 3))
                ok = (is_int(offset) and 0 <= offset and offset + len(payload) <= seg.nbytes)
                if ok and all(locked[offset // PAGE:(offset + len(payload) + PAGE - 1) // PAGE]):
                    assert seg.write(offset, payload) == len(payload)
                    model[offset:offset + len(payload)] = payload
                elif not ok:
                    got = checked(lambda: seg.write(offset, payload), ERRORS, snapshot)
                    assert got is REJECTED, (offset, len(payload))
                size = pick_int(fdp, -2, seg.nbytes + 2)
                got = checked(lambda: seg.read(offset, size), ERRORS, snapshot)
                valid = is_int(offset) and is_int(size) and 0 <= offset and 0 <= size \
                    and offset + size <= seg.nbytes
                assert (got is not REJECTED) == valid, (offset, size)
                got = checked(lambda: seg.span_buffer(offset, size), ERRORS, snapshot)
                assert (got is not REJECTED) == valid, (offset, size)
            elif op == 4:
                # a strided source must be copied as it reads, or refused
                payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(2, 16))
                strided = memoryview(payload)[::2]
                if all(locked) and len(strided):
                    got = checked(lambda: seg.write(0, strided), ERRORS + (BufferError,), snapshot)
                    if got is not REJECTED:
                        model[0:len(strided)] = bytes(strided)
                        assert seg.read(0, len(strided)) == bytes(strided), "strided write"
            elif op == 5:
                spans = [(pick_int(fdp, -1, npages), pick_int(fdp, -1, npages))
                         for _ in range(fdp.ConsumeIntInRange(0, 3))]
                valid = all(span_error(npages, f, c) is None for f, c in spans)
                if valid and all(locked[p] for f, c in spans for p in range(f, f + c)) and \
                        sum(c for _, c in spans) == len({p for f, c in spans
                                                         for p in range(f, f + c)}):
                    seg.unlock_spans(spans)
                    for f, c in spans:
                        for p in range(f, f + c):
                            locked[p] = False
                elif not valid:
                    got = checked(lambda: seg.unlock_spans(spans), ERRORS, snapshot)
                    assert got is REJECTED, spans
    finally:
        seg.close()
    checked(lambda: seg.lock_span(0, 1), (ValueError,), lambda: None)


if __name__ == "__main__":
    main(test_one_input)
