"""`discache bench`: run the benchmarks under bench/ and write a Markdown and PNG report of them."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, TextIO

# group -> the bench files that feed it; a missing file leaves its group out of the run
SUITES: dict[str, tuple[str, ...]] = {
    "unmark": ("bench_pagetable.py",),
    "roundtrip": ("bench_backends.py",),
    "cache": ("bench_cache.py",),
    "sim": ("bench_sim.py",),
    "image": ("bench_imagecache.py",),
    "shared": ("bench_shared_cache.py",),
}
GROUPS = tuple(SUITES)
# what running a group needs beyond pytest and pytest-benchmark: {module: pip package}
NEEDS: dict[str, dict[str, str]] = {"cache": {"cachetools": "cachetools"},
                                    "image": {"PIL": "Pillow", "cachetools": "cachetools"}}
RUNNER = {"pytest": "pytest", "pytest_benchmark": "pytest-benchmark"}
QUICK_ENV = "DISCACHE_BENCH_QUICK"  # honoured by bench/conftest.py: pedantic rounds capped
# quick mode for plain benchmark() calls: pytest-benchmark's own calibration limits
QUICK_PYTEST_ARGS = ("--benchmark-max-time=0.05", "--benchmark-min-rounds=3",
                     "--benchmark-warmup=off")
PAGETABLE_OPS = ("unmark", "mark_volatile", "mark+unmark")
SIM_OPS = ("MADV_NONVOLATILE", "mark", "fault in", "fork+exit")
SIM_OP_PREFIXES = ("MADV_FREE", "reclaim")  # "reclaim 4096", "reclaim all volatile", ...
ROUNDTRIP_BASELINES = ("bare mmap.madvise(MADV_FREE), dirty pages",
                       "bare mmap.madvise(MADV_FREE), clean pages")

PAGE_SIZE = 4096  # for sizes given in bytes; the report may be made on another machine
Bench = dict  # one entry of pytest-benchmark's "benchmarks" list
Series = dict  # label -> {pages: seconds}


class ReportError(Exception):
    """A report cannot be made: unreadable JSON, nothing to run."""


# ---------------------------------------------------------------- reading and grouping


def load(path: str | os.PathLike) -> dict:
    """A pytest-benchmark JSON file, checked to have a list of benchmarks."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ReportError(f"{path} is not pytest-benchmark JSON (no 'benchmarks' list)")
    return data


def group_of(bench: Bench) -> str:
    """The report group of one benchmark, from its extra_info ('other' when none fits)."""
    info = bench.get("extra_info") or {}
    op = str(info.get("op", ""))
    if op.startswith("image-"):
        return "image"
    if str(bench.get("group") or "").startswith("shared "):
        return "shared"
    if "cache" in info or "impl" in info or op.startswith("cache"):
        return "cache"  # before "backend": a DiscardableCache benchmark names its backend too
    if "backend" in info:
        return "roundtrip"
    if op in PAGETABLE_OPS and "strategy" in info and "pages" in info:
        return "unmark"
    if op in SIM_OPS or op.startswith(SIM_OP_PREFIXES) or "design" in info:
        return "sim"
    return "other"


def split(benchmarks: Iterable[Bench]) -> dict[str, list[Bench]]:
    """Benchmarks by group, every group present (possibly empty)."""
    groups: dict[str, list[Bench]] = {name: [] for name in (*GROUPS, "other")}
    for bench in benchmarks:
        groups[group_of(bench)].append(bench)
    return groups


def median(bench: Bench) -> float:
    """The median time of one benchmark in seconds."""
    return float(bench["stats"]["median"])


# ---------------------------------------------------------------- Markdown


def fmt_seconds(seconds: float) -> str:
    """Seconds in the unit that reads best."""
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(ratio: float) -> str:
    """A ratio as 0.12x / 1.5x / 120x."""
    if ratio >= 100:
        return f"{ratio:.0f}x"
    if ratio < 0.1:
        return f"{ratio:.2g}x"
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.1f}x"


def fmt_rate(per_second: float, unit: str) -> str:
    """A throughput with a k/M/G prefix."""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_second >= scale:
            return f"{per_second / scale:.2f} {prefix}{unit}/s"
    return f"{per_second:.1f} {unit}/s"


