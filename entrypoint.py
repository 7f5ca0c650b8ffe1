"""Thin entry point (the container's ENTRYPOINT): hands argv to the package CLI."""

import sys

from meebs.cli import main

if __name__ == "__main__":
    sys.exit(main())
