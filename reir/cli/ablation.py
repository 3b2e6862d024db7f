"""Compare two databases of the same images query by query: the original's ``ablation.py``.

For every query both databases retrieve K images (through :func:`reir.retrieval.similarity.knn`,
as evaluation does) and we count how many share the query's class. Reported:

- AR@K: the mean of correct/K over the queries with at least one correct result;
- GE rate: the share of queries where ``better`` finds at least as many as ``worse``;
- better ratio: queries where ``better`` finds more, divided by those where ``worse`` does.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from reir.argtypes import positive_int
from reir.cli.common import ArgumentParser, reports_errors
from reir.errors import ReirError
from reir.fileio import write_json
from reir.plots import grids
from reir.retrieval.database import Database, load_database
from reir.retrieval.original import find_or_convert_database
from reir.retrieval.results import Results
from reir.retrieval.similarity import knn

log = logging.getLogger(__name__)

DEFAULT_BETTER = "car_uncropped_fixed_unrandom_layer1_resnet18_48_12_data_base.pth"
DEFAULT_WORSE = "car_uncropped_random_unrandom_layer1_resnet18_48_12_data_base.pth"


def get_args_parser(prog: str = "ablation.py") -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description="Compare the retrievals of two REIR databases.")
    original = parser.add_argument_group("flags of the original ablation.py")
    original.add_argument("--better_data_base", default=DEFAULT_BETTER, help="the database expected to be better")
    original.add_argument("--worse_data_base", default=DEFAULT_WORSE, help="the database to compare against")
    original.add_argument("--data_type", default="test", choices=["train", "test"],
                          help="queries and results from the train set or the test set")
    original.add_argument("--retrieval_num", default=8, type=positive_int, help="results per query (K)")
    original.add_argument("--save_results", action="store_true",
                          help="save query | better | worse images for every query better wins")
    extra = parser.add_argument_group("REIR extras")
    extra.add_argument("--output_dir", default=".", help="results/ is read and written here")
    return parser


def query_and_gallery(db: Database, data_type: str) -> tuple[str, str]:
    """Train against train, test against test, or isc's query against its gallery."""
    if data_type == "train":
        return "train", "train"
    splits = db.eval_splits
    return splits[0], splits[-1]


def check_compatible(better: Database, worse: Database, names: tuple[str, str], splits: tuple[str, str]) -> None:
    """Only databases of the same images can be compared query by query."""
    for key in ("data_name", "crop_type"):
        a, b = better.info.get(key), worse.info.get(key)
        if a != b:
            raise ReirError(f"{names[0]} and {names[1]} differ in {key} ({a} vs {b}); "
                            "compare two databases of the same dataset and crop type")
    for split in dict.fromkeys(splits):
        for db, name in zip((better, worse), names):
            if split not in db.features:
                raise ReirError(f"database {name} has no {split} split; use the other --data_type")
        if _relative(better.paths(split)) != _relative(worse.paths(split)) or better.labels(split) != worse.labels(split):
            raise ReirError(f"{names[0]} and {names[1]} hold different {split} image lists; "
                            "compare databases built from the same prepared dataset")


def _relative(paths: list[str]) -> list[str]:
    """Paths below their common folder, so the same images under another data root still compare equal."""
    if not paths:
        return []
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return [os.path.relpath(os.path.abspath(p), root) for p in paths]


def correct_counts(db: Database, splits: tuple[str, str], k: int) -> tuple[torch.Tensor, Results]:
    """Per query: the number of same-class results among the top ``k``, plus the ranking itself."""
    query_split, gallery_split = splits
    results = knn(db.features[query_split], db.features[gallery_split], k, exclude_self=query_split == gallery_split)
    results = results.with_labels(db.labels(query_split), db.labels(gallery_split))
    return results.same_label().sum(dim=1), results


def average_recall(counts: torch.Tensor, k: int) -> float | None:
    """AR@K: mean of correct/K over queries with a correct result; ``None`` when there is none."""
    found = counts[counts > 0]
    return (found.float() / k).mean().item() if len(found) else None


def compare(better_counts: torch.Tensor, worse_counts: torch.Tensor, k: int) -> dict:
    better_wins = int((better_counts > worse_counts).sum())
    worse_wins = int((worse_counts > better_counts).sum())
    return {"queries": len(better_counts), "retrieval_num": k,
            "better_ar": average_recall(better_counts, k), "worse_ar": average_recall(worse_counts, k),
            "ge_rate": (better_counts >= worse_counts).float().mean().item() if len(better_counts) else None,
            "better_wins": better_wins, "worse_wins": worse_wins,
            "better_ratio": better_wins / worse_wins if worse_wins else None}


