"""integrations/prometheus: the rules (valid, unit-tested) and the dashboard use real series."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from discache.metrics import DiscacheCollector
from prometheus_server import check_rules, require, rule_unit_tests

RULES_DIR = Path(__file__).resolve().parent.parent / "integrations" / "prometheus"
RULES = RULES_DIR / "discache-rules.yml"
DASHBOARD = RULES_DIR / "grafana-dashboard.json"
SERIES = re.compile(r"(?<![:\w])discache_[a-z_]+")  # not inside a recording rule's name


def exported_series() -> set[str]:
    """Every series name DiscacheCollector can export."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {family.name + suffix for family in DiscacheCollector(None).describe()
            for suffix in suffixes[family.type]}


def test_rules_refer_only_to_exported_series():
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    used = {name for r in rules for name in SERIES.findall(r["expr"])}
    assert used, "the rules use discache series"
    assert used <= exported_series(), used - exported_series()
    alerts = {r["alert"] for r in rules if "alert" in r}
    assert {"DiscachePurgeRateHigh", "DiscacheLockFailureRatioHigh"} <= alerts


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the Grafana dashboard, Grafana's variables filled in."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"].replace("$__rate_interval", "5s").replace("$name", ".*")
            for p in panels for t in p["targets"]]


def test_dashboard_refers_only_to_exported_series():
    used = {name for expr in dashboard_queries() for name in SERIES.findall(expr)}
    assert used <= exported_series(), used - exported_series()
    families = {family.name for family in DiscacheCollector(None).describe()}
    assert {f for f in families if not any(u.startswith(f) for u in used)} == set(), \
        "every family has a panel"


def test_promtool_accepts_the_rules_and_their_unit_tests_pass():
    require()
    assert "SUCCESS" in check_rules(RULES)
    assert "SUCCESS" in rule_unit_tests(RULES_DIR / "rules-test.yml")


MEMORY_SERIES = ("discache_allocated_bytes", "discache_locked_bytes", "discache_unlocked_bytes",
                 "discache_purged_bytes_total", "discache_locks_total",
                 "discache_operation_duration_seconds_bucket",
                 "discache_memory_pressure_events_total")
CACHE_SERIES = ("discache_cache_hits_total", "discache_cache_misses_total",
                "discache_regenerations_total", "discache_evictions_total")
SELECTOR = re.compile(r"(discache_[a-z_]+)(\{[^}]*\})?")


def selectors(expr):
    """(series, its label matchers) for every discache series an expression reads."""
    return [(m.group(1), m.group(2) or "") for m in SELECTOR.finditer(expr)
            if not expr[:m.start()].endswith(":")]


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_query_picks_one_layer_so_nothing_is_counted_twice(source):
    """A cache's memory is part of its manager's: memory, purges, locks, latency and pressure are
    summed over layer!~"cache|shared", the cache series over layer="cache"; a SharedCache's
    host-wide series (layer="shared", the same from every process that exports them) only under
    max, never a sum."""
    if source == "rules":
        groups = yaml.safe_load(RULES.read_text())["groups"]
        exprs = [r["expr"] for g in groups for r in g["rules"]]
    else:
        exprs = dashboard_queries()
    seen = set()
    shared_reads = 0
    for expr in exprs:
        for series, matchers in selectors(expr):
            seen.add(series)
            if 'layer="shared"' in matchers:
                shared_reads += 1
                # the innermost aggregation around this selector is a max
                before = expr[:expr.index(series + matchers)]
                aggregation = re.findall(r"\b(sum|max|min|avg|count) by \(", before)
                assert aggregation and aggregation[-1] == "max", (series, expr)
            elif series in MEMORY_SERIES:
                assert 'layer!~"cache|shared"' in matchers, (series, expr)
            elif series in CACHE_SERIES:
                assert 'layer="cache"' in matchers, (series, expr)
    assert seen & set(MEMORY_SERIES) and seen & set(CACHE_SERIES) and shared_reads
