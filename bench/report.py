"""Markdown tables from `pytest bench --benchmark-json=FILE`: python bench/report.py FILE.

Kept for old habits; `discache bench --from-json FILE` writes the same tables and the plots."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's discache

from discache.benchreport import ReportError, load, render  # noqa: E402


def main(argv: list[str]) -> int:
    """Print the report of the JSON file named on the command line."""
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print(render(load(argv[1])))
    except ReportError as e:
        print(f"report.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
