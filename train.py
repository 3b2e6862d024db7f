"""Train a REIR model; see ``python train.py --help``."""

import sys

from reir.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
