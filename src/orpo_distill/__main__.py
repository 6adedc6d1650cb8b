"""`python -m orpo_distill ...`: the same command line as the `orpo-distill` script (see `cli.py`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
