"""Compare two databases of the same images query by query: the original's ``ablation.py``.

For every query both databases retrieve K images (through :func:`reir.retrieval.similarity.knn`,
as evaluation does) and we count how many share the query's class. Reported:

- AR@K: the mean of correct/K over the queries with at least one correct result;
- GE rate: the share of queries where ``better`` finds at least as many as ``worse``;
- better ratio: queries where ``better`` finds more, divided by those where ``worse`` does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from reir.errors import ReirError
from reir.plots import grids
from reir.retrieval.database import Database
from reir.retrieval.results import Results
from reir.retrieval.similarity import knn

ABLATION_FORMAT = "reir-ablation/1"  # recorded in ablation.json and in each comparison picture


def query_and_gallery(db: Database, data_type: str) -> tuple[str, str]:
    """Train against train, test against test, or isc's query against its gallery."""
    if data_type == "train":
        return "train", "train"
    splits = db.eval_splits
    return splits[0], splits[-1]


def check_compatible(better: Database, worse: Database, names: tuple[str, str], splits: tuple[str, str]) -> None:
    """Only databases of the same images, cropped alike, can be compared query by query: the image lists
    decide, not the names recorded (a folder embedded by a digits model and by a glyphs model is one dataset)."""
    for key in ("crop_type",):
        a, b = better.info.get(key), worse.info.get(key)
        if a != b:
            raise ReirError(f"{names[0]} and {names[1]} differ in {key} ({a} vs {b}); "
                            "compare two databases of the same dataset and crop type")
    for split in dict.fromkeys(splits):
        for db, name in zip((better, worse), names):
            if split not in db.features:
                raise ReirError(f"database {name} has no {split} split; use the other `data_type`")
        if (_relative(better.paths(split)) != _relative(worse.paths(split))
                or better.labels(split) != worse.labels(split)):
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


def percent(value: float | None) -> str:
    return "n/a (no query found a correct result)" if value is None else f"{100 * value:.2f}%"


def comparison_estimate(counts: dict, k: int) -> tuple[int, int]:
    """How many pictures :func:`save_comparisons` writes (the queries ``better`` wins) and their size in bytes
    at most: each a title strip and two rows of ``k`` results, as uncompressed RGB (PNG writes less)."""
    count = int((counts["better"] > counts["worse"]).sum())
    width, height = grids.grid_size(2, k + 1, title=True)
    return count, count * width * height * 3


def save_comparisons(folder: Path, better: Database, worse: Database, splits: tuple[str, str],
                     rankings: dict, counts: dict, names: tuple[str, str]) -> list[str]:
    """One picture per query that ``better`` wins: the query, then better's row above worse's row."""
    query_split, gallery_split = splits
    winners = torch.nonzero(counts["better"] > counts["worse"]).flatten().tolist()
    written = []
    for q in winners:
        query_path, query_label = better.paths(query_split)[q], better.labels(query_split)[q]
        rows: list[list[grids.Tile | None]] = []
        for side, db in (("better", better), ("worse", worse)):
            cells: list[grids.Tile | None] = [grids.Tile(db.paths(gallery_split)[i], f"{n + 1}: {s:.4f}",
                              grids.status_colour(db.labels(gallery_split)[i] == query_label))
                     for n, (i, s) in enumerate(rankings[side].row(q))]
            rows.append(cells)
        rows[0].insert(0, grids.Tile(query_path, f"query ({query_label})", grids.BLUE))
        rows[1].insert(0, None)
        title = (f"top: better {run_stem(Path(names[0]))} ({int(counts['better'][q])} correct)   "
                 f"bottom: worse {run_stem(Path(names[1]))} ({int(counts['worse'][q])} correct)")
        target = folder / f"{q:05d}_{Path(query_path).stem}.png"
        grids.save_image(grids.grid(rows, title), target, ABLATION_FORMAT)
        written.append(str(target))
    for stale in folder.glob("[0-9][0-9][0-9][0-9][0-9]_*.png"):  # from an earlier comparison
        if str(stale) not in written:
            stale.unlink(missing_ok=True)
    return written


def run_stem(path: Path) -> str:
    return path.name.split("_data_base")[0]
