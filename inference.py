"""Retrieve the nearest images of one query; see ``python inference.py --help``."""

import sys

from reir.cli.search import main

if __name__ == "__main__":
    sys.exit(main())
