"""What every fuzz target shares: the import path, a checked call, and atheris' main loop."""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

# Run from a checkout (python fuzz/fuzz_x.py) without installing: the in-place build is found.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# The tests' oracles (tests/pagetable_model.py) are not part of the installed package.
if os.path.join(ROOT, "tests") not in sys.path:
    sys.path.append(os.path.join(ROOT, "tests"))

import atheris  # noqa: E402

REJECTED = object()
# Arguments that are not what an API takes: each must raise TypeError, or for a huge int
# OverflowError or ValueError/IndexError, never crash.
BAD_INTS = (-(1 << 64), -(1 << 31), -1, 1 << 31, 1 << 62, 1 << 64, 1 << 100)
NOT_INTS = (1.5, "3", None, b"\x01", [1], 2j)


def checked(call: Callable[[], Any], allowed: tuple[type[BaseException], ...],
            snapshot: Callable[[], Any]) -> Any:
    """call()'s result; REJECTED if it raised one of `allowed`, after checking that the state
    `snapshot()` sees did not change. Any other exception propagates: atheris reports a crash."""
    before = snapshot()
    try:
        return call()
    except allowed:
        after = snapshot()
        if after != before:
            raise AssertionError(f"a rejected call changed the state:\n  before {before!r}\n"
                                 f"  after  {after!r}") from None
        return REJECTED


def pick_int(fdp: "atheris.FuzzedDataProvider", low: int, high: int) -> Any:
    """Mostly an int in [low, high]; sometimes a huge int, a negative one or a non-int."""
    choice = fdp.ConsumeIntInRange(0, 15)
    if choice == 14:
        return BAD_INTS[fdp.ConsumeIntInRange(0, len(BAD_INTS) - 1)]
    if choice == 15:
        return NOT_INTS[fdp.ConsumeIntInRange(0, len(NOT_INTS) - 1)]
    return fdp.ConsumeIntInRange(low, high)


def is_int(value: Any) -> bool:
    """True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


# libFuzzer's -jobs/-workers write fuzz-N.log into the current directory: this one instead
# (ignored by git; DISCACHE_FUZZ_LOGS moves it).
LOG_DIR = os.environ.get("DISCACHE_FUZZ_LOGS") or os.path.join(ROOT, "fuzz", "logs")
PATH_FLAGS = ("-artifact_prefix", "-exact_artifact_path", "-dict", "-merge_control_file",
              "-features_dir", "-seed_inputs")


def for_parallel_jobs(argv: list[str]) -> list[str]:
    """argv ready for -jobs/-workers, which run argv[0] again in each worker from the current
    directory and log there: argv[0], the corpus directories and path flags made absolute, crash
    files kept where they would have gone, and the run moved into LOG_DIR."""
    if not any(arg.startswith(("-jobs=", "-workers=")) for arg in argv[1:]):
        return argv
    here = os.getcwd()
    out = [os.path.abspath(argv[0])]
    for arg in argv[1:]:
        flag, eq, value = arg.partition("=")
        if not arg.startswith("-"):
            arg = os.path.abspath(arg)  # a corpus directory
        elif eq and flag in PATH_FLAGS and value:
            paths = [os.path.abspath(v) + (os.sep if v.endswith(os.sep) else "")
                     for v in value.split(",")]
            arg = f"{flag}={','.join(paths)}"
        out.append(arg)
    if not any(arg.startswith(("-artifact_prefix=", "-exact_artifact_path=")) for arg in out):
        out.append(f"-artifact_prefix={here}{os.sep}")
    os.makedirs(LOG_DIR, exist_ok=True)
    os.chdir(LOG_DIR)
    return out


def main(test_one_input: Callable[[bytes], None]) -> None:
    """atheris' entry point: fuzz/fuzz_x.py -atheris_runs=N (or -max_total_time=S), in parallel
    with -jobs=N -workers=N (logs in fuzz/logs)."""
    atheris.Setup(for_parallel_jobs(sys.argv), test_one_input)
    atheris.Fuzz()