def pages_header(pages: int) -> str:
    """A column header for a range size."""
    return "1 page" if pages == 1 else f"{pages} pages"


def fmt_value(value) -> str:
    """An extra_info value: floats to four significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def size_table(headers: list[str], rows: dict[tuple, dict[int, float]],
               baseline: Callable[[tuple], tuple | None], flatness: bool = False) -> list[str]:
    """Cost by pages per row; a cell reads 'cost (ratio)' where the row's baseline has that size."""
    sizes = sorted({p for by_size in rows.values() for p in by_size})
    head = [*headers, *map(pages_header, sizes), *(["largest / smallest"] if flatness else [])]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(rows, key=lambda k: tuple(map(str, k))):
        by_size = rows[key]
        base = baseline(key)
        base_sizes = rows.get(base, {}) if base is not None and base != key else {}
        cells = []
        for s in sizes:
            if s not in by_size:
                cells.append("")
            elif base_sizes.get(s):  # a zero baseline (clock granularity) has no ratio
                cells.append(f"{fmt_seconds(by_size[s])} ({fmt_ratio(by_size[s] / base_sizes[s])})")
            else:
                cells.append(fmt_seconds(by_size[s]))
        if flatness:
            own = sorted(by_size)
            cells.append(fmt_ratio(by_size[own[-1]] / by_size[own[0]])
                         if len(own) > 1 and by_size[own[0]] else "")
        out.append("| " + " | ".join([*map(str, key), *cells]) + " |")
    return out


def unmark_section(benches: list[Bench]) -> tuple[list[str], dict[str, dict[str, Series]]]:
    """PageTable unmark/mark_volatile by pages, strategy and purges, token beside walk (v14)."""
    rows: dict[tuple, dict[int, float]] = defaultdict(dict)
    pairs = {}
    for b in benches:
        info = b["extra_info"]
        if info["op"] == "mark+unmark":
            pairs[info["strategy"]] = info.get("pairs", 1) / median(b)
        else:
            rows[(info["op"], info.get("purged", 0), info["strategy"])][info["pages"]] = median(b)
    out: list[str] = []
    if rows:
        out += ["Median cost of one call from Python, by range size. In parentheses: the ratio to "
                "the `walk` strategy (v14's O(N) unmark) for the same op, purges and size; "
                "last column: the cost at the largest range over the cost at the smallest.", ""]
        out += size_table(["op", "purged", "strategy"], rows,
                          lambda k: (k[0], k[1], "walk") if k[2] != "walk" else None,
                          flatness=True)
    if pairs:
        out += [""] if out else []
        out += ["| strategy | 1-page mark+unmark pairs per second |", "|---|---|"]
        out += [f"| {s} | {fmt_rate(rate, 'pair')} |" for s, rate in sorted(pairs.items())]
    panels: dict[str, dict[str, Series]] = defaultdict(dict)
    for (op, purged, strategy), by_size in rows.items():
        panels[f"PageTable.{op}"][f"{strategy}, {purged} purged"] = by_size
    return out, panels


def roundtrip_baseline(rows: dict[tuple, dict[int, float]]) -> tuple | None:
    """The bare stdlib MADV_FREE row that backend rows are divided by."""
    stdlib = [k for k in rows if k[1] == "stdlib"]
    for op in ROUNDTRIP_BASELINES:
        if (op, "stdlib") in rows:
            return (op, "stdlib")
    madv_free = [k for k in stdlib if "MADV_FREE" in k[0]]
    return sorted(madv_free or stdlib)[0] if (madv_free or stdlib) else None


def roundtrip_section(benches: list[Bench]) -> tuple[list[str], dict[str, dict[str, Series]]]:
    """Backend costs (unlock+lock and others) beside the bare stdlib mmap.madvise(MADV_FREE)."""
    rows: dict[tuple, dict[int, float]] = defaultdict(dict)
    for b in benches:
        info = b["extra_info"]
        rows[(info.get("op", b["name"]), info["backend"])][info.get("pages", 1)] = median(b)
    base = roundtrip_baseline(rows)
    out = ["Median cost by range size."]
    if base is not None:
        out[0] += (f" In parentheses: the ratio to the baseline `{base[0]}` (stdlib, no discache) "
                   "at the same size.")
    out.append("")
    out += size_table(["op", "backend"], rows,
                      lambda k: base if k[1] != "stdlib" else None)
    panels: dict[str, dict[str, Series]] = defaultdict(dict)
    for (op, backend), by_size in rows.items():
        if backend == "stdlib" or op == "unlock+lock":
            panels["lock/unlock roundtrip"][f"{backend}: {op}"] = by_size
        else:
            panels["other backend ops"][f"{backend}: {op}"] = by_size
    return out, panels


