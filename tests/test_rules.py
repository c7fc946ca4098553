"""integrations/prometheus/discache-rules.yml: valid, unit-tested, only series that exist."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from discache.metrics import DiscacheCollector
from prometheus_server import check_rules, require, rule_unit_tests

RULES_DIR = Path(__file__).resolve().parent.parent / "integrations" / "prometheus"
RULES = RULES_DIR / "discache-rules.yml"
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


def test_promtool_accepts_the_rules_and_their_unit_tests_pass():
    require()
    assert "SUCCESS" in check_rules(RULES)
    assert "SUCCESS" in rule_unit_tests(RULES_DIR / "rules-test.yml")
