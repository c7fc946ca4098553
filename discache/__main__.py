"""`python -m discache`: the `discache` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
