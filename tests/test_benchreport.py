"""`discache bench`: the report of hand-written JSON for every group, and of a small real run."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from discache import benchreport, cli

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def entry(name: str, median: float, **extra) -> dict:
    """One pytest-benchmark entry, as much of it as the report reads."""
    return {"name": name, "fullname": f"bench/x.py::{name}", "group": None,
            "stats": {"median": median, "rounds": 5}, "extra_info": extra}


def every_group() -> list[dict]:
    benches = []
    for pages, walk in ((1, 100e-9), (4096, 1e-6), (65536, 20e-6)):
        benches.append(entry(f"unmark-walk-{pages}", walk, op="unmark", strategy="walk",
                             pages=pages, purged=0))
        benches.append(entry(f"unmark-token-{pages}", 50e-9, op="unmark", strategy="token",
                             pages=pages, purged=0))
    benches.append(entry("pairs", 2e-3, op="mark+unmark", strategy="token", pages=1, purged=0,
                         pairs=10_000))
    for pages in (1, 16):
        benches.append(entry(f"bare-{pages}", 1e-6 * pages, backend="stdlib", pages=pages,
                             op="bare mmap.madvise(MADV_FREE), dirty pages"))
        benches.append(entry(f"rt-{pages}", 1.2e-6 * pages, op="unlock+lock",
                             backend="madvfree", pages=pages))
        benches.append(entry(f"hit-ct-{pages}", 200e-9, op="cache hit",
                             cache="cachetools.LRUCache", pages=pages))
        benches.append(entry(f"hit-lru-{pages}", 50e-9, op="cache hit",
                             cache="functools.lru_cache", pages=pages))
    # bench_cache.py's own keys: impl, nbytes, and a backend that must not make it a roundtrip
    benches.append(entry("dc-hit", 100e-9, op="cache-hit", impl="DiscardableCache[memfd]",
                         backend="memfd", nbytes=4096))
    benches.append(entry("ct-hit", 400e-9, op="cache-hit", impl="cachetools.LRUCache",
                         nbytes=4096))
    benches.append(entry("dc-relock", 2e-6, op="cache-relock", impl="DiscardableCache[memfd]",
                         backend="memfd", nbytes=4096))
    for pages, walk in ((64, 4e-6), (4096, 100e-6)):
        benches.append(entry(f"sim-walk-{pages}", walk, op="MADV_NONVOLATILE", strategy="walk",
                             pages=pages, pte_visits=pages))
        benches.append(entry(f"sim-token-{pages}", 1e-6, op="MADV_NONVOLATILE",
                             strategy="token", pages=pages, pte_visits=0))
    benches.append(entry("fault", 2e-3, op="fault in", pages=65536))
    benches.append(entry("reclaim-all", 4e-3, op="reclaim all volatile", pages=65536,
                         scanned=131072))
    benches.append(entry("mystery", 3e-3, op="something new"))
    benches.append(entry("sizeless", 1e-3, op="unmark", strategy="token"))  # no pages: "other"
    benches.append(entry("sim-sizeless", 1e-3, op="mark", design="madv_free"))  # throughput row
    # bench_imagecache.py: each ImageCache row names its baseline and floor
    benches.append(entry("frombuffer", 3e-6, op="image-view", impl="Image.frombuffer(bytearray)",
                         baseline="Image.frombuffer(bytearray)", floor=1.5))
    benches.append(entry("view", 4e-6, op="image-view", impl="ImageCache.view_image[memfd]",
                         baseline="Image.frombuffer(bytearray)", floor=1.5))
    benches.append(entry("copy", 8e-6, op="image-get", impl="Image.copy()",
                         baseline="Image.copy()", floor=1.2))
    benches.append(entry("get", 12e-6, op="image-get", impl="ImageCache.get[memfd]",
                         baseline="Image.copy()", floor=1.2))
    benches.append(entry("lru", 1e-7, op="image-lookup", impl="cachetools.LRUCache[key]"))
    # bench_shared_cache.py: its pytest-benchmark group names it; rows name their baseline
    for name, median, extra in (
            ("dc", 130e-9, dict(op="in-process", impl="DiscardableCache[madvfree]")),
            ("sc", 180e-9, dict(op="in-process", impl="SharedCache",
                                baseline="DiscardableCache[madvfree]", target=2.0)),
            ("mc", 90e-6, dict(op="memcached", impl="memcached GET (pymemcache)")),
            ("sc-mc", 180e-9, dict(op="memcached", impl="SharedCache",
                                   baseline="memcached GET (pymemcache)", target=0.01))):
        row = entry(f"shared-{name}", median, nbytes=4096, **extra)
        row["group"] = "shared get hit, 4 KiB value"
        benches.append(row)
    return benches


def rows_of(md: str, first_cell: str) -> list[list[str]]:
    """The cells of the table rows whose first cell is first_cell."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith(f"| {first_cell} |")]


