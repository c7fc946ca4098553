"""A real Prometheus for tests: scrape config, run on 127.0.0.1, wait for scrapes, query."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Sequence


PROMETHEUS = os.environ.get("DISCACHE_PROMETHEUS", "/usr/bin/prometheus")
PROMTOOL = os.environ.get("DISCACHE_PROMTOOL", "/usr/bin/promtool")
INSTALL_HINT = ("apt-get install -y --no-install-recommends prometheus "
                "(.ci/run installs it when missing)")


class PrometheusError(Exception):
    """Prometheus did not start, scrape or answer as expected; the message has its log."""


def installed() -> bool:
    """Whether the prometheus and promtool binaries are here."""
    return all(os.access(p, os.X_OK) or shutil.which(p) for p in (PROMETHEUS, PROMTOOL))


def require() -> None:
    """Skip the calling test when Prometheus is missing; fail instead under .ci/run."""
    import pytest

    if installed():
        return
    message = f"prometheus is not installed: {INSTALL_HINT}"
    if os.environ.get("DISCACHE_REQUIRE_PROMETHEUS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_config(targets: Sequence[str], job: str = "discache", interval: str = "1s",
                  rule_files: Sequence[str] = ()) -> dict:
    """A prometheus.yml (as a dict) scraping the host:port targets every interval."""
    for target in targets:
        host = target.rsplit(":", 1)[0]
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            raise ValueError(f"target {target!r} is not on a loopback address")
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval,
                   "scrape_timeout": interval},
        "rule_files": list(rule_files),
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
    }


def check_rules(*paths: str | os.PathLike) -> str:
    """`promtool check rules` on the files: its output, or AssertionError with it on failure."""
    result = subprocess.run([PROMTOOL, "check", "rules", *map(str, paths)], capture_output=True,
                            text=True, timeout=60)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(f"promtool check rules failed (exit {result.returncode}):\n{output}")
    return output


def rule_unit_tests(*paths: str | os.PathLike) -> str:
    """`promtool test rules` on unit-test files: its output, or AssertionError with it."""
    result = subprocess.run([PROMTOOL, "test", "rules", *map(str, paths)], capture_output=True,
                            text=True, timeout=120)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(f"promtool test rules failed (exit {result.returncode}):\n{output}")
    return output


def check_metrics(exposition: bytes | str) -> str:
    """`promtool check metrics` (format and naming lint): its output, or AssertionError with it."""
    data = exposition.encode() if isinstance(exposition, str) else exposition
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=data, capture_output=True,
                            timeout=60)
    output = (result.stdout + result.stderr).decode()
    if result.returncode != 0:
        raise AssertionError(f"promtool check metrics failed (exit {result.returncode}):\n{output}")
    return output


class PrometheusServer:
    """One prometheus process with its own config and data directory under workdir."""

    def __init__(self, workdir: str | os.PathLike, targets: Sequence[str], job: str = "discache",
                 interval: str = "1s", rule_files: Sequence[str | os.PathLike] = ()):
        self.workdir = Path(workdir)
        self.targets = list(targets)
        self.job = job
        self.config = scrape_config(self.targets, job, interval, [str(p) for p in rule_files])
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.log_path = self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        """The base URL of the running server."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30, attempts: int = 3) -> "PrometheusServer":
        """Write the config, check it with promtool, and run prometheus until it is ready."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(json.dumps(self.config, indent=1))  # JSON is YAML
        result = subprocess.run([PROMTOOL, "check", "config", str(config_path)],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise PrometheusError(f"promtool rejects the config:\n{result.stdout}{result.stderr}")
        for _ in range(attempts):  # the free port may be taken between free_port() and bind
            self.port = free_port()
            with open(self.log_path, "w") as log:
                self.process = subprocess.Popen(
                    [PROMETHEUS, f"--config.file={config_path}",
                     f"--storage.tsdb.path={self.workdir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}",
                     "--web.enable-lifecycle", "--log.level=info"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if self._wait_ready(timeout):
                return self
            self.stop()
            if "address already in use" not in self.log():
                break
        raise PrometheusError(f"prometheus did not become ready:\n{self.log()}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def log(self) -> str:
        """What prometheus printed so far (its last 4,000 characters)."""
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def api(self, path: str, **params: str) -> dict | list:
        """The data of a successful /api/v1 answer."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # a bad query: Prometheus says why in the body
            raise PrometheusError(f"/api/v1/{path} {params}: {e.code} {e.read().decode()}") from e
        if body.get("status") != "success":
            raise PrometheusError(f"/api/v1/{path} {params}: {body}")
        return body["data"]

    def targets_health(self) -> list[dict]:
        """The active targets of /api/v1/targets."""
        return self.api("targets", state="active")["activeTargets"]

    def wait_for_scrape(self, timeout: float = 30, scrapes: int = 1) -> list[dict]:
        """Wait until every target has been scraped successfully `scrapes` times after this call."""
        deadline = time.monotonic() + timeout
        seen: dict[str, set[str]] = {}
        last: list[dict] = []
        while time.monotonic() < deadline:
            last = self.targets_health()
            for t in last:
                if t["health"] == "up":
                    seen.setdefault(t["scrapeUrl"], set()).add(t["lastScrape"])
            up = [t for t in last if t["health"] == "up" and len(seen[t["scrapeUrl"]]) >= scrapes]
            if last and len(up) == len(self.targets):
                return last
            time.sleep(0.2)
        raise PrometheusError(f"targets not scraped within {timeout}s: {last}\n{self.log()}")

    def query(self, promql: str) -> float | dict[tuple, float] | None:
        """An instant query: a float for a scalar or one-sample vector, else {labels: value}."""
        data = self.api("query", query=promql)
        kind, result = data["resultType"], data["result"]
        if kind == "scalar":
            return float(result[1])
        if kind != "vector":
            raise PrometheusError(f"{promql}: unexpected result type {kind}")
        if not result:
            return None
        values = {tuple(sorted(s["metric"].items())): float(s["value"][1]) for s in result}
        return next(iter(values.values())) if len(values) == 1 else values

    def wait_for_rules(self, timeout: float = 30) -> list[dict]:
        """The rule groups, once every rule has been evaluated without error."""
        deadline = time.monotonic() + timeout
        groups: list[dict] = []
        while time.monotonic() < deadline:
            groups = self.api("rules")["groups"]
            health = {r["health"] for g in groups for r in g["rules"]}
            if "err" in health:
                raise PrometheusError(f"a rule fails: {groups}")
            if groups and health == {"ok"}:
                return groups
            time.sleep(0.2)
        raise PrometheusError(f"rules not evaluated within {timeout}s: {groups}")

    def wait_for_value(self, promql: str, expect: float | None = None,
                       timeout: float = 30) -> float | dict[tuple, float]:
        """query() once it answers (and equals expect, if given): series appear a scrape late."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.query(promql)
            if value is not None and (expect is None or value == expect):
                return value
            time.sleep(0.2)
        raise PrometheusError(f"{promql} is {value}, not {expect}, after {timeout}s\n{self.log()}")

    def stop(self, timeout: float = 20) -> None:
        """Stop prometheus (SIGTERM, then SIGKILL) and reap it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
