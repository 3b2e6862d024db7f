"""``reir ablation`` (the original's ``ablation.py``): parses its flags and prints the comparison of two
databases that reir.retrieval.ablation computes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from reir.argtypes import positive_int
from reir.cli.common import ArgumentParser, reports_errors
from reir.errors import ReirError, UsageError
from reir.fileio import claim_output, write_json
from reir.retrieval.ablation import (
    ABLATION_FORMAT,
    check_compatible,
    compare,
    comparison_estimate,
    correct_counts,
    format_ratio,
    percent,
    query_and_gallery,
    run_stem,
    save_comparisons,
)
from reir.retrieval.database import load_database
from reir.retrieval.original import find_or_convert_database

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
    extra.add_argument("--overwrite", action="store_true",
                       help="with --save_results: replace an existing results folder reir ablation did not write")
    return parser


@reports_errors
def main(argv: list[str] | None = None, prog: str = "ablation.py") -> int:
    args = get_args_parser(prog).parse_args(argv)
    paths = tuple(find_or_convert_database(n, args.output_dir) for n in (args.better_data_base, args.worse_data_base))
    if paths[0].resolve() == paths[1].resolve():
        raise UsageError(f"--better_data_base and --worse_data_base are the same file {paths[0]}; "
                         "compare two different runs")
    folder = (Path(args.output_dir) / "results"
              / f"ablation_{run_stem(paths[0])}_vs_{run_stem(paths[1])}_{args.data_type}")
    if args.save_results:
        claim_output(folder, (ABLATION_FORMAT,), inputs=paths, record=folder / "ablation.json",
                     overwrite=args.overwrite, setting="--overwrite")
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
    print(f"AR@{k_used}: better {percent(figures['better_ar'])} | worse {percent(figures['worse_ar'])}")
    print(f"GE rate: {percent(figures['ge_rate'])}")
    print(f"better ratio: {format_ratio(figures)}")
    if args.save_results:
        count, size = comparison_estimate(counts, k_used)
        print(f"Writing {count} comparison images (one per query the better database wins; at most "
              f"{size / 2 ** 20:,.1f} MiB) to {folder}", flush=True)
        written = save_comparisons(folder, better, worse, splits, rankings, counts, names)
        write_json(folder / "ablation.json", {"format": ABLATION_FORMAT, "better": names[0], "worse": names[1],
                                              "data_type": args.data_type, **figures, "images": written})
        print(f"Saved {len(written)} comparison images and ablation.json to {folder}")
    return 0


def ablation_main(argv: list[str] | None = None) -> int:
    """``reir ablation``: the same tool under the package command."""
    return main(argv, prog="reir ablation")


if __name__ == "__main__":
    sys.exit(main())