def test_every_group_gets_its_table_ratios_and_plot(tmp_path):
    path = benchreport.write_report({"benchmarks": every_group()}, tmp_path)
    md = path.read_text()
    for name, (title, _, _) in benchreport.SECTIONS.items():
        assert f"## {title}" in md, name
    assert "left out" not in md
    token = next(r for r in rows_of(md, "unmark") if r[2] == "token")
    # 50 ns against walk's 100 ns, 1 us and 20 us at the same sizes; flat: 1.00x
    assert token[3:] == ["50 ns (0.50x)", "50 ns (0.05x)", "50 ns (0.0025x)", "1.00x"]
    walk = next(r for r in rows_of(md, "unmark") if r[2] == "walk")
    assert walk[3:] == ["100 ns", "1.00 us", "20.00 us", "200x"]
    assert "| token | 5.00 Mpair/s |" in md
    assert rows_of(md, "unlock+lock") == [["unlock+lock", "madvfree", "1.20 us (1.20x)",
                                           "19.20 us (1.20x)"]]
    assert "baseline `bare mmap.madvise(MADV_FREE), dirty pages`" in md
    assert rows_of(md, "cache hit")[1] == ["cache hit", "functools.lru_cache", "50 ns (0.25x)",
                                           "50 ns (0.25x)"]
    assert ["unmark", "token", "1.00 us (0.25x)", "1.00 us (0.01x)"] in rows_of(md, "unmark")
    assert ["unmark", "walk", "64", "4096"] in rows_of(md, "unmark"), "pages visited"
    assert "| fault in | pages=65536 | 2.00 ms | 32.77 Mpage/s |" in md
    assert "| reclaim all volatile | pages=65536, scanned=131072 | 4.00 ms | 16.38 Mpage/s |" in md
    assert "| bench/x.py::mystery | op=something new | 3.00 ms |" in md
    assert "| bench/x.py::sizeless | op=unmark, strategy=token | 1.00 ms |" in md
    assert "| mark | design=madv_free | 1.00 ms | 1.00 krun/s |" in md
    assert rows_of(md, "cache-hit") == [
        ["cache-hit", "DiscardableCache[memfd]", "100 ns (0.25x)", ""],
        ["cache-hit", "cachetools.LRUCache", "400 ns", ""]]
    # no cachetools relock: the ratio is to the first cachetools hit row ("cache hit", 200 ns)
    assert rows_of(md, "cache-relock") == [["cache-relock", "DiscardableCache[memfd]",
                                            "2.00 us (10.0x)", ""]]
    assert "memfd" not in md.split("## Lock/unlock")[1].split("## Cache")[0]
    assert rows_of(md, "image-view") == [
        ["image-view", "Image.frombuffer(bytearray)", "3.00 us", "", "", ""],
        ["image-view", "ImageCache.view_image[memfd]", "4.00 us",
         "1.33x of `Image.frombuffer(bytearray)`", "1.50x", "yes"]]
    assert rows_of(md, "image-get")[1] == ["image-get", "ImageCache.get[memfd]", "12.00 us",
                                           "1.50x of `Image.copy()`", "1.20x", "**no**"]
    assert rows_of(md, "image-lookup") == [["image-lookup", "cachetools.LRUCache[key]", "100 ns",
                                            "", "", ""]]
    shared = md.split("## SharedCache hit")[1].split("\n## ")[0]
    assert rows_of(shared, "in-process") == [
        ["in-process", "DiscardableCache[madvfree]", "130 ns"],
        ["in-process", "SharedCache", "180 ns (1.38x)"],
        ["in-process", "SharedCache", "DiscardableCache[madvfree]", "1 page", "1.38x",
         "<= 2.00x", "yes"]]
    assert rows_of(shared, "memcached")[-1] == ["memcached", "SharedCache",
                                                "memcached GET (pymemcache)", "1 page", "0.002x",
                                                "<= 0.01x", "yes"]
    for png in ("unmark.png", "roundtrip.png", "cache.png", "sim.png"):
        assert f"]({png})" in md
        data = (tmp_path / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 600 and height >= 400
    assert not (tmp_path / "other.png").exists()


def test_groups_without_benchmarks_are_left_out_with_a_line(tmp_path):
    only_cache = [b for b in every_group() if "cache" in b["extra_info"]]
    md = benchreport.write_report({"benchmarks": only_cache}, tmp_path).read_text()
    assert "## Cache hit" in md
    for name in ("unmark", "roundtrip", "sim"):
        assert f"No {name} benchmarks in this run" in md
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["cache.png"]


def test_an_empty_run_is_a_report_of_left_out_groups(tmp_path):
    md = benchreport.write_report({"benchmarks": []}, tmp_path).read_text()
    assert md.count("is left out") == len(benchreport.GROUPS)
    assert not list(tmp_path.glob("*.png"))


def test_from_json_renders_without_running(tmp_path, capsys):
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"benchmarks": every_group()}))
    assert cli.main(["bench", "--from-json", str(src), "--out", str(tmp_path / "r")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "r" / "report.md").read_text().count("## ") == len(benchreport.SECTIONS)


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"), ("{", "is not JSON"), ('{"x": 1}', "no 'benchmarks' list"),
])
def test_unreadable_json_is_a_clear_error(tmp_path, capsys, content, message):
    src = tmp_path / "in.json"
    if content is not None:
        src.write_text(content)
    assert cli.main(["bench", "--from-json", str(src), "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "report.md").exists()


def test_only_rejects_unknown_groups(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--only", "unmark,bogus"])
    assert exc.value.code == 2
    assert "bogus" in capsys.readouterr().err


def test_a_missing_bench_file_leaves_its_group_out(tmp_path, capsys):
    """bench_backends.py may not exist yet: --only roundtrip then has nothing to run."""
    (tmp_path / "bench").mkdir()
    rc = cli.main(["bench", "--only", "roundtrip", "--bench-dir", str(tmp_path / "bench"),
                   "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bench_backends.py not found" in err and "no benchmark files to run" in err


def test_quick_run_of_the_pagetable_benchmarks(tmp_path, capsys):
    """A real run: bench/bench_pagetable.py in quick mode, then its report and plot."""
    out = tmp_path / "report"
    rc = cli.main(["bench", "--only", "unmark", "--quick", "--out", str(out),
                   "--bench-dir", str(ROOT / "bench")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads((out / "bench.json").read_text())
    assert data["discache"] == {"quick": True, "groups": ["unmark"],
                                "seconds": data["discache"]["seconds"]}
    assert data["benchmarks"] and all(b["stats"]["rounds"] <= 30 for b in data["benchmarks"])
    assert not any("data" in b["stats"] for b in data["benchmarks"]), "rounds dropped by default"
    total = len(data["benchmarks"])
    assert f"[{total:>3}/{total}]" in captured.err, "a progress line per benchmark"
    md = (out / "report.md").read_text()
    rows = rows_of(md, "unmark")
    assert {(r[1], r[2]) for r in rows} == {(p, s) for p in ("0", "3") for s in ("token", "walk")}
    assert all(len(r) == 3 + 5 + 1 and all(r[3:]) for r in rows), "every size measured"
    assert "No cache benchmarks in this run (not run)" in md
    assert (out / "unmark.png").read_bytes().startswith(PNG_MAGIC)


def test_report_script_prints_the_tables(tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"benchmarks": every_group()}))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(src)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| unmark | 0 | token | 50 ns (0.50x) |" in result.stdout
    assert not list(tmp_path.glob("*.png"))


def test_keep_rounds_run_of_the_cache_benchmarks(tmp_path, capsys):
    """A real run of bench/bench_cache.py that keeps every round's time in the JSON."""
    out = tmp_path / "report"
    rc = cli.main(["bench", "--only", "cache", "--quick", "--keep-rounds", "--out", str(out),
                   "--bench-dir", str(ROOT / "bench")])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "bench.json").read_text())
    impls = {b["extra_info"]["impl"] for b in data["benchmarks"]}
    assert {"cachetools.LRUCache", "functools.lru_cache"} < impls
    assert all(len(b["stats"]["data"]) == b["stats"]["rounds"] for b in data["benchmarks"])
    md = (out / "report.md").read_text()
    assert {r[1] for r in rows_of(md, "cache-hit")} == {
        i for b in data["benchmarks"] if b["extra_info"]["op"] == "cache-hit"
        for i in [b["extra_info"]["impl"]]}
    assert "No unmark benchmarks in this run (not run)" in md


def test_named_baselines_ops_and_targets():
    """bench_cache.py's pairs: a baseline named in extra_info, batches of ops, target ratios."""
    benches = [
        entry("ct-set", 300e-9, op="cache-set", impl="cachetools.LRUCache", nbytes=4096),
        entry("dc-set", 600e-9, op="cache-set", impl="DiscardableCache[madvfree]", nbytes=4096,
              baseline="cachetools.LRUCache", target=3.0),
        entry("ct-cached", 800e-9, op="cache-cached-hit", impl="cachetools.cached(LRUCache)",
              nbytes=4096),
        entry("dc-cached", 2e-6, op="cache-cached-hit", impl="discache.cached[madvfree]",
              nbytes=4096, baseline="cachetools.cached(LRUCache)", target=1.5),
        # a batch of 1000 gets per call: the report shows the cost of one
        entry("small", 100e-6, op="cache-hit-scale", impl="1k", nbytes=100, ops=1000,
              baseline="nowhere"),
        entry("large", 120e-6, op="cache-hit-scale", impl="1M", nbytes=100, ops=1000,
              baseline="1k", target=1.5),
        entry("relock", 3e-6, op="cache-relock", impl="DiscardableCache[madvfree]",
              nbytes=4096, baseline="cachetools.LRUCache", baseline_op="cache-set"),
    ]
    md = benchreport.render({"benchmarks": benches})
    assert rows_of(md, "cache-set") == [
        ["cache-set", "DiscardableCache[madvfree]", "600 ns (2.00x)"],
        ["cache-set", "cachetools.LRUCache", "300 ns"],
        ["cache-set", "DiscardableCache[madvfree]", "cachetools.LRUCache", "1 page", "2.00x",
         "<= 3.00x", "yes"]]
    assert rows_of(md, "cache-cached-hit") == [
        ["cache-cached-hit", "cachetools.cached(LRUCache)", "800 ns"],  # a baseline: no ratio
        ["cache-cached-hit", "discache.cached[madvfree]", "2.00 us (2.50x)"],
        ["cache-cached-hit", "discache.cached[madvfree]", "cachetools.cached(LRUCache)",
         "1 page", "2.50x", "<= 1.50x", "no"]]
    assert rows_of(md, "cache-hit-scale") == [
        ["cache-hit-scale", "1M", "120 ns (1.20x)"],
        ["cache-hit-scale", "1k", "100 ns"],  # its named baseline was not measured
        ["cache-hit-scale", "1M", "1k", "1 page", "1.20x", "<= 1.50x", "yes"]]
    assert rows_of(md, "cache-relock") == [["cache-relock", "DiscardableCache[madvfree]",
                                            "3.00 us (10.0x)"]]


FAILING_BENCH = '''
def bench_fine(benchmark):
    benchmark.extra_info.update(op="cache hit", cache="dict", pages=1)
    benchmark({1: 2}.get, 1)


def bench_broken(benchmark):
    benchmark(sum, [1])
    raise AssertionError("this benchmark's check fails")
'''


def test_a_failing_benchmark_fails_the_command_but_not_the_report(tmp_path, capsys):
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    (bench_dir / "bench_cache.py").write_text(FAILING_BENCH)
    rc = cli.main(["bench", "--only", "cache", "--quick", "--bench-dir", str(bench_dir),
                   "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "FAILED" in err and "this benchmark's check fails" in err
    md = (tmp_path / "r" / "report.md").read_text()
    assert rows_of(md, "cache hit")[0][:2] == ["cache hit", "dict"]


def test_zero_medians_and_a_pairs_only_group_do_not_break_the_report(tmp_path):
    benches = [entry("pairs", 1e-3, op="mark+unmark", strategy="token", pages=1, pairs=10),
               entry("zero", 0.0, op="cache hit", cache="cachetools.LRUCache", pages=1),
               entry("hit", 1e-7, op="cache hit", cache="x", pages=1),
               entry("fork", 0.0, op="fork+exit", pages=64)]
    md = benchreport.write_report({"benchmarks": benches}, tmp_path).read_text()
    assert "| token | 10.00 kpair/s |" in md
    assert rows_of(md, "cache hit") == [["cache hit", "cachetools.LRUCache", "0 ns"],
                                        ["cache hit", "x", "100 ns"]]
    assert "| fork+exit | pages=64 | 0 ns |  |" in md
    assert not list(tmp_path.glob("*.png")), "one size is no cost-against-size plot"
