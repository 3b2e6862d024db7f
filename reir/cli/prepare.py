"""``reir prepare`` / ``python data_utils.py``: datasets as distributed -> split lists for training.

    python data_utils.py                          # every benchmark found under data/, else the embedded ones
    python data_utils.py --data_name cub --resize 0
    reir prepare --data_name custom --data_path my_images.csv
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from reir.argtypes import non_negative_int
from reir.cli.common import ArgumentParser, reports_errors
from reir.data.build import build_split_list, report
from reir.data.registry import BENCHMARKS
from reir.data.sources import EMBEDDED
from reir.data.splits import SplitList, split_list_path
from reir.errors import ReirError, UsageError

DEFAULT_RESIZE = 256
CROP_CHOICES = ("both", "uncropped", "cropped")


def prepare_benchmark(data_path: str | Path, name: str, crop_type: str, resize: int = DEFAULT_RESIZE,
                      skip_bad: bool = False, workers: int | None = None, overwrite: bool = False,
                      setting: str = "overwrite") -> SplitList:
    """Read ``<data_path>/<name>``'s official files and write ``splits_<crop_type>.json`` beside them."""
    from reir.data.benchmarks import READERS

    info = BENCHMARKS[name]
    if crop_type == "cropped" and not info.croppable:
        raise UsageError(f"--crop_type cropped only applies to car and cub, not {name}")
    root = Path(data_path) / name
    if not root.is_dir():
        raise ReirError(f"{root} not found: download the dataset and unpack it there (see docs/DATASETS.md)")
    records = READERS[name](root)
    if crop_type == "uncropped":
        records = [replace(r, box=None) for r in records]
    result = build_split_list(records, data_name=name, crop_type=crop_type,
                              target=split_list_path(data_path, name, crop_type), image_root=root, resize=resize,
                              skip_bad=skip_bad, workers=workers, mean=info.mean, std=info.std,
                              info={"source": str(root.resolve())}, overwrite=overwrite, setting=setting)
    report(result, info.counts, f"{name} {crop_type}")
    return result.split_list


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="data_utils.py", description="Prepare datasets: official annotation files or "
                            "your own CSV/folders -> split lists (JSON) that train.py reads.")
    parser.add_argument("--data_path", default="data",
                        help="folder holding car/, cub/, sop/, isc/; for custom: a CSV file or a folder")
    parser.add_argument("--data_name", default="all", choices=("all", *BENCHMARKS, "custom", *EMBEDDED),
                        help="one dataset, or all benchmarks present under --data_path (default)")
    parser.add_argument("--crop_type", default="both", choices=CROP_CHOICES,
                        help="car, cub and custom with boxes: which lists to write (default both)")
    parser.add_argument("--resize", default=None, type=non_negative_int,
                        help=f"write images resized to this square (a cache for training at that size); "
                             f"0 keeps the originals; default {DEFAULT_RESIZE} for benchmarks, 0 for custom")
    parser.add_argument("--skip_bad", action="store_true",
                        help="leave out unreadable images or boxes outside their image instead of failing")
    parser.add_argument("--imagenet_norm", action="store_true",
                        help="custom: use ImageNet's mean/std instead of measuring the training split")
    parser.add_argument("--workers", default=None, type=non_negative_int,
                        help="image processes (default: up to 8 for large datasets)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing splits_*.json that is not a REIR split list")
    return parser


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.imagenet_norm and args.data_name != "custom":
        raise UsageError("--imagenet_norm only applies to --data_name custom; benchmarks use the original's mean/std")
    if args.data_name in EMBEDDED:
        split_list = EMBEDDED[args.data_name](args.data_path)
        sizes = ", ".join(f"{name} {len(s)} images in {len(s.classes)} classes"
                          for name, s in split_list.splits.items())
        print(f"{args.data_name} ready in {split_list_path(args.data_path, args.data_name, 'uncropped')}: {sizes}")
        return 0
    if args.data_name == "custom":
        from reir.data.custom import prepare_custom, read_source

        records, boxed = read_source(Path(args.data_path))
        crops = ["uncropped", "cropped"] if args.crop_type == "both" and boxed else \
            ["uncropped"] if args.crop_type == "both" else [args.crop_type]
        for crop in crops:
            prepare_custom(args.data_path, crop, resize=args.resize or 0, skip_bad=args.skip_bad,
                           imagenet_norm=args.imagenet_norm, workers=args.workers, records=records,
                           overwrite=args.overwrite, setting="--overwrite")
        return 0
    names = [args.data_name] if args.data_name != "all" else \
        [n for n in BENCHMARKS if (Path(args.data_path) / n).is_dir()]
    if not names:
        print(f"no benchmark under {args.data_path} (unpack car, cub, sop or isc there: docs/DATASETS.md); "
              "the embedded datasets need no download:")
        for name in EMBEDDED:
            list_file = split_list_path(args.data_path, name, "uncropped")
            print(f"  {name}: " + (f"ready in {list_file}" if list_file.is_file() else
                                   f"not built yet: python data_utils.py --data_name {name}"))
        return 0
    resize = DEFAULT_RESIZE if args.resize is None else args.resize
    for name in names:
        croppable = BENCHMARKS[name].croppable
        if args.crop_type == "cropped" and not croppable and args.data_name != "all":
            raise UsageError(f"--crop_type cropped only applies to car and cub, not {name}")
        crops = [c for c in ("uncropped", "cropped") if args.crop_type in ("both", c)]
        for crop in crops if croppable else ["uncropped"]:
            prepare_benchmark(args.data_path, name, crop, resize=resize, skip_bad=args.skip_bad,
                              workers=args.workers, overwrite=args.overwrite, setting="--overwrite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
