"""`python -m meebs ...`: the same command line as `meebs` and entrypoint.py (accelerate
launches each training process this way)."""

import sys

from meebs.cli import main

sys.exit(main())