def cache_key(info: dict) -> tuple[str, str, int]:
    """(op, implementation, size in pages) of a cache benchmark; sizes may be given in bytes."""
    impl = str(info.get("impl", info.get("cache", "?")))
    if "pages" in info:
        pages = info["pages"]
    else:
        pages = max(1, -(-int(info.get("nbytes", PAGE_SIZE)) // PAGE_SIZE))
    return str(info.get("op", "cache hit")), impl, pages


def cache_section(benches: list[Bench]) -> tuple[list[str], dict[str, dict[str, Series]]]:
    """Cache ops by value size, each against its baseline; then the targets, met or not.

    A benchmark names its baseline row in extra_info (`baseline`: an implementation, of the same
    op unless `baseline_op` says another), else it is compared with cachetools.LRUCache's same op
    (or first op); `ops` is the count of operations one call times; `target` a ratio to meet."""
    rows: dict[tuple, dict[int, float]] = defaultdict(dict)
    named: dict[tuple, tuple] = {}
    targets: dict[tuple, float] = {}
    for b in benches:
        info = b["extra_info"]
        op, impl, pages = cache_key(info)
        rows[(op, impl)][pages] = median(b) / (info.get("ops") or 1)
        if "baseline" in info:
            named[(op, impl)] = (str(info.get("baseline_op", op)), str(info["baseline"]))
        if "target" in info:
            targets[(op, impl)] = float(info["target"])
    base_name = "cachetools.LRUCache"
    bases = [k for k in rows if k[1] == base_name]

    def baseline(key):
        if key in named:
            return named[key]
        if key[1] == base_name or key in named.values() or not bases:
            return None  # a baseline has no ratio of its own
        return (key[0], base_name) if (key[0], base_name) in rows else sorted(bases)[0]

    out = ["Median cost of one operation by value size. In parentheses: the ratio to the row the "
           f"benchmark names as its baseline, else to `{base_name}` (same op where it has one) at "
           "the same size.", ""]
    out += size_table(["op", "implementation"], rows, baseline)
    if targets:
        out += ["", "Targets: the ratio to the baseline measured in the same run.", "",
                "| op | implementation | baseline | size | ratio | target | met |",
                "|---|---|---|---|---|---|---|"]
        for key in sorted(targets):
            base = baseline(key)
            against = ("" if base is None else base[1] if base[0] == key[0]
                       else f"{base[1]} ({base[0]})")
            for pages, cost in sorted(rows[key].items()):
                base_cost = rows.get(base, {}).get(pages) if base is not None else None
                ratio = cost / base_cost if base_cost else None
                met = "" if ratio is None else "yes" if ratio <= targets[key] else "no"
                out.append(f"| {key[0]} | {key[1]} | {against} | {pages_header(pages)} | "
                           f"{fmt_ratio(ratio) if ratio is not None else 'no baseline'} | "
                           f"<= {fmt_ratio(targets[key])} | {met} |")
    panels: dict[str, dict[str, Series]] = defaultdict(dict)
    for (op, impl), by_size in rows.items():
        panels[op][impl] = by_size
    return out, panels


def sim_section(benches: list[Bench]) -> tuple[list[str], dict[str, dict[str, Series]]]:
    """Simulated kernel: madvise costs by pages and design, then whole-run throughput."""
    madvise: dict[tuple, dict[int, float]] = defaultdict(dict)
    visits: dict[tuple, dict[int, float]] = defaultdict(dict)
    rest = []
    for b in benches:
        info = b["extra_info"]
        op = str(info.get("op", ""))
        if "pages" not in info:
            rest.append(b)
            continue
        if op == "MADV_NONVOLATILE" or op.startswith("MADV_FREE lock"):
            key = ("unmark", info.get("strategy", "?"))
        elif op == "mark":
            key = ("mark", info.get("design", info.get("strategy", "?")))
        else:
            rest.append(b)
            continue
        madvise[key][info["pages"]] = median(b)
        if "pte_visits" in info:
            visits[key][info["pages"]] = info["pte_visits"]
    out: list[str] = []
    if madvise:
        out += ["Simulated madvise cost by range size: unmark is MADV_NONVOLATILE (token, walk) "
                "or, for madv_free, touching every page to learn what was lost; mark is "
                "MADV_VOLATILE or MADV_FREE. In parentheses: the ratio to the walk design.", ""]

        def walk_of(key):
            walk = "walk" if key[0] == "unmark" else "volatile-walk"
            return (key[0], walk) if key[1] != walk else None

        out += size_table(["op", "design"], madvise, walk_of)
        if visits:
            sizes = sorted({p for v in visits.values() for p in v})
            out += ["", "Page entries visited per call:", "",
                    "| op | design | " + " | ".join(map(pages_header, sizes)) + " |",
                    "|---|---|" + "---|" * len(sizes)]
            for key in sorted(visits):
                out.append(f"| {key[0]} | {key[1]} | "
                           + " | ".join(f"{visits[key][s]:g}" if s in visits[key] else ""
                                        for s in sizes) + " |")
    if rest:
        out += [""] if out else []
        out += ["Throughput of whole simulated runs (median of the rounds):", "",
                "| run | parameters | median | throughput |", "|---|---|---|---|"]
        for b in sorted(rest, key=lambda b: (str(b["extra_info"].get("op", "")), b["name"])):
            info = dict(b["extra_info"])
            run = info.pop("op", None) or b.get("group") or b["name"]
            params = ", ".join(f"{k}={fmt_value(v)}" for k, v in sorted(info.items()))
            t = median(b)
            if t <= 0:
                rate = ""
            elif "ops" in info:
                rate = fmt_rate(info["ops"] / t, "op")
            elif "pages" in info:
                rate = fmt_rate(info["pages"] / t, "page")
            elif info.get("scanned"):
                rate = fmt_rate(info["scanned"] / t, "page scanned")
            else:
                rate = fmt_rate(1 / t, "run")
            out.append(f"| {run} | {params} | {fmt_seconds(t)} | {rate} |")
    panels: dict[str, dict[str, Series]] = defaultdict(dict)
    for (op, design), by_size in madvise.items():
        panels[f"simulated {op}"][design] = by_size
    return out, panels


def other_section(benches: list[Bench]) -> tuple[list[str], dict[str, dict[str, Series]]]:
    """Benchmarks no group claims, listed as they are."""
    out = ["| benchmark | extra_info | median |", "|---|---|---|"]
    for b in sorted(benches, key=lambda b: b.get("fullname", b["name"])):
        info = ", ".join(f"{k}={v}" for k, v in sorted((b.get("extra_info") or {}).items()))
        out.append(f"| {b.get('fullname', b['name'])} | {info} | {fmt_seconds(median(b))} |")
    return out, {}


def image_section(benches: list[Bench]) -> tuple[list[str], dict[str, dict[str, Series]]]:
    """ImageCache reads beside the Pillow operations their floors are multiples of."""
    by_impl = {str(b["extra_info"].get("impl", b["name"])): b for b in benches}
    out = ["Median cost of one read of a 256x256 RGBA image. Ratio: to the baseline named in the "
           "row, measured in the same run; floor: the most that ratio may be.", "",
           "| op | implementation | median | ratio | floor | met |", "|---|---|---|---|---|---|"]
    for impl, b in sorted(by_impl.items(), key=lambda kv: (str(kv[1]["extra_info"].get("op")),
                                                            "baseline" in kv[1]["extra_info"]
                                                            and kv[0] != kv[1]["extra_info"]
                                                            ["baseline"], kv[0])):
        info = b["extra_info"]
        base = by_impl.get(str(info.get("baseline", "")))
        ratio = floor = met = ""
        if base is not None and base is not b and median(base) > 0:
            value = median(b) / median(base)
            ratio = f"{fmt_ratio(value)} of `{info['baseline']}`"
            floor = fmt_ratio(float(info["floor"]))
            met = "yes" if value <= float(info["floor"]) else "**no**"
        out.append(f"| {info.get('op', '')} | {impl} | {fmt_seconds(median(b))} | {ratio} | "
                   f"{floor} | {met} |")
    return out, {}


SECTIONS = {
    "unmark": ("Unmark and mark cost by pages and strategy (PageTable)", unmark_section,
               "bench/bench_pagetable.py"),
    "roundtrip": ("Lock/unlock roundtrip by backend, against the bare stdlib madvise",
                  roundtrip_section, "bench/bench_backends.py"),
    "cache": ("Cache hit, miss and set: DiscardableCache against cachetools and "
              "functools.lru_cache", cache_section,
              "bench/bench_cache.py"),
    "sim": ("Simulated kernel: madvise cost and throughput", sim_section, "bench/bench_sim.py"),
    "image": ("ImageCache reads against their floors", image_section,
              "bench/bench_imagecache.py"),
    "shared": ("SharedCache hit against DiscardableCache, memcached, Redis and a Manager dict",
               cache_section, "bench/bench_shared_cache.py"),
    "other": ("Other benchmarks", other_section, ""),
}


# ---------------------------------------------------------------- plots


def seconds_label(seconds: float, _pos=None) -> str:
    """A y tick of a log time axis."""
    return fmt_seconds(seconds).replace(".00 ", " ")


BASELINE_LABELS = ("stdlib", "walk", "volatile-walk", "cachetools.LRUCache", "functools.lru_cache")


def is_baseline(label: str) -> bool:
    """Whether a plotted line is a baseline (drawn dashed): stdlib, v14's walk, the caches."""
    return label.startswith(BASELINE_LABELS)


def plot_group(path: Path, title: str, panels: dict[str, dict[str, Series]],
               xlabel: str = "range size (pages)") -> None:
    """One PNG: a log-log panel of cost against range size per entry, one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

    names = sorted(panels)
    fig, axes = plt.subplots(1, len(names), figsize=(6.4 * len(names), 4.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        all_sizes: set[int] = set()
        costs: list[float] = []
        for label in sorted(panels[name]):
            by_size = {p: t for p, t in panels[name][label].items() if t > 0}  # log axes
            sizes = sorted(by_size)
            all_sizes.update(sizes)
            costs += [by_size[s] for s in sizes]
            ax.plot(sizes, [by_size[s] for s in sizes], marker="o", label=label,
                    linestyle="--" if is_baseline(label) else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        # ticks at the measured sizes only, written as plain numbers
        ax.set_xticks(sorted(all_sizes), labels=[f"{s:,}" for s in sorted(all_sizes)])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(seconds_label))
        # under one decade there may be no major tick: label the minor ones instead
        narrow = bool(costs) and max(costs) / min(costs) < 10
        if narrow:  # at least a decade, so that noise does not look like a trend
            middle = (max(costs) * min(costs)) ** 0.5
            ax.set_ylim(middle / 10 ** 0.5, middle * 10 ** 0.5)
        ax.yaxis.set_minor_formatter(FuncFormatter(seconds_label) if narrow else NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("median cost per call")
        ax.set_title(name)
        ax.grid(True, which="major", alpha=0.4)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the report


def machine_line(data: dict) -> str:
    """Where and when the benchmarks ran, from pytest-benchmark's machine_info."""
    m = data.get("machine_info") or {}
    cpu = (m.get("cpu") or {})
    parts = [f"{m.get('python_implementation', 'Python')} {m.get('python_version', '?')}",
             f"{m.get('system', '?')} {m.get('release', '')}".strip(),
             f"{cpu.get('count', '?')} CPUs ({cpu.get('brand_raw', 'unknown CPU')})"]
    line = ", ".join(parts)
    if data.get("datetime"):
        line += f"; run {data['datetime']}"
    run = data.get("discache") or {}
    if "quick" in run:
        line += "; quick mode" if run["quick"] else "; full rounds"
    return line


def write_report(data: dict, out_dir: str | os.PathLike, plots: bool = True) -> Path:
    """report.md and a PNG per group into out_dir; a group without benchmarks gets a line."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = split(data["benchmarks"])
    ran = (data.get("discache") or {}).get("groups")
    lines = ["# discache benchmark report", "", machine_line(data), ""]
    for name, (title, section, source) in SECTIONS.items():
        benches = groups[name]
        if not benches:
            if name != "other":
                why = "" if ran is None or name in ran else " (not run)"
                lines += [f"No {name} benchmarks in this run{why}: the {title.lower()} table "
                          f"({source}) is left out.", ""]
            continue
        body, panels = section(benches)
        lines += [f"## {title}", "", *body, ""]
        # a cost against range size needs two sizes at least
        panels = {name: series for name, series in panels.items()
                  if len({p for by_size in series.values() for p in by_size}) > 1}
        if plots and panels:
            png = f"{name}.png"
            plot_group(out / png, title, panels,
                       "value size (pages)" if name == "cache" else "range size (pages)")
            lines += [f"![{title}]({png})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def render(data: dict) -> str:
    """The report's Markdown alone (no plots, nothing written): what bench/report.py prints."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return write_report(data, tmp, plots=False).read_text()


# ---------------------------------------------------------------- running


def bench_files(bench_dir: Path, groups: Iterable[str],
                log: TextIO | None = None) -> tuple[list[Path], list[str]]:
    """The files to run for the groups, and the groups that have them; missing files are said."""
    log = log or sys.stderr
    files, found = [], []
    for group in groups:
        present = [bench_dir / f for f in SUITES[group] if (bench_dir / f).exists()]
        if present:
            files += present
            found.append(group)
        else:
            print(f"discache bench: {group}: {', '.join(SUITES[group])} not found in {bench_dir}; "
                  "left out", file=log)
    return files, found


PROGRESS = re.compile(
    r"^(\S+::.+?)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+\[\s*(\d+)/(\d+)\]")


def run(bench_dir: Path, groups: Iterable[str], json_path: Path, quick: bool,
        log: TextIO | None = None, keep_rounds: bool = False) -> int:
    """Run pytest-benchmark on the groups' files, a progress line per benchmark; pytest's exit code.

    The JSON gets a "discache" entry (quick, groups run, seconds) and, unless keep_rounds, loses
    the time of every single round (stats.data: tens of MB), keeping the statistics."""
    log = log or sys.stderr
    files, found = bench_files(bench_dir, groups, log)
    if not files:
        raise ReportError(f"no benchmark files to run in {bench_dir}")
    cmd = [sys.executable, "-m", "pytest", *map(str, files), "-v", "-p", "no:cacheprovider",
           "-o", "console_output_style=count", "-o", "python_files=bench_*.py",
           "-o", "python_functions=test_* bench_*", "--benchmark-only",
           f"--benchmark-json={json_path}"]
    env = dict(os.environ)
    if quick:
        cmd += QUICK_PYTEST_ARGS
        env[QUICK_ENV] = "1"
    else:
        env.pop(QUICK_ENV, None)
    print(f"discache bench: running {len(files)} file(s) ({', '.join(found)}) from {bench_dir}"
          f"{' in quick mode' if quick else ''}", file=log, flush=True)
    start = time.monotonic()
    tail: list[str] = []
    # In a checkout, pytest runs from its root (its configuration, its discache); an installed
    # copy runs from the output directory, not from inside site-packages.
    cwd = bench_dir.parent if (bench_dir.parent / "pyproject.toml").exists() else json_path.parent
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = (tail + [line.rstrip("\n")])[-60:]
            m = PROGRESS.match(line)
            if m:
                node, outcome, done, total = m.groups()
                line = f"  [{done:>3}/{total}] {time.monotonic() - start:6.1f}s {outcome:<7} "
                room = 100 - len(line)
                if len(node) > room:  # the line fits a terminal: the test's name is kept whole
                    node = "..." + node[len(node) - room + 3:]
                print(line + node, file=log, flush=True)
    if proc.returncode != 0:
        print(f"discache bench: pytest failed (exit {proc.returncode}); its last lines:",
              file=log)
        print("\n".join(tail), file=log)
    if json_path.exists():
        data = load(json_path)
        data["discache"] = {"quick": quick, "groups": found,
                            "seconds": round(time.monotonic() - start, 1)}
        if not keep_rounds:
            for bench in data["benchmarks"]:
                bench.get("stats", {}).pop("data", None)
        json_path.write_text(json.dumps(data, indent=1))
    return proc.returncode


def default_bench_dir() -> Path:
    """./bench when it holds benchmarks (a checkout), else the benchmarks installed with discache
    (discache/bench), else the bench/ beside the discache package (a checkout run elsewhere)."""
    for candidate in (Path("bench"), Path(__file__).resolve().parent / "bench",
                      Path(__file__).resolve().parent.parent / "bench"):
        if any(candidate.glob("bench_*.py")):
            return candidate.resolve()
    return Path(__file__).resolve().parent / "bench"


def missing_packages(modules: dict[str, str]) -> list[str]:
    """The pip packages of the modules that cannot be imported here."""
    import importlib.util

    def absent(module: str) -> bool:
        if module in sys.modules:  # imported already, or blocked (None)
            return sys.modules[module] is None
        return importlib.util.find_spec(module) is None

    return sorted({package for module, package in modules.items() if absent(module)})


def parse_only(text: str) -> list[str]:
    """--only's comma-separated group names, checked."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in SUITES]
    if bad or not names:
        raise ValueError(f"unknown group(s) {', '.join(bad) or '(none)'}; "
                         f"choose from {','.join(GROUPS)}")
    return names


def cmd_bench(args) -> int:
    """Run the benchmarks and write a report: report.md (tables, ratios) and plots.

    Runs pytest-benchmark on the bench_*.py files of each group (--only), from a checkout's
    bench/ or from the copy installed with discache, with a progress line per benchmark; or
    renders the report of an existing pytest-benchmark JSON (--from-json).  Needs pytest,
    pytest-benchmark and matplotlib (the plots), and for some groups cachetools and Pillow: a
    missing one is named with the command that installs it.  Exit status: 0, 1 if a benchmark
    failed, 2 for a bad option, a missing package or nothing to run."""
    from .cli import missing

    out = Path(args.out)
    needed = {} if args.from_json else dict(RUNNER)
    for group in ([] if args.from_json else args.only):
        needed.update(NEEDS.get(group, {}))
    if not args.no_plots:
        needed["matplotlib"] = "matplotlib"
    absent = missing_packages(needed)
    if absent:
        what = "the plots need matplotlib, or give --no-plots; " if "matplotlib" in absent else ""
        print(f"discache bench: {missing(absent, what + 'discache bench needs them')}",
              file=sys.stderr)
        return 2
    try:
        if args.from_json:
            data = load(args.from_json)
            rc = 0
        else:
            json_path = Path(args.json) if args.json else out / "bench.json"
            json_path.parent.mkdir(parents=True, exist_ok=True)
            bench_dir = Path(args.bench_dir).resolve() if args.bench_dir else default_bench_dir()
            rc = run(bench_dir, args.only, json_path.resolve(), args.quick,
                     keep_rounds=args.keep_rounds)
            if not json_path.exists():
                print(f"discache bench: pytest wrote no {json_path}; no report", file=sys.stderr)
                return rc or 1
            data = load(json_path)
        path = write_report(data, out, plots=not args.no_plots)
    except ReportError as e:
        print(f"discache bench: {e}", file=sys.stderr)
        return 2
    pngs = sorted(p.name for p in out.glob("*.png"))
    print(f"wrote {path}" + (f" and {', '.join(pngs)}" if pngs else ""))
    return 1 if rc else 0


def add_parser(sub) -> None:
    """The `bench` subcommand."""
    from .argtypes import some_of
    from .cli import add_subcommand

    p = add_subcommand(sub, "bench", cmd_bench.__doc__ or "")
    p.add_argument("--only", type=some_of(GROUPS), default=list(GROUPS), metavar="GROUPS",
                   help=f"comma-separated groups to run, of {','.join(GROUPS)} (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="few rounds (pedantic rounds capped, short calibration): seconds, not "
                        "minutes")
    p.add_argument("--out", default="bench-report", metavar="DIR",
                   help="report directory (default: bench-report)")
    p.add_argument("--json", metavar="FILE",
                   help="where pytest-benchmark writes its JSON (default: DIR/bench.json)")
    p.add_argument("--from-json", metavar="FILE",
                   help="render the report of an existing pytest-benchmark JSON; run nothing")
    p.add_argument("--bench-dir", metavar="DIR",
                   help="the directory of bench_*.py files (default: ./bench in a checkout, "
                        "else the benchmarks installed with discache)")
    p.add_argument("--no-plots", action="store_true", help="write report.md only (no matplotlib)")
    p.add_argument("--keep-rounds", action="store_true",
                   help="keep every round's time in the JSON (stats.data; large)")
    p.set_defaults(func=cmd_bench)
