"""Retrieve the nearest images of one query: the original's ``inference.py``, for any image.

A query that is in the database uses its stored embedding; any other image file is
embedded with the model the database records. Results are ranked by
:func:`reir.retrieval.similarity.knn`, the same code path as evaluation and ablation.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from reir.api import embed, load_model
from reir.argtypes import positive_int
from reir.cli.common import ArgumentParser, reports_errors
from reir.data.images import read_image
from reir.errors import ReirError
from reir.fileio import write_json
from reir.plots import grids
from reir.model.original import convert_model_beside
from reir.retrieval.database import Database, load_database
from reir.retrieval.original import find_or_convert_database
from reir.retrieval.results import PAD, Results
from reir.retrieval.similarity import knn

DEFAULT_QUERY = "data/car/uncropped/008055.jpg"
DEFAULT_DATABASE = "car_uncropped_fixed_random_layer1_resnet18_48_12_data_base.pth"
COLUMNS = 9  # grid cells per row: the query and 8 results by default


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
    return parser


def search_split(db: Database, data_type: str) -> str:
    """The split results come from: train, or the test set (the gallery when there is one)."""
    if data_type == "train":
        return "train"
    return db.eval_splits[-1]


def locate_query(db: Database, name: str, data_type: str) -> tuple[str, int] | None:
    """``(split, index)`` of the query in the database, or ``None`` when it is not there.

    Paths are compared as absolute paths. A name that is not an existing file (such as
    the original's ``data/car/uncropped/008055.jpg``) may also match the one database
    image with the same file name.
    """
    order = [search_split(db, data_type)] + [s for s in db.splits if s != search_split(db, data_type)]
    target = os.path.normpath(os.path.abspath(name))
    for split in order:
        for index, path in enumerate(db.paths(split)):
            if os.path.normpath(os.path.abspath(path)) == target:
                return split, index
    if Path(name).is_file():
        return None
    base = Path(name).name
    matches = [(s, i) for s in order for i, p in enumerate(db.paths(s)) if Path(p).name == base]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ReirError(f"query {name} does not exist and {len(matches)} database images are named {base}; "
                        "pass the full path of the image as stored in the database")
    raise ReirError(f"query {name} is neither an image file nor in the database; check --query_img_name")


def model_path(db: Database, db_path: Path) -> Path:
    """The model file the database records, also looked for beside a moved output folder."""
    recorded = db.info.get("model_file")
    if not recorded:
        raise ReirError(f"database {db_path} records no model file, so it can only rank its own images; "
                        "retrain with the current train.py to query with other images")
    candidates = [Path(recorded), db_path.resolve().parent.parent / "epochs" / Path(recorded).name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    for candidate in candidates:  # the original's own model file, from a converted database
        original = candidate.with_name(candidate.name.removesuffix(".safetensors") + ".pth")
        if original.is_file():
            return convert_model_beside(original)
    raise ReirError(f"model file {recorded} of database {db_path} not found; put it back (or under "
                    f"{candidates[1].parent}) to query with images outside the database")


def embed_image(db: Database, db_path: Path, image_path: str) -> torch.Tensor:
    """``[1, ensemble, meta]`` embedding of an image outside the database, as training embedded the rest."""
    features = embed(load_model(model_path(db, db_path)), [image_path])
    stored = next(iter(db.features.values())).shape[1:]
    if features.shape[1:] != stored:
        raise ReirError(f"model file of {db_path} embeds {tuple(features.shape[1:])} but the database holds "
                        f"{tuple(stored)}; the model was replaced after the database was written, retrain")
    return features


def rank(query: torch.Tensor, gallery: torch.Tensor, k: int, exclude: int | None = None) -> Results:
    """Top-``k`` gallery rows for one query; ``exclude`` (the query's own row) is never returned."""
    found = knn(query, gallery, k + (exclude is not None))
    return found.top(k, excluding=[PAD if exclude is None else exclude])


def retrieve(args) -> dict:
    """Rank, draw and describe; returns the JSON report."""
    db_path = find_or_convert_database(args.data_base, args.output_dir)
    db = load_database(db_path)
    split = search_split(db, args.data_type)
    if split not in db.features:
        raise ReirError(f"database {db_path} has no {split} split; use --data_type "
                        f"{'test' if split == 'train' else 'train'}")
    location = locate_query(db, args.query_img_name, args.data_type)
    if location is None:
        query_path, label = str(Path(args.query_img_name).resolve()), args.query_label
        features, exclude = embed_image(db, db_path, query_path), None
    else:
        query_split, index = location
        query_path, label = db.paths(query_split)[index], db.labels(query_split)[index]
        features = db.features[query_split][index:index + 1]
        exclude = index if query_split == split else None
    found = rank(features, db.features[split], args.retrieval_num, exclude).row(0)
    if not found:
        raise ReirError(f"the {split} split of {db_path} has no other image to retrieve; use another --data_type")
    results = [{"rank": n + 1, "path": db.paths(split)[i], "label": db.labels(split)[i], "score": s,
                "correct": None if label is None else db.labels(split)[i] == label}
               for n, (i, s) in enumerate(found)]
    folder = Path(args.output_dir) / "results" / Path(query_path).stem
    report = {"query": {"path": query_path, "label": label, "in_database": location is not None,
                        "split": location[0] if location else None},
              "database": str(db_path), "data_type": args.data_type, "split": split,
              "retrieval_num": args.retrieval_num, "results": results,
              "grid": str(folder / "grid.png"), "json": None if args.json else str(folder / "results.json")}
    save_pictures(folder, query_path, label, results)
    if not args.json:
        write_json(folder / "results.json", report)
    return report


def save_pictures(folder: Path, query_path: str, label: str | None, results: list[dict]) -> None:
    """The grid, and the original's per-image files; older per-image files of this query are removed."""
    query_tile = grids.Tile(query_path, "query" if label is None else f"query ({label})", grids.BLUE)
    tiles = [query_tile] + [grids.Tile(r["path"], f"{r['rank']}: {r['score']:.4f}", grids.status_colour(r["correct"]))
                            for r in results]
    grids.save_image(grids.grid(grids.wrap(tiles, COLUMNS)), folder / "grid.png")
    grids.save_image(grids.bordered(read_image(query_path), grids.BLUE, grids.FILE_SIZE, 0), folder / "query_img.jpg")
    written = set()
    for r in results:
        status = "" if r["correct"] is None else f"_{r['correct']}"
        name = f"retrieval_img_{r['rank']}_{r['score']:.4f}{status}.jpg"
        grids.save_image(grids.bordered(read_image(r["path"]), grids.status_colour(r["correct"]), grids.FILE_SIZE),
                       folder / name)
        written.add(name)
    for stale in folder.glob("retrieval_img_*.jpg"):
        if stale.name not in written:
            stale.unlink(missing_ok=True)


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
