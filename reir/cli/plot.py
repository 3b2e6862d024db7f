"""``reir plot``: a PNG of loss, accuracy and Recall@K per epoch from a statistics CSV."""

from __future__ import annotations

import sys

from reir.cli.common import ArgumentParser, reports_errors
from reir.plots.curves import plot_statistics


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="reir plot", description="Plot loss, accuracy and Recall@K per epoch.")
    parser.add_argument("statistics", help="a statistics/*_results.csv written by train.py")
    parser.add_argument("--output", default=None, help="PNG to write (default: the CSV's name with .png)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output that is not a plot this command wrote")
    args = parser.parse_args(argv)
    path = plot_statistics(args.statistics, args.output, overwrite=args.overwrite, setting="--overwrite")
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
