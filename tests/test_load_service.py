"""integrations/prometheus/service.py: a real Prometheus scrapes the service under load, and its
answers equal the cache's own numbers once the load stops."""
from __future__ import annotations

import re
import socket
import time

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
        # The cache's idle timer unlocks what the load left locked within 1.5 idle_unlock: the
        # numbers stand still once it has.
        deadline = time.monotonic() + 15
        while service.manager.metrics_snapshot()["locked_bytes"] and time.monotonic() < deadline:
            time.sleep(0.1)
        snap = service.cache.metrics_snapshot()
        manager = service.manager.metrics_snapshot()
        assert manager["locked_bytes"] == 0, "the idle timer unlocked every entry"
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
        # each layer once: the cache's bytes are its manager's, the rules' sum counts them once
        assert server.query('count(discache_allocated_bytes{layer="cache"})') == 1
        assert server.query('count(discache_allocated_bytes{layer="manager"})') == 1
        assert server.query('sum(discache_allocated_bytes{layer!="cache"})') \
            == manager["allocated_bytes"]
    finally:
        service.close()


def test_the_command_line_says_where_it_listens_and_reports_as_it_runs(capsys):
    assert main(["--port", "0", "--seconds", "1.5", "--every", "0.3",
                 "--backend", "madvfree"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.match(r"discache-load-service: metrics on http://127\.0\.0\.1:\d+/metrics for 1\.5 s",
                    out[0]), out
    # a line every 0.3 s at least (a slow step, a reclaim on a busy machine, may stretch one)
    progress = [line for line in out[1:-1] if re.match(r"\s*\d+\.\d s  [\d,]+ operations", line)]
    assert progress and len(progress) == len(out) - 2, out
    seconds = [float(line.split()[0]) for line in progress]
    assert seconds == sorted(seconds) and seconds[0] < 1.5, out
    assert re.match(r"discache-load-service: [\d,]+ operations, .* 0 corrupt$", out[-1]), out


def test_a_busy_port_or_a_bad_option_is_one_clear_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        assert main(["--port", str(busy), "--seconds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"discache-load-service: cannot serve metrics on 127.0.0.1:{busy}: "
                   "Address already in use (choose another --port)")
    for bad in (["--port", "http"], ["--seconds", "-1"], ["--backend", "ashmem"]):
        with pytest.raises(SystemExit) as exit:
            main(bad)
        assert exit.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"discache-load-service: error: argument {bad[0]}: expected ")


def test_a_scrape_reads_the_cache_and_its_manager_at_the_same_moment():
    """The cache is its manager's only user: a scrape during the load must find the same locked
    bytes on both layers (it used to read the cache mid-sweep, 0, and the manager later)."""
    service = LoadService(backend="madvfree", keys=300, value_size=8192, maxsize=1 << 20,
                          limit=2 << 20, idle_every=200, reclaim_every=900, pressure_every=1500)
    agree = locked = 0
    try:
        service.start(seconds=30)
        for _ in range(20):
            time.sleep(0.05)
            samples = {(s.labels["layer"], s.name): s.value
                       for family in service.exporter.collector.collect()
                       for s in family.samples if s.name == "discache_locked_bytes"}
            agree += samples[("cache", "discache_locked_bytes")] \
                == samples[("manager", "discache_locked_bytes")]
            locked += samples[("manager", "discache_locked_bytes")] > 0
    finally:
        service.close()
    assert agree == 20, f"{agree} of 20 scrapes agree"
    assert service.operations > 1000 and service.corrupt == 0


def test_values_are_deterministic():
    assert make_value(7, 100) == make_value(7, 100) != make_value(8, 100)
    assert len(make_value(1, 12345)) == 12345
