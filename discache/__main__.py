"""`python -m discache`: the `discache` command."""
import sys

from .cli import main

sys.exit(main())
