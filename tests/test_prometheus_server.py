"""The Prometheus test infrastructure, proved on a real server scraping discache's own numbers."""
from __future__ import annotations

import os

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from discache import PageTable
from prometheus_server import PrometheusServer, check_rules, require, scrape_config

RULES = """\
groups:
  - name: discache-test
    rules:
      - record: discache_test:pte_visits:rate1m
        expr: rate(discache_test_pagetable_pte_visits_total[1m])
      - alert: DiscacheTestBookkeepingLarge
        expr: discache_test_pagetable_bookkeeping_bytes > 1e9
        for: 5m
        labels: {severity: warning}
        annotations: {summary: "PageTable bookkeeping above 1 GB"}
"""
BROKEN_RULES = """\
groups:
  - name: broken
    rules:
      - alert: Broken
        expr: rate(discache_test_pagetable_pte_visits_total[1m]
"""


def pagetable_registry():
    """A registry with the state of two real PageTables (token and walk) after the same work."""
    registry = CollectorRegistry()
    bookkeeping = Gauge("discache_test_pagetable_bookkeeping_bytes", "PageTable.nbytes",
                        ["strategy"], registry=registry)
    visits = Counter("discache_test_pagetable_pte_visits", "PageTable.pte_visits",
                     ["strategy"], registry=registry)
    pages = Gauge("discache_test_pagetable_pages", "Pages by state", ["strategy", "state"],
                  registry=registry)
    tables = {}
    for strategy in ("token", "walk"):
        pt = PageTable(4096, strategy)
        pt.populate(0, 4096)
        pt.mark_volatile(0, 1024)
        for page in (3, 500, 1000):
            assert pt.purge(page)
        assert pt.unmark(0, 512) is True
        tables[strategy] = pt
        bookkeeping.labels(strategy).set(pt.nbytes)
        visits.labels(strategy).inc(pt.pte_visits)
        for state in ("absent", "present", "volatile", "purged"):
            count = sum(pt.state(p) == state for p in range(4096))
            pages.labels(strategy, state).set(count)
    return registry, tables, bookkeeping


def samples(registry):
    """Every (name, labels, value) the registry exposes."""
    return [(s.name, s.labels, s.value) for m in registry.collect() for s in m.samples]


def selector(name, labels):
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f'{name}{{{inner},job="discache"}}'


def test_prometheus_scrapes_discache_numbers_and_loads_rules(prometheus, metrics_endpoint,
                                                             tmp_path):
    registry, tables, bookkeeping = pagetable_registry()
    assert tables["walk"].pte_visits > tables["token"].pte_visits  # the numbers differ by design
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES)
    target = metrics_endpoint(registry)
    server = prometheus([target], rule_files=[rules])
    server.wait_for_scrape()
    assert server.wait_for_value('up{job="discache"}') == 1.0
    exposed = samples(registry)
    assert len(exposed) >= 2 + 2 + 8
    for name, labels, value in exposed:
        assert server.wait_for_value(selector(name, labels)) == value, (name, labels)
    assert server.query('sum(discache_test_pagetable_pages{strategy="walk"})') == 4096.0
    # a change is seen at the next scrape
    bookkeeping.labels("token").set(12345)
    assert server.wait_for_value(
        'discache_test_pagetable_bookkeeping_bytes{strategy="token"}', expect=12345.0) == 12345.0
    groups = server.api("rules")["groups"]
    assert [g["name"] for g in groups] == ["discache-test"]
    assert {r["health"] for g in groups for r in g["rules"]} <= {"ok", "unknown"}


def test_prometheus_process_is_stopped_at_exit(tmp_path, metrics_endpoint):
    require()
    target = metrics_endpoint(pagetable_registry()[0])
    with PrometheusServer(tmp_path / "p", [target]) as server:
        pid = server.process.pid
        assert server.query("vector(42)") == 42.0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert server.process is None


def test_scrape_config_refuses_non_loopback_targets():
    assert scrape_config(["127.0.0.1:9"])["global"]["scrape_interval"] == "1s"
    with pytest.raises(ValueError, match="loopback"):
        scrape_config(["10.0.0.1:9100"])


def test_check_rules_accepts_good_rules_and_reports_broken_ones(tmp_path):
    require()
    good, broken = tmp_path / "good.yml", tmp_path / "broken.yml"
    good.write_text(RULES)
    broken.write_text(BROKEN_RULES)
    assert "SUCCESS: 2 rules found" in check_rules(good)
    with pytest.raises(AssertionError, match="FAILED"):
        check_rules(broken)
