"""discache: discardable memory for Python, the command line.

Every subcommand says what it does with --help.  A bad option or value exits with status 2 and
one line naming the option and what it accepts, after the subcommand's usage."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import textwrap
from typing import Any, NoReturn, Sequence

from . import __version__, _core, backends

WIDTH = 100  # columns every table and wrapped line fits in (--wide lifts it where offered)
EXAMPLES = """\
examples:
  discache info                  what runs on this machine
  discache demo                  images in discardable memory, reclaimed by the real kernel
  discache simulate --steps 600  the volatile-ranges designs on a simulated kernel
  discache bench --quick         the benchmarks, a report with tables and plots"""


class Parser(argparse.ArgumentParser):
    """argparse with errors in one line and the usage of the (sub)command that failed."""

    def error(self, message: str) -> NoReturn:
        """Usage of this (sub)command, then `prog: error: message` on one line; exit 2."""
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def add_subcommand(sub: Any, name: str, doc: str, **kwargs: Any) -> Parser:
    """A subcommand whose help is doc's first line and whose description is all of doc."""
    first = doc.strip().splitlines()[0]
    return sub.add_parser(name, help=first, description=textwrap.dedent(doc).strip(),
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def wrap(label: str, text: str, indent: int, width: int = WIDTH) -> str:
    """label padded to indent, then text wrapped to width with a hanging indent."""
    return textwrap.fill(text, width, initial_indent=label.ljust(indent),
                         subsequent_indent=" " * indent, break_on_hyphens=False,
                         break_long_words=False)


def format_table(rows: list[dict], width: int = WIDTH, wide: bool = False) -> str:
    """rows as a right-aligned text table; headers wrap on spaces, and a table still wider than
    width is split into stacked tables repeating the first column (unless wide)."""
    cols = list(rows[0])
    cells = [[_cell(r[c]) for c in cols] for r in rows]
    heads = [c.split() or [""] for c in cols] if not wide else [[c] for c in cols]
    widths = [max(max(len(w) for w in head), *(len(row[i]) for row in cells))
              for i, head in enumerate(heads)]
    heads = [textwrap.wrap(c, w, break_long_words=False) or [""] if not wide else [c]
             for c, w in zip(cols, widths)]
    chunks = _split(widths, width if not wide else sum(widths) + 2 * len(widths))
    tables = []
    for chunk in chunks:
        depth = max(len(heads[i]) for i in chunk)
        padded = {i: [""] * (depth - len(heads[i])) + heads[i] for i in chunk}
        lines = ["  ".join(padded[i][level].rjust(widths[i]) for i in chunk).rstrip()
                 for level in range(depth)]
        lines.append("  ".join("-" * widths[i] for i in chunk))
        lines += ["  ".join(row[i].rjust(widths[i]) for i in chunk) for row in cells]
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _split(widths: list[int], width: int) -> list[list[int]]:
    """Column indexes in as few stacked tables of at most width columns as possible, balanced,
    each starting with column 0."""
    def greedy(limit: int) -> list[list[int]]:
        chunks: list[list[int]] = [[0]]
        for i in range(1, len(widths)):
            used = sum(widths[j] + 2 for j in chunks[-1]) - 2
            if used + 2 + widths[i] > limit and len(chunks[-1]) > 1:
                chunks.append([0])
            chunks[-1].append(i)
        return chunks

    fewest = greedy(width)
    for limit in range(widths[0], width):
        chunks = greedy(limit)
        if len(chunks) <= len(fewest):
            return chunks
    return fewest


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 10 or value == 0 else f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return "/".join(map(_cell, value))
    return "-" if value is None else str(value)


def missing(packages: Sequence[str], what: str) -> str:
    """One line: which packages are missing, what needs them, the command that installs them."""
    return (f"{' and '.join(packages)} {'is' if len(packages) == 1 else 'are'} missing "
            f"({what}): {install_command(*packages)}")


def install_command(*packages: str) -> str:
    """The pip command that installs packages into the Python running discache."""
    return f"{sys.executable} -m pip install {' '.join(packages)}"


def cmd_info(args: argparse.Namespace) -> int:
    """Print the version, the kernel, the page size and which memory backends run here.

    For each backend, yes or no and why: each probe makes the system call itself."""
    print(f"discache {__version__}")
    print(wrap("python", f"{platform.python_version()} ({sys.executable})", 10))
    print(f"kernel    {platform.system()} {platform.release()} {platform.machine()}")
    print(f"page size {_core.page_size()} bytes")
    try:
        auto = backends.get("auto").name
    except backends.BackendUnavailableError as error:
        auto = f"none ({error})"
    print(wrap("auto", auto, 10))
    print("backends:")
    for info in backends.available():
        mark = "yes" if info.available else "no"
        print(wrap(f"  {info.name:<16} {mark}", info.reason, 24))
    return 0


def build_parser() -> tuple[Parser, dict[str, Parser]]:
    """The argument parser, one subcommand per job, and the subcommands' parsers by name."""
    parser = Parser(prog="discache", description=__doc__, epilog=EXAMPLES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"discache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    info = add_subcommand(sub, "info", cmd_info.__doc__ or "")
    info.set_defaults(func=cmd_info)
    from .benchreport import add_parser as add_bench
    from .demo import add_parser as add_demo
    from .sim.command import add_parser as add_simulate

    add_demo(sub)
    add_simulate(sub)
    add_bench(sub)
    return parser, dict(sub.choices)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.error(f"choose a command: {', '.join(commands)} "
                     "(discache --help describes them)")
    if unknown:
        command = commands[args.command]
        before = argv.index(args.command)
        if any(u in argv[:before] for u in unknown):
            command = parser
        words = " ".join(unknown)
        command.error(f"unknown option or argument {words!r} "
                      f"({command.prog} --help lists what it accepts)")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"discache {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `discache simulate | head`: the reader left, nothing is wrong
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
