"""integrations/prometheus: the rules (valid, unit-tested) and the dashboard use real series."""
from __future__ import annotations

import json
import re
from pathlib import Path

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
