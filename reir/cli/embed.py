"""``reir embed``: a model and a collection of images -> a feature database, resumable and shardable.

The collection is a folder, a CSV (``path[,label]``) or a prepared dataset. Work is cut into
fixed shards of ``--shard_size`` images; each finished shard is written atomically under
``<output>.parts/``, so a killed run started again skips what is done and ends with the same
database as an uninterrupted one (the shards, and the batches inside them, are the same). Under
``torchrun`` rank ``r`` embeds shards ``r, r + W, ...`` and rank 0 merges them. Images that
cannot be read are skipped, counted and listed, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from reir.api import Model, embed, load_model
from reir.argtypes import non_negative_int, positive_int
from reir.cli.common import ArgumentParser, reports_errors
from reir.data.images import image_files
from reir.errors import ReirError, UsageError
from reir.fileio import atomic_write, load_tensors, save_tensors
from reir.retrieval.database import Database
from reir.retrieval.database import UNLABELLED
from reir.training import distributed
from reir.training.devices import training_devices

SHARD_FORMAT = "reir-embed-shard/1"
LISTED_FAILURES = 10  # unreadable images printed; the rest are in the database and a text file


@dataclass
class Collection:
    """Images to embed, in order: the split each goes to, its path and its label (``""`` if unknown)."""

    splits: list[str]
    paths: list[str]
    labels: list[str]
    source: str


def from_folder(folder: Path, split: str, labels_from_folders: bool) -> Collection:
    files = image_files(folder)
    if not files:
        raise ReirError(f"folder {folder} holds no image files; pass a folder of images, a CSV or --data_name")
    labels = [UNLABELLED] * len(files)
    if labels_from_folders:
        loose = [f for f in files if len(f.relative_to(folder).parts) < 2]
        if loose:
            raise ReirError(f"{loose[0]} is not inside a class folder; with --labels_from_folders every image "
                            f"must be in {folder}/<class>/")
        labels = [f.relative_to(folder).parts[0] for f in files]
    return Collection([split] * len(files), [str(f.resolve()) for f in files], labels, str(folder.resolve()))


def from_csv(path: Path, split: str) -> Collection:
    """``path`` column (relative to the CSV's folder or absolute), optional ``label`` column."""
    from reir.data.custom import open_user_csv

    with open_user_csv(path) as reader:
        if "path" not in reader.fieldnames:
            raise ReirError(f"{path} has no path column: its first line must name path (and optionally label)")
        paths, labels = [], []
        for row in reader:
            image = (row.get("path") or "").strip()
            if not image:
                raise ReirError(f"{path} line {reader.line_num}: empty path; every row needs one")
            paths.append(str((path.parent / image).resolve()) if not os.path.isabs(image) else image)
            labels.append((row.get("label") or "").strip())
    if not paths:
        raise ReirError(f"{path} lists no images; add rows with a path")
    return Collection([split] * len(paths), paths, labels, str(path.resolve()))


def from_dataset(data_name: str, data_path: str, crop_type: str, image_size: int, splits: list[str] | None) -> Collection:
    from reir.data.sources import load_dataset

    split_list = load_dataset(data_name, data_path, crop_type, image_size)
    chosen = splits or list(split_list.splits)
    unknown = [s for s in chosen if s not in split_list.splits]
    if unknown:
        raise ReirError(f"dataset {data_name} has no split {unknown[0]}; it has {', '.join(split_list.splits)}", 2)
    names, paths, labels = [], [], []
    for split in chosen:
        names += [split] * len(split_list.splits[split])
        paths += split_list.absolute(split)
        labels += split_list.splits[split].labels
    return Collection(names, paths, labels, f"{data_name} ({crop_type}) in {data_path}")


def fingerprint(model: Model, collection: Collection, shard_size: int, batch_size: int) -> str:
    """Changes whenever a finished shard could differ: another model file, image list, shard or batch size."""
    stat = Path(model.path).stat()
    digest = hashlib.sha256(json.dumps(
        [str(Path(model.path).resolve()), stat.st_size, stat.st_mtime_ns, shard_size, batch_size,
         collection.paths], separators=(",", ":")).encode())
    return digest.hexdigest()[:16]


def parts_folder(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def shard_file(parts: Path, shard: int) -> Path:
    return parts / f"shard-{shard:06d}.safetensors"


def finished(parts: Path, shard: int, key: str) -> bool:
    path = shard_file(parts, shard)
    if not path.is_file():
        return False
    try:
        _, meta = load_tensors(path, "shard")
    except ReirError:
        return False
    return isinstance(meta, dict) and meta.get("format") == SHARD_FORMAT and meta.get("fingerprint") == key


def prepare_parts(parts: Path, key: str) -> None:
    """Keep finished shards of this very job; shards of any other job are removed."""
    marker = parts / "job.json"
    if parts.is_dir():
        try:
            same = json.loads(marker.read_text())["fingerprint"] == key
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        if not same:
            shutil.rmtree(parts)
    atomic_write(marker, json.dumps({"fingerprint": key}))


def embed_shards(model: Model, collection: Collection, parts: Path, key: str, shard_size: int, batch_size: int,
                 num_workers: int, context: distributed.Context) -> tuple[int, int]:
    """Embed this rank's unfinished shards; returns (shards done now, shards skipped as finished)."""
    from tqdm import tqdm

    count = len(collection.paths)
    mine = range(context.rank, -(-count // shard_size), context.world_size)
    todo = [s for s in mine if not finished(parts, s, key)]
    skipped = len(mine) - len(todo)
    if skipped:
        print(f"Resuming: {skipped} finished shard(s) of {len(mine)} kept", flush=True)
    images = sum(min(shard_size, count - s * shard_size) for s in todo)
    with tqdm(total=images, unit="img", desc="Embed", file=sys.stderr, dynamic_ncols=True,
              disable=not context.is_main, mininterval=0.5 if sys.stderr.isatty() else 10.0) as bar:
        for shard in todo:
            start = shard * shard_size
            items = collection.paths[start:start + shard_size]
            failures: list[tuple[int, str]] = []
            features = embed(model, items, progress=bar, batch_size=batch_size, num_workers=num_workers,
                             unreadable=failures)
            failed = {position for position, _ in failures}
            kept = [start + i for i in range(len(items)) if i not in failed]
            save_tensors(shard_file(parts, shard), {"features": features},
                         {"format": SHARD_FORMAT, "fingerprint": key, "kept": kept,
                          "failed": [[start + position, error] for position, error in failures]})
    return len(todo), skipped


def merge(model: Model, collection: Collection, parts: Path, shard_count: int) -> tuple[Database, list[list]]:
    """All shards, in order, into one database; returns it and the ``[path, error]`` of skipped images."""
    chunks, kept, failed = [], [], []
    for shard in range(shard_count):
        tensors, meta = load_tensors(shard_file(parts, shard), "shard")
        chunks.append(tensors["features"])
        kept += meta["kept"]
        failed += meta["failed"]
    features = torch.cat(chunks)
    by_split: dict[str, list[int]] = {}
    for row, position in enumerate(kept):
        by_split.setdefault(collection.splits[position], []).append(row)
    positions = torch.tensor(kept, dtype=torch.long)
    splits, split_features = {}, {}
    for split, rows in by_split.items():
        chosen = positions[rows].tolist()
        split_features[split] = features[rows]
        splits[split] = {"paths": [collection.paths[p] for p in chosen],
                         "labels": [collection.labels[p] for p in chosen]}
    skipped = [[collection.paths[position], error] for position, error in failed]
    info = {"model_file": str(Path(model.path).resolve()), "image_size": model.image_size,
            "mean": model.mean, "std": model.std, "source": collection.source,
            "data_name": model.config.get("data_name"), "skipped": skipped}
    return Database(split_features, splits, model.config, info), skipped


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="reir embed", description="Embed a collection of images into a feature database.")
    parser.add_argument("--model", required=True, help="an epochs/*_model.safetensors file written by training")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of images (searched recursively) or a CSV with path[,label]")
    source.add_argument("--data_name", help="a prepared dataset (as train.py's --data_name): every split")
    parser.add_argument("--output", required=True, help="the database to write (*_data_base.safetensors)")
    parser.add_argument("--split", default="test",
                        help="split name for --images (default test: reir eval/report rank it against itself)")
    parser.add_argument("--labels_from_folders", action="store_true",
                        help="--images folder: the first subfolder of each image names its class")
    parser.add_argument("--data_path", default="data", help="with --data_name: where the datasets live")
    parser.add_argument("--crop_type", default="uncropped", choices=["uncropped", "cropped"])
    parser.add_argument("--splits", default=None, help="with --data_name: comma-separated splits (default all)")
    parser.add_argument("--batch_size", default=64, type=positive_int)
    parser.add_argument("--shard_size", default=4096, type=positive_int,
                        help="images per resumable shard (a multiple of --batch_size is best)")
    parser.add_argument("--num_workers", default=2, type=non_negative_int, help="image loading processes")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    return parser


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    output = Path(args.output)
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder; give a file name such as {output}/collection_data_base.safetensors")
    context, device = distributed.setup(args.device)
    try:
        model = load_model(args.model, device or training_devices(args.device, [0])[0])
        if args.images:
            source = Path(args.images)
            if source.is_dir():
                collection = from_folder(source, args.split, args.labels_from_folders)
            elif source.suffix.lower() != ".csv" and source.suffix.lower() in Image.registered_extensions():
                raise UsageError(f"--images {source} is a single image; give a folder of images or a CSV listing them")
            elif source.is_file():
                collection = from_csv(source, args.split)
            else:
                raise UsageError(f"--images {source} does not exist; give a folder of images or a CSV file")
        else:
            splits = [s for s in args.splits.split(",") if s] if args.splits else None
            collection = from_dataset(args.data_name, args.data_path, args.crop_type, model.image_size, splits)
        return run(model, collection, output, args, context)
    finally:
        distributed.cleanup(context)


def run(model: Model, collection: Collection, output: Path, args, context: distributed.Context) -> int:
    parts = parts_folder(output)
    key = fingerprint(model, collection, args.shard_size, args.batch_size)
    if context.is_main:
        prepare_parts(parts, key)
    distributed.barrier(context)
    count = len(collection.paths)
    print(f"Embedding {count} images from {collection.source} with {model.path} on {model.device} "
          f"({-(-count // args.shard_size)} shard(s) of {args.shard_size}"
          + (f", {context.world_size} ranks" if context.enabled else "") + ")", flush=True)
    embed_shards(model, collection, parts, key, args.shard_size, args.batch_size, args.num_workers, context)
    distributed.barrier(context)
    if not context.is_main:
        return 0
    database, skipped = merge(model, collection, parts, -(-count // args.shard_size))
    if not database.features:
        raise ReirError(f"none of the {count} images could be read (e.g. {skipped[0][1]}); check the collection")
    database.save(output)
    listing = output.with_name(output.name + ".skipped.txt")
    listing.unlink(missing_ok=True)
    if skipped:
        atomic_write(listing, "".join(f"{path}\t{error}\n" for path, error in skipped))
        print(f"Skipped {len(skipped)} unreadable image(s) (all listed in {listing}):", file=sys.stderr)
        for path, error in skipped[:LISTED_FAILURES]:
            print(f"  {error}", file=sys.stderr)
        if len(skipped) > LISTED_FAILURES:
            print(f"  ... and {len(skipped) - LISTED_FAILURES} more", file=sys.stderr)
    shutil.rmtree(parts, ignore_errors=True)
    sizes = ", ".join(f"{split} {len(t)}" for split, t in database.features.items())
    print(f"Wrote {output}: {sizes} images, embeddings {tuple(next(iter(database.features.values())).shape[1:])}")
    return 0
