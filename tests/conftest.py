"""Shared fixtures and hypothesis settings."""
import prometheus_server
import pytest
from hypothesis import HealthCheck, settings
from prometheus_client import start_http_server

settings.register_profile(
    "discache", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("discache")


@pytest.fixture
def prometheus(tmp_path):
    """start(targets, rule_files=()) -> a running PrometheusServer scraping them every second.

    Skips when Prometheus is not installed, unless DISCACHE_REQUIRE_PROMETHEUS=1 (.ci/run) makes
    that a failure. Every server started is stopped at the end of the test."""
    prometheus_server.require()
    servers = []

    def start(targets, **kwargs):
        server = prometheus_server.PrometheusServer(tmp_path / f"prometheus{len(servers)}",
                                                    targets, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def metrics_endpoint():
    """serve(registry) -> 'host:port' of a /metrics server on 127.0.0.1, shut down at the end."""
    servers = []

    def serve(registry):
        httpd, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
        servers.append((httpd, thread))
        return f"127.0.0.1:{httpd.server_port}"

    yield serve
    for httpd, thread in servers:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
