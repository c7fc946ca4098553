"""The `discache` command."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import Sequence

from . import __version__, _core, backends


def cmd_info(args: argparse.Namespace) -> int:
    """Print the version, page size, kernel and which backends run here (and why not)."""
    print(f"discache {__version__}")
    print(f"python    {platform.python_version()} ({sys.executable})")
    print(f"kernel    {platform.system()} {platform.release()} {platform.machine()}")
    print(f"page size {_core.page_size()} bytes")
    try:
        auto = backends.get("auto").name
    except backends.BackendUnavailableError as error:
        auto = f"none ({error})"
    print(f"auto      {auto}")
    print("backends:")
    for info in backends.available():
        mark = "yes" if info.available else "no "
        print(f"  {info.name:<16} {mark}  {info.reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per job."""
    parser = argparse.ArgumentParser(prog="discache", description=__doc__)
    parser.add_argument("--version", action="version", version=f"discache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help=cmd_info.__doc__).set_defaults(func=cmd_info)
    from .demo import add_parser as add_demo
    from .sim.command import add_parser as add_simulate

    add_demo(sub)
    add_simulate(sub)
    from .benchreport import add_parser as add_bench

    add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
