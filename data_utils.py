"""Prepare the datasets for training; see ``python data_utils.py --help``."""

import sys

from reir.cli.prepare import main

if __name__ == "__main__":
    sys.exit(main())
