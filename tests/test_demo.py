"""`discache demo` end to end on the real kernel, its table, options and exit code."""
import io
import re
import socket

import pytest
from prometheus_server import free_port

from discache import cli, force_reclaim
from discache.demo import MODES, DemoResult, Progress, draw_image, exit_code, run_demo
from discache.manager import PAGE


# Bitmaps of 192x192 are larger than the cache's largest size class (even in modes L and P):
# each has a slab of its own, so the demo's choice of bitmaps is exactly what the kernel takes.
OWN_SLAB_SIZE = 192


def table_numbers(out):
    """The counters under the phase table, by name."""
    numbers = {}
    for name in ("images", "hits", "purges detected", "regenerations", "bytes reclaimed",
                 "corrupt"):
        match = re.search(rf"^{name} +(\d+)", out, re.M)
        assert match, f"no {name!r} row in:\n{out}"
        numbers[name] = int(match.group(1))
    return numbers


@pytest.mark.parametrize("backend", ["madvfree", "memfd"])
def test_demo_runs_end_to_end_and_its_numbers_add_up(backend, capsys):
    assert cli.main(["demo", "--backend", backend, "--images", "30", "--size", str(OWN_SLAB_SIZE),
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    numbers = table_numbers(out)
    assert f"backend {backend}" in out
    assert numbers["images"] == 30 and numbers["corrupt"] == 0
    assert numbers["purges detected"] == numbers["regenerations"] == 10, "a third reclaimed"
    assert numbers["hits"] == 20
    # Every chosen bitmap lost all of its pages (each has a slab of its own at this size).
    assert numbers["bytes reclaimed"] % PAGE == 0 and numbers["bytes reclaimed"] >= 10 * PAGE
    for phase in ("generate PNGs", "decode into cache", "go idle", "kernel reclaim",
                  "access again", "verify", "total"):
        assert re.search(rf"^{phase} +\d+\.\d\ds", out, re.M), phase
    assert "30 images compared pixel for pixel with their PNG: 0 corrupt" in out


@pytest.mark.parametrize("share, purged", [(0, 0), (1, 12)])
def test_the_reclaimed_share_is_what_gets_regenerated(share, purged):
    result = run_demo(12, OWN_SLAB_SIZE, "madvfree", reclaim=share, seed=3)
    assert result.consistent and result.corrupt == 0
    assert result.chosen == purged
    assert result.purges_detected == result.regenerations <= result.chosen
    # MADV_PAGEOUT is best effort: the kernel may keep a page (one still in another CPU's batch
    # of new pages, say). Never more than the chosen pages go, and a chosen bitmap survives
    # only if the kernel kept every page of it: at most one survivor per page kept.
    kept = result.chosen_pages - result.pages_reclaimed
    assert 0 <= kept and result.chosen - result.purges_detected <= kept
    assert (result.pages_reclaimed > 0) == bool(purged)
    assert result.unlocked == 12, "every bitmap went idle"


def test_bitmaps_the_kernel_took_before_the_reclaim_phase_count_as_purges():
    """Under real memory pressure the kernel may take idle bitmaps before the demo chooses:
    they are found purged when pinned, and the numbers still add up."""
    seen = []

    def on_phase(name, cache):
        seen.append(name)
        if name == "kernel reclaim":
            assert force_reclaim(cache) > 0  # every bitmap is idle: the kernel takes them all

    result = run_demo(12, OWN_SLAB_SIZE, "madvfree", seed=4, on_phase=on_phase)
    assert seen == ["generate PNGs", "decode into cache", "go idle", "kernel reclaim",
                    "access again", "verify"]
    # The kernel took the bitmaps before the phase pinned the spared ones (best effort: a bitmap
    # whose every page it kept stays intact and is a hit).
    assert result.chosen == 4 and 1 <= result.taken_early <= 8
    assert result.purges_detected == result.regenerations == 12 - result.hits
    assert result.hits <= 8 - result.taken_early + 4
    assert result.consistent and result.corrupt == 0


def test_small_bitmaps_share_slabs_and_the_numbers_still_add_up():
    """At 32x32 bitmaps share slabs: a chosen bitmap beside a spared (pinned) one survives, so
    at most the chosen ones are lost, and every loss is regenerated."""
    result = run_demo(40, 32, "madvfree", reclaim=0.5, seed=5)
    assert result.consistent and result.corrupt == 0
    assert result.chosen == 20
    assert result.purges_detected == result.regenerations <= result.chosen + result.taken_early
    assert result.hits + result.regenerations == 40


def test_the_generated_images_vary_and_cover_every_mode():
    images = [draw_image(seed, 40) for seed in range(8)]
    assert {image.mode for image in images} == set(MODES)
    assert len({image.tobytes() for image in images}) == 8
    assert draw_image(5, 40).tobytes() == images[5].tobytes(), "deterministic by seed"


def test_metrics_port_serves_while_running_and_bad_options_are_refused(capsys):
    port = free_port()
    assert cli.main(["demo", "--images", "2", "--size", "16", "--metrics-port", str(port)]) == 0
    assert f"metrics on http://127.0.0.1:{port}/metrics" in capsys.readouterr().out
    with pytest.raises(ConnectionRefusedError):  # the server is gone with the demo
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        assert cli.main(["demo", "--images", "2", "--size", "16", "--metrics-port", busy]) == 2
        assert f"cannot serve metrics on 127.0.0.1:{busy}" in capsys.readouterr().err
    for bad in (["--images", "0"], ["--size", "-3"], ["--reclaim", "1.5"],
                ["--metrics-port", "70000"], ["--backend", "ashmem"]):
        with pytest.raises(SystemExit) as exit:
            cli.main(["demo", *bad])
        assert exit.value.code == 2
    assert cli.main(["demo", "--images", "100000", "--size", "4000"]) == 2
    assert "quarter of this machine's RAM" in capsys.readouterr().err


def test_a_corrupt_image_or_counters_that_do_not_add_up_fail_the_run(capsys):
    good = DemoResult(images=3, hits=2, purges_detected=1, regenerations=1)
    assert exit_code(good) == 0
    assert exit_code(DemoResult(images=3, hits=2, purges_detected=1, regenerations=1,
                                corrupt=1)) == 1
    assert "1 corrupt image(s)" in capsys.readouterr().err
    assert exit_code(DemoResult(images=3, hits=2, purges_detected=1, regenerations=0)) == 1
    assert "do not add up" in capsys.readouterr().err


def test_progress_bar_draws_only_when_enabled():
    stream = io.StringIO()
    bar = Progress("decode", 4, stream, enabled=True)
    for _ in range(4):
        bar.advance()
    bar.close()
    assert "[" + "#" * Progress.WIDTH + "] 4/4" in stream.getvalue()
    quiet = io.StringIO()
    Progress("decode", 4, quiet, enabled=False).advance(4)
    assert quiet.getvalue() == ""


def test_keep_serving_serves_the_final_numbers_until_interrupted():
    """--keep-serving: after the table, /metrics keeps answering with the final numbers (a 15 s
    scrape interval sees them) until SIGTERM, then the demo exits 0 and frees the port."""
    import re
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "discache", "demo", "--images", "6", "--size",
                             "16", "--metrics-port", "0", "--keep-serving", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "until interrupted" in line:
                break
        out = "".join(lines)
        url = re.search(r"serving the final numbers on (http://\S+/metrics)", out).group(1)
        hits = int(re.search(r"^hits\s+(\d+)", out, re.M).group(1))
        assert proc.poll() is None, "still serving after the table"
        for _ in range(2):
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            assert re.search(r'discache_cache_hits_total\{[^}]*name="demo"[^}]*\} '
                             + f"{hits}.0", text), text[:2000]
            time.sleep(0.6)
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "stopped serving" in rest
        port = int(url.split(":")[2].split("/")[0])
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_keep_serving_needs_a_metrics_port(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["demo", "--keep-serving"])
    assert exit.value.code == 2
    assert "give --metrics-port PORT" in capsys.readouterr().err


def test_the_table_fits_100_columns(capsys):
    assert cli.main(["demo", "--images", "8", "--size", "24", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    assert "bytes reclaimed" in out and "MADV_PAGEOUT" in out.replace("\n", " ") or "holes" in out
