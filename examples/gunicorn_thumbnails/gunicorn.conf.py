"""gunicorn settings of the thumbnail example: 4 sync workers sharing one SharedCache."""
import os

bind = os.environ.get("THUMBS_BIND", "127.0.0.1:8000")
workers = 4
worker_class = "sync"
preload_app = True  # the SharedCache is made once, in the master, before the workers fork
timeout = 30


def when_ready(server):
    """The master watches memory pressure for the whole host: a purge it makes reaches every
    worker (their next get of a purged thumbnail misses and renders it again)."""
    if os.environ.get("THUMBS_WATCH_PRESSURE", "1") == "1":
        import app

        try:
            app.cache.watch_pressure()
        except Exception as exc:  # no PSI and no /proc/meminfo: serve anyway, say so
            server.log.warning("discache: memory pressure not watched: %s", exc)
