"""``reir embed``: a model and a collection of images -> a feature database, resumable and shardable.

Parses the flags, opens the collection (reir.retrieval.collections) and runs the sharded, resumable job
(reir.retrieval.embedding_job), which its docstring describes.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from reir import distributed
from reir.argtypes import non_negative_int, positive_int
from reir.cli.common import ArgumentParser, reports_errors
from reir.data.tarshards import is_shard_pattern
from reir.devices import training_devices
from reir.errors import UsageError
from reir.fileio import claim_output
from reir.model.files import Model, load_model
from reir.retrieval.collections import from_csv, from_dataset, from_folder, from_shards
from reir.retrieval.database import FORMAT, MANIFEST, SHARDED_FORMAT
from reir.retrieval.embedding_job import run


def check_output(output: Path, shard_output: bool) -> None:
    """An existing folder is replaced only when it is a sharded database; anything else is refused, and a
    sharded database is not written over a single-file one (no one rename could swap the two)."""
    if output.is_dir() and not (output / MANIFEST).is_file():
        raise UsageError(f"--output {output} is a folder that is not a REIR database; give a new name, "
                         f"such as {output}/collection_data_base")
    if shard_output and output.is_file():
        raise UsageError(f"--output {output} is a single-file database; remove it or write the sharded one elsewhere")


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="reir embed", description="Embed a collection of images into a feature database.")
    parser.add_argument("--model", required=True, help="an epochs/*_model.safetensors file written by training")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of images (searched recursively), a CSV with path[,label], "
                        "or WebDataset tar shards such as 'shards/{000000..000099}.tar'")
    source.add_argument("--data_name", help="a prepared dataset (as train.py's --data_name): every split")
    parser.add_argument("--output", required=True, help="the database to write (*_data_base.safetensors, "
                        "or a folder name with --shard_output)")
    parser.add_argument("--shard_output", action="store_true",
                        help="write a sharded database: a folder of shards and a manifest.json")
    parser.add_argument("--max_file_gb", default=2.0, type=float,
                        help="write a sharded database when one file would hold more GiB of features (default 2)")
    parser.add_argument("--split", default="test",
                        help="split name for --images (default test: reir eval/report rank it against itself)")
    parser.add_argument("--labels_from_folders", action="store_true",
                        help="--images folder: the first subfolder of each image names its class")
    parser.add_argument("--data_path", default="data", help="with --data_name: where the datasets live")
    parser.add_argument("--crop_type", default="uncropped", choices=["uncropped", "cropped"])
    parser.add_argument("--splits", default=None, help="with --data_name: comma-separated splits (default all)")
    parser.add_argument("--batch_size", default=64, type=positive_int)
    parser.add_argument("--shard_size", default=4096, type=positive_int,
                        help="images per resumable shard (a multiple of --batch_size is best; tar input: one tar each)")
    parser.add_argument("--num_workers", default=2, type=non_negative_int, help="image loading processes")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output that is not a REIR database")
    return parser


def open_collection(args, model: Model):
    if not args.images:
        splits = [s for s in args.splits.split(",") if s] if args.splits else None
        return from_dataset(args.data_name, args.data_path, args.crop_type, model.image_size, splits)
    if is_shard_pattern(args.images):
        return from_shards(args.images, args.split)
    source = Path(args.images)
    if source.is_dir():
        return from_folder(source, args.split, args.labels_from_folders)
    if source.suffix.lower() != ".csv" and source.suffix.lower() in Image.registered_extensions():
        raise UsageError(f"--images {source} is a single image; give a folder of images or a CSV listing them")
    if source.is_file():
        return from_csv(source, args.split)
    raise UsageError(f"--images {source} does not exist; give a folder of images, a CSV file or tar shards")


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    output = Path(args.output)
    check_output(output, args.shard_output)
    source = args.images or (args.data_path if args.data_name == "custom" else Path(args.data_path) / args.data_name)
    claim_output(output, (FORMAT, SHARDED_FORMAT), inputs=[args.model, source],
                 overwrite=args.overwrite, setting="--overwrite")
    if args.max_file_gb <= 0:
        raise UsageError(f"--max_file_gb {args.max_file_gb} must be positive")
    context, device = distributed.setup(args.device)
    try:
        model = load_model(args.model, device or training_devices(args.device, [0])[0])
        return run(model, open_collection(args, model), output, context, shard_size=args.shard_size,
                   batch_size=args.batch_size, num_workers=args.num_workers, shard_output=args.shard_output,
                   max_file_gb=args.max_file_gb)
    finally:
        distributed.cleanup(context)


