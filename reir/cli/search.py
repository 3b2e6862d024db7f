"""Retrieve the nearest images of one query: the original's ``inference.py``, for any image.

A query that is in the database uses its stored embedding; any other image file is
embedded with the model the database records. Results are ranked by
:func:`reir.retrieval.similarity.knn`, the same code path as evaluation and ablation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from reir.argtypes import positive_int
from reir.cli.common import ArgumentParser, reports_errors
from reir.data.images import MAX_PIXELS
from reir.errors import ReirError
from reir.fileio import claim_output, write_json
from reir.plots import grids
from reir.retrieval.database import load_database
from reir.retrieval.lookup import embed_image, locate_query, rank, search_split
from reir.retrieval.original import find_or_convert_database

DEFAULT_QUERY = "data/car/uncropped/008055.jpg"
DEFAULT_DATABASE = "car_uncropped_fixed_random_layer1_resnet18_48_12_data_base.pth"
COLUMNS = 9  # grid cells per row: the query and 8 results by default
# In every results folder, with or without --json: which query the folder belongs to.
QUERY_RECORD = "query.json"


def get_args_parser(prog: str = "inference.py") -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description="Show the images a REIR database retrieves for one query.")
    original = parser.add_argument_group("flags of the original inference.py")
    original.add_argument("--query_img_name", default=DEFAULT_QUERY,
                          help="query image: one in the database, or any image file")
    original.add_argument("--data_base", default=DEFAULT_DATABASE,
                          help="database: a name under <output_dir>/results/ or a path")
    original.add_argument("--data_type", default="test", choices=["train", "test"],
                          help="retrieve from the train set or the test set (gallery for isc)")
    original.add_argument("--retrieval_num", default=8, type=positive_int, help="number of results")
    extra = parser.add_argument_group("REIR extras")
    extra.add_argument("--output_dir", default=".", help="results/ is read and written here")
    extra.add_argument("--query_label", default=None,
                       help="class of a query that is not in the database, to colour the results")
    extra.add_argument("--json", action="store_true", help="print the JSON report instead of writing it")
    extra.add_argument("--max_pixels", default=MAX_PIXELS, type=positive_int,
                       help=f"largest query image, in pixels (default {MAX_PIXELS:,}, as reir serve); larger ones "
                            "are refused before decoding")
    extra.add_argument("--overwrite", action="store_true",
                       help="replace an existing results folder this command did not write")
    return parser


def query_folder(results: Path, query_path: str) -> Path:
    """``results/<query stem>/`` as the original named it, unless another query of that stem (every glyph is
    ``DejaVuSans.png``) wrote it: then the next ``<stem>_<n>/`` that is free or this query's own."""
    stem = Path(query_path).stem
    number = 1
    while True:
        folder = results / (stem if number == 1 else f"{stem}_{number}")
        if not folder.exists():
            return folder
        if recorded_query(folder) == query_path:
            return folder
        number += 1


def recorded_query(folder: Path) -> str | None:
    """The query whose results a folder holds, from its ``query.json`` (written with or without --json)."""
    try:
        recorded = json.loads((folder / QUERY_RECORD).read_text())
        return recorded["query"] if recorded.get("format") == grids.SEARCH_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def retrieve(args) -> dict:
    """Rank, draw and describe; returns the JSON report."""
    db_path = find_or_convert_database(args.data_base, args.output_dir)
    db = load_database(db_path)
    split = search_split(db, args.data_type)
    if split not in db.features:
        raise ReirError(f"database {db_path} has no {split} split; use --data_type "
                        f"{'test' if split == 'train' else 'train'}")
    location = locate_query(db, args.query_img_name, args.data_type)
    query_path = (str(Path(args.query_img_name).resolve()) if location is None
                  else db.paths(location[0])[location[1]])
    folder = query_folder(Path(args.output_dir) / "results", query_path)
    claim_output(folder, (grids.SEARCH_FORMAT,), inputs=[db_path, args.query_img_name],
                 record=folder / "grid.png", overwrite=args.overwrite, setting="--overwrite")
    if location is None:
        label = args.query_label
        features, exclude = embed_image(db, db_path, query_path, args.max_pixels), None
    else:
        query_split, index = location
        label = db.labels(query_split)[index]
        features = db.features[query_split][index:index + 1]
        exclude = index if query_split == split else None
    found = rank(features, db.features[split], args.retrieval_num, exclude).row(0)
    if not found:
        raise ReirError(f"the {split} split of {db_path} has no other image to retrieve; use another --data_type")
    results = [{"rank": n + 1, "path": db.paths(split)[i], "label": db.labels(split)[i], "score": s,
                "correct": None if label is None else db.labels(split)[i] == label}
               for n, (i, s) in enumerate(found)]
    report = {"format": grids.SEARCH_FORMAT,
              "query": {"path": query_path, "label": label, "in_database": location is not None,
                        "split": location[0] if location else None},
              "database": str(db_path), "data_type": args.data_type, "split": split,
              "retrieval_num": args.retrieval_num, "results": results,
              "grid": str(folder / "grid.png"), "json": None if args.json else str(folder / "results.json")}
    grids.save_search_pictures(folder, query_path, label, results, COLUMNS)
    write_json(folder / QUERY_RECORD, {"format": grids.SEARCH_FORMAT, "query": query_path})
    if not args.json:
        write_json(folder / "results.json", report)
    return report


@reports_errors
def main(argv: list[str] | None = None, prog: str = "inference.py") -> int:
    args = get_args_parser(prog).parse_args(argv)
    report = retrieve(args)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    query = report["query"]
    where = f"{query['split']} split" if query["in_database"] else "outside the database, embedded by its model"
    print(f"Query {query['path']} ({where}), label {query['label'] or 'unknown'}; "
          f"top {len(report['results'])} of the {report['split']} split:")
    for r in report["results"]:
        mark = "" if r["correct"] is None else ("  correct" if r["correct"] else "  wrong")
        print(f"{r['rank']:>4}  {r['score']:.4f}  {r['label']:<12} {r['path']}{mark}")
    print(f"Wrote {report['grid']} and {report['json']}")
    return 0


def search_main(argv: list[str] | None = None) -> int:
    """``reir search``: the same tool under the package command."""
    return main(argv, prog="reir search")


if __name__ == "__main__":
    sys.exit(main())
