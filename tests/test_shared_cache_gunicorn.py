"""A real gunicorn (4 sync workers) serving thumbnails through one SharedCache (the example in
examples/gunicorn_thumbnails): one decode per image, one copy in memory, host-wide metrics."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from discache import SharedCache

pytest.importorskip("gunicorn", reason="pip install gunicorn (in the [test] extra)")
Image = pytest.importorskip("PIL.Image", reason="pip install Pillow")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "gunicorn_thumbnails")
IMAGES = 24
REPEATS = 4
THUMB_SIZE = "640x512"  # noise, PNG at level 1: about 1 MiB per thumbnail
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read(), response.headers["X-Worker-Pid"]


def workers_of(master: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master:
                children.append(int(entry))
    return sorted(children)


def pss(pid: int) -> dict[str, int]:
    """Proportional set sizes in bytes (resident, each shared page divided among its mappers):
    Pss (all), Pss_Anon (private heap) and Pss_Shmem (the shared cache's pages)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith("Pss"))
    return {key: int(value.split()[0]) * 1024 for key, value in fields.items()}


def pss_total(pids: list[int]) -> dict[str, int]:
    sizes = [pss(pid) for pid in pids]
    return {key: sum(size[key] for size in sizes) for key in ("Pss", "Pss_Anon", "Pss_Shmem")}


def metric_lines(text: str, cache: str) -> list[str]:
    """The cache's series, but for locked/unlocked bytes (they move as entries go idle)."""
    return sorted(line for line in text.splitlines()
                  if line.startswith("discache_") and f'name="{cache}"' in line
                  and "locked_bytes" not in line)


def sample(lines: list[str], metric: str) -> float:
    found = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(metric + "{")]
    assert len(found) == 1, (metric, lines)  # one series for the host, not one per worker
    return found[0]


@pytest.fixture
def server(tmp_path):
    source = tmp_path / "images"
    source.mkdir()
    rng = random.Random(13)
    for i in range(IMAGES):
        Image.frombytes("RGB", (800, 640), rng.randbytes(800 * 640 * 3)).save(
            source / f"img{i}.png", compress_level=1)
    cache_name = f"test-thumbs-{uuid.uuid4().hex[:8]}"
    port = free_port()
    log = tmp_path / "decodes.log"
    env = dict(os.environ, THUMBS_SOURCE=str(source), THUMBS_CACHE=cache_name,
               THUMBS_CACHE_BYTES=str(128 << 20), THUMBS_SIZE=THUMB_SIZE,
               THUMBS_DECODE_LOG=str(log), THUMBS_BIND=f"127.0.0.1:{port}",
               # glibc's default moves its mmap threshold up after the first big free, and the
               # heap then keeps the decoder's freed buffers: a fixed threshold returns them
               # (the example's documented setting; it changes nothing of the cache's memory)
               MALLOC_MMAP_THRESHOLD_="131072",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    errors = open(tmp_path / "gunicorn.log", "wb")
    master = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                               "app:application"], cwd=EXAMPLE, env=env,
                              stdout=errors, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while len(workers_of(master.pid)) < 4 or not _answers(base + "/stats"):
            assert master.poll() is None, (tmp_path / "gunicorn.log").read_text()
            assert time.monotonic() < deadline, "gunicorn did not start its 4 workers"
            time.sleep(0.1)
        yield base, master.pid, cache_name, log
    finally:
        master.send_signal(signal.SIGTERM)
        try:
            master.wait(20)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait()
        errors.close()
        try:
            SharedCache.unlink(cache_name)
        except FileNotFoundError:
            pass


def _answers(url: str) -> bool:
    try:
        fetch(url)
        return True
    except OSError:
        return False


def test_gunicorn_workers_share_one_copy_and_one_decode_per_image(server):
    base, master, cache_name, log = server
    workers = workers_of(master)
    assert len(workers) == 4
    before = pss_total(workers)
    anon_before = {pid: pss(pid)["Pss_Anon"] for pid in workers}
    names = [f"img{i}.png" for i in range(IMAGES)]
    with ThreadPoolExecutor(8) as pool:
        first = dict(zip(names, pool.map(lambda n: fetch(f"{base}/thumb/{n}"), names)))
        again = names * REPEATS
        random.Random(1).shuffle(again)
        later = list(pool.map(lambda n: (n, fetch(f"{base}/thumb/{n}")), again))
    for name, (body, _) in later:
        assert body == first[name][0]  # every worker serves the same bytes
    assert all(body.startswith(b"\x89PNG") for body, _ in first.values())
    pids = {pid for _, pid in first.values()} | {pid for _, (_, pid) in later}
    assert len(pids) >= 2 and pids <= {str(pid) for pid in workers}, pids

    # one decode per distinct image, whichever worker got each request
    decodes = log.read_text().splitlines()
    assert len(decodes) == IMAGES, decodes
    assert sorted(line.split()[1] for line in decodes) == sorted(names)

    # one copy: the workers' memory together grew by about the thumbnails' size, not 4 times
    thumbs = sum(-(-len(body) // PAGE) * PAGE for body, _ in first.values())
    after = pss_total(workers)
    grown = {key: after[key] - before[key] for key in after}
    assert thumbs > 16 << 20
    # the shared pages: once for the four workers (a private cache per worker: up to 4 times)
    assert 0.9 * thumbs < grown["Pss_Shmem"] < 1.15 * thumbs, (grown, thumbs)
    # no worker keeps the thumbnails privately: what its heap kept of the decodes is far less
    anon_grown = {pid: pss(pid)["Pss_Anon"] - anon_before[pid] for pid in workers}
    assert all(n < 0.3 * thumbs for n in anon_grown.values()), (anon_grown, thumbs)
    # all told about one copy (measured: 1.35-1.4x, the rest is each worker's heap after its
    # first requests, ~2 MiB); four private caches would be more than 4x
    assert grown["Pss"] < 1.75 * thumbs, (grown, anon_grown, thumbs)
    stats_body, _ = fetch(base + "/stats")
    import json

    stats = json.loads(stats_body)
    assert stats["allocated_bytes"] == thumbs and stats["entries"] == IMAGES

    # metrics: host-wide and identical from any worker, no per-worker double counting
    requests = IMAGES * (1 + REPEATS)
    seen = {}
    for _ in range(12):
        body, pid = fetch(base + "/metrics")
        seen[pid] = metric_lines(body.decode(), cache_name)
    assert len(set(map(tuple, seen.values()))) == 1, seen  # the same text from every worker
    lines = next(iter(seen.values()))
    assert sample(lines, "discache_cache_misses_total") == IMAGES
    assert sample(lines, "discache_cache_hits_total") == requests - IMAGES
    assert sample(lines, "discache_allocated_bytes") == thumbs
    assert all('layer="shared"' in line for line in lines)
