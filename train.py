"""Train a REIR model; see ``python train.py --help``."""

import sys

from reir.train import main

if __name__ == "__main__":
    sys.exit(main())
