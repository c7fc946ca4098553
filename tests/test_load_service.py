"""integrations/prometheus/service.py: a real Prometheus scrapes the service under load, and its
answers equal the cache's own numbers once the load stops."""
from __future__ import annotations

import pytest

from integrations.prometheus.service import LoadService, main, make_value

BACKENDS = ["madvfree", "memfd"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_prometheus_scrapes_the_service_and_agrees_with_the_cache(prometheus, backend):
    service = LoadService(backend=backend, keys=300, value_size=8192, maxsize=1 << 20,
                          limit=2 << 20, idle_every=200, reclaim_every=900, pressure_every=1500)
    try:
        server = prometheus([f"{service.exporter.addr}:{service.exporter.port}"])
        service.start(seconds=60)
        server.wait_for_value('discache_cache_hits_total{name="service"}', timeout=30)
        server.wait_for_value(
            'discache_memory_pressure_events_total{name="service-manager",level="moderate"}',
            timeout=30)
        service.stop()
        snap = service.cache.metrics_snapshot()
        manager = service.manager.metrics_snapshot()
        server.wait_for_scrape(scrapes=2)  # a scrape that started after the load stopped
        assert server.query('discache_cache_hits_total{name="service"}') == snap["hits"]
        assert server.query('discache_cache_misses_total{name="service"}') == snap["misses"]
        assert server.query('discache_regenerations_total{name="service"}') \
            == snap["regenerations"]
        assert server.query(
            'discache_evictions_total{name="service",reason="purged"}') \
            == snap["evictions"]["purged"]
        assert server.query('discache_locked_bytes{name="service-manager"}') \
            == manager["locked_bytes"]
        assert server.query('discache_purged_bytes_total{name="service-manager"}') \
            == manager["purged_bytes"]
        assert server.query(
            'discache_operation_duration_seconds_count{name="service-manager",op="lock"}') \
            == manager["durations"]["lock"]["buckets"][-1][1]
        assert snap["regenerations"] > 0 and snap["hits"] > 0, "the load purged and regenerated"
        assert service.corrupt == 0
    finally:
        service.close()


def test_the_command_line_runs_and_reports(capsys):
    assert main(["--port", "0", "--seconds", "0.5", "--backend", "madvfree"]) == 0
    out = capsys.readouterr().out
    assert "metrics on http://127.0.0.1:" in out and "0 corrupt" in out


def test_values_are_deterministic():
    assert make_value(7, 100) == make_value(7, 100) != make_value(8, 100)
    assert len(make_value(1, 12345)) == 12345
