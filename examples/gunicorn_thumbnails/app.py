"""Thumbnails served by a pre-fork server through one discache.SharedCache for every worker.

    gunicorn -c gunicorn.conf.py app:application      (from this directory)

GET /thumb/<image>  a PNG thumbnail of <image> (a file in $THUMBS_SOURCE), decoded once per host:
                    every worker reads the one copy in the shared cache
GET /metrics        Prometheus metrics of the shared cache: host-wide, the same from any worker
GET /stats          the cache's stats() as JSON, and the pid of the worker that answered

The cache is made at import; gunicorn.conf.py preloads the app, so it exists before the fork and
every worker inherits it (discache gives each child its own lock description and counter slot).
Under memory pressure the master purges the idle thumbnails for all the workers (see
gunicorn.conf.py's when_ready).  Settings: THUMBS_SOURCE (directory of images), THUMBS_CACHE
(cache name), THUMBS_CACHE_BYTES (its size), THUMBS_SIZE (e.g. 640x512), THUMBS_DECODE_LOG (a
file that gets one line per decode, for tests and curiosity).  Running gunicorn with
MALLOC_MMAP_THRESHOLD_=131072 in its environment keeps the decoders' freed buffers from staying in
each worker's heap (glibc otherwise raises that threshold after the first large free).
"""
from __future__ import annotations

import io
import json
import os
import re
from typing import Callable, Iterable

from PIL import Image
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

import discache
from discache.metrics import DiscacheCollector

SOURCE = os.environ.get("THUMBS_SOURCE", "images")
CACHE_NAME = os.environ.get("THUMBS_CACHE", "thumbnails")
CACHE_BYTES = int(os.environ.get("THUMBS_CACHE_BYTES", str(256 << 20)))
SIZE = tuple(int(n) for n in os.environ.get("THUMBS_SIZE", "640x512").split("x"))
DECODE_LOG = os.environ.get("THUMBS_DECODE_LOG")
IMAGE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")

cache = discache.SharedCache(CACHE_NAME, CACHE_BYTES)
registry = CollectorRegistry()
DiscacheCollector(registry).watch(cache, CACHE_NAME)  # layer="shared": host-wide numbers

Respond = Callable[[str, list], object]


def _warm_up() -> None:
    """Load Pillow's plugins and codecs now: with preload_app this happens once, in the master,
    and the workers share those pages instead of each loading them at its first decode."""
    out = io.BytesIO()
    Image.new("RGB", (64, 64)).save(out, "PNG", compress_level=1)
    with Image.open(io.BytesIO(out.getvalue())) as image:
        image.convert("RGB").resize((32, 32))
    Image.init()


_warm_up()


def render(name: str) -> bytes:
    """Decode the source image and encode its thumbnail (the expensive part)."""
    with Image.open(os.path.join(SOURCE, name)) as image:
        thumb = image.convert("RGB").resize(SIZE)
    out = io.BytesIO()
    thumb.save(out, "PNG", compress_level=1)
    if DECODE_LOG:
        with open(DECODE_LOG, "a") as log:  # one short O_APPEND write: lines never interleave
            log.write(f"{os.getpid()} {name}\n")
    return out.getvalue()


def thumbnail(name: str) -> bytes:
    return cache.get_or_create(f"thumb:{name}:{SIZE[0]}x{SIZE[1]}", lambda: render(name))


def application(environ: dict, start_response: Respond) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    pid = ("X-Worker-Pid", str(os.getpid()))
    if path.startswith("/thumb/"):
        name = path[len("/thumb/"):]
        if not IMAGE_NAME.fullmatch(name) or name.startswith(".") or \
                not os.path.isfile(os.path.join(SOURCE, name)):
            start_response("404 Not Found", [("Content-Type", "text/plain"), pid])
            return [b"no such image\n"]
        body = thumbnail(name)
        start_response("200 OK", [("Content-Type", "image/png"),
                                  ("Content-Length", str(len(body))), pid])
        return [body]
    if path == "/metrics":
        body = generate_latest(registry)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), pid])
        return [body]
    if path == "/stats":
        body = json.dumps({"pid": os.getpid(), **cache.stats()}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), pid])
        return [body]
    start_response("404 Not Found", [("Content-Type", "text/plain"), pid])
    return [b"try /thumb/<image>, /metrics or /stats\n"]
