"""Compare two databases query by query; see ``python ablation.py --help``."""

import sys

from reir.cli.ablation import main

if __name__ == "__main__":
    sys.exit(main())
