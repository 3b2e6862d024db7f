"""``reir report``: parses its flags and writes one self-contained HTML report (reir.plots.report)."""

from __future__ import annotations

import sys
from pathlib import Path

from reir.argtypes import positive_int
from reir.cli.common import ArgumentParser, reports_errors
from reir.errors import ReirError, UsageError
from reir.fileio import atomic_write, claim_output
from reir.plots.report import REPORT_FORMAT, build_report, find_statistics
from reir.retrieval.database import load_database, resolve_database_path


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="reir report", description="Write one self-contained HTML report of a database.")
    parser.add_argument("--data_base", required=True, help="a *_data_base.safetensors (from training or reir embed)")
    parser.add_argument("--output_dir", default=".", help="folder whose results/ holds the database")
    parser.add_argument("--statistics", default=None, help="training statistics CSV (default: found beside the run)")
    parser.add_argument("--output", default=None, help="HTML file (default: the database's name with .html)")
    parser.add_argument("--k", default=8, type=positive_int, help="results shown per query")
    parser.add_argument("--queries", default=5, type=positive_int, help="best and worst queries shown")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output that is not a report of reir report")
    return parser


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    db_path = resolve_database_path(args.data_base, args.output_dir)
    output = (Path(args.output) if args.output
              else db_path.with_name(db_path.name.removesuffix(".safetensors") + ".html"))
    claim_output(output, (REPORT_FORMAT,), inputs=[db_path], overwrite=args.overwrite, setting="--overwrite")
    db = load_database(db_path)
    if not db.features:
        raise ReirError(f"database {db_path} holds no embeddings")
    statistics = Path(args.statistics) if args.statistics else find_statistics(db, db_path)
    if statistics is not None and not statistics.is_file():
        raise UsageError(f"--statistics {statistics} does not exist; pass the run's statistics/*_results.csv")
    atomic_write(output, build_report(db, db_path, statistics, args.k, args.queries))
    print(f"Wrote {output} ({output.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