def format_ratio(figures: dict) -> str:
    """The better ratio, with the case of no worse wins spelled out instead of dividing by zero."""
    wins = f"better wins {figures['better_wins']}, worse wins {figures['worse_wins']}"
    if figures["worse_wins"]:
        return f"{figures['better_ratio']:.4f} ({wins})"
    return f"{'inf' if figures['better_wins'] else 'undefined'} ({wins})"


def _percent(value: float | None) -> str:
    return "n/a (no query found a correct result)" if value is None else f"{100 * value:.2f}%"


def save_comparisons(folder: Path, better: Database, worse: Database, splits: tuple[str, str],
                     rankings: dict, counts: dict, names: tuple[str, str]) -> list[str]:
    """One picture per query that ``better`` wins: the query, then better's row above worse's row."""
    query_split, gallery_split = splits
    winners = torch.nonzero(counts["better"] > counts["worse"]).flatten().tolist()
    written = []
    for q in winners:
        query_path, query_label = better.paths(query_split)[q], better.labels(query_split)[q]
        rows = []
        for side, db in (("better", better), ("worse", worse)):
            cells = [grids.Tile(db.paths(gallery_split)[i], f"{n + 1}: {s:.4f}",
                              grids.status_colour(db.labels(gallery_split)[i] == query_label))
                     for n, (i, s) in enumerate(rankings[side].row(q))]
            rows.append(cells)
        rows[0].insert(0, grids.Tile(query_path, f"query ({query_label})", grids.BLUE))
        rows[1].insert(0, None)
        title = (f"top: better {_stem(Path(names[0]))} ({int(counts['better'][q])} correct)   "
                 f"bottom: worse {_stem(Path(names[1]))} ({int(counts['worse'][q])} correct)")
        target = folder / f"{q:05d}_{Path(query_path).stem}.png"
        grids.save_image(grids.grid(rows, title), target)
        written.append(str(target))
    for stale in folder.glob("[0-9][0-9][0-9][0-9][0-9]_*.png"):  # from an earlier comparison
        if str(stale) not in written:
            stale.unlink(missing_ok=True)
    return written


def _stem(path: Path) -> str:
    return path.name.split("_data_base")[0]


@reports_errors
def main(argv: list[str] | None = None, prog: str = "ablation.py") -> int:
    args = get_args_parser(prog).parse_args(argv)
    paths = tuple(find_or_convert_database(n, args.output_dir) for n in (args.better_data_base, args.worse_data_base))
    if paths[0].resolve() == paths[1].resolve():
        raise ReirError(f"--better_data_base and --worse_data_base are the same file {paths[0]}; "
                        "compare two different runs", 2)
    better, worse = (load_database(p) for p in paths)
    names = (str(paths[0]), str(paths[1]))
    splits = query_and_gallery(better, args.data_type)
    if query_and_gallery(worse, args.data_type) != splits:
        raise ReirError(f"{names[0]} and {names[1]} split their images differently; "
                        "compare two databases of the same dataset")
    check_compatible(better, worse, names, splits)
    if all(torch.equal(better.features[s], worse.features[s]) for s in dict.fromkeys(splits)):
        log.warning("%s and %s hold identical embeddings: every query ties and the figures below say nothing "
                    "about which run is better", *names)
    k = args.retrieval_num
    counts, rankings = {}, {}
    for side, db in (("better", better), ("worse", worse)):
        counts[side], rankings[side] = correct_counts(db, splits, k)
    k_used = rankings["better"].k
    if k_used == 0:
        raise ReirError(f"the {splits[1]} split has no other image to retrieve; use another --data_type")
    figures = compare(counts["better"], counts["worse"], k_used)
    print(f"{figures['queries']} {splits[0]} queries against the {splits[1]} split, K = {k_used}")
    print(f"AR@{k_used}: better {_percent(figures['better_ar'])} | worse {_percent(figures['worse_ar'])}")
    print(f"GE rate: {_percent(figures['ge_rate'])}")
    print(f"better ratio: {format_ratio(figures)}")
    if args.save_results:
        folder = Path(args.output_dir) / "results" / f"ablation_{_stem(paths[0])}_vs_{_stem(paths[1])}_{args.data_type}"
        written = save_comparisons(folder, better, worse, splits, rankings, counts, names)
        write_json(folder / "ablation.json", {"better": names[0], "worse": names[1], "data_type": args.data_type,
                                              **figures, "images": written})
        print(f"Saved {len(written)} comparison images and ablation.json to {folder}")
    return 0


def ablation_main(argv: list[str] | None = None) -> int:
    """``reir ablation``: the same tool under the package command."""
    return main(argv, prog="reir ablation")


if __name__ == "__main__":
    sys.exit(main())
