"""``reir embed``: a model and a collection of images -> a feature database, resumable and shardable.

The collection is a folder, a CSV (``path[,label]``), a prepared dataset or WebDataset tar
shards (``'shards/{000000..000099}.tar'``). Work is cut into fixed shards (``--shard_size``
images, or one tar file each); each finished shard is written atomically under
``<output>.parts/`` as a database shard, so a killed run started again skips what is done and
ends with the same database as an uninterrupted one. Under ``torchrun`` rank ``r`` embeds shards
``r, r + W, ...``. At the end rank 0 either concatenates the shards into one file or, with
``--shard_output`` or when one file would pass ``--max_file_gb``, writes a manifest and moves the
folder of shards into place: then no process ever holds more than one shard. Images that cannot
be read are skipped, counted and listed, never fatal.
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
from reir.data.tarshards import expand_shards, is_shard_pattern, iter_samples, shard_fingerprint
from reir.fileio import atomic_write
from reir.retrieval.database import (MANIFEST, UNLABELLED, Database, gather, read_shard, read_shard_metadata,
                                     save_shard, write_manifest)
from reir.training import distributed
from reir.training.devices import training_devices

LISTED_FAILURES = 10  # unreadable images printed; the rest are in the database and a text file


@dataclass
class Collection:
    """Images to embed, in order: the split each goes to, its path and its label (``""`` if unknown)."""

    splits: list[str]
    paths: list[str]
    labels: list[str]
    source: str

    def shard_count(self, shard_size: int) -> int:
        return -(-len(self.paths) // shard_size)

    def shard_images(self, shard: int, shard_size: int) -> int:
        return min(shard_size, len(self.paths) - shard * shard_size)

    def identity(self) -> list:
        return self.paths

    def embed_shard(self, model: Model, shard: int, shard_size: int, batch_size: int, num_workers: int, bar) -> dict:
        start = shard * shard_size
        items = self.paths[start:start + shard_size]
        failures: list[tuple[int, str]] = []
        features = embed(model, items, progress=bar, batch_size=batch_size, num_workers=num_workers,
                         unreadable=failures)
        failed = {position for position, _ in failures}
        kept = [start + i for i in range(len(items)) if i not in failed]
        return by_split(features, [self.splits[p] for p in kept], [self.paths[p] for p in kept],
                        [self.labels[p] for p in kept], [[self.paths[start + p], error] for p, error in failures])


@dataclass
class TarCollection:
    """WebDataset tar shards: one tar is one unit of work (and one database shard), all in one split."""

    shards: list[Path]
    split: str
    source: str

    def shard_count(self, shard_size: int) -> int:
        return len(self.shards)

    def shard_images(self, shard: int, shard_size: int) -> int:
        return 0  # unknown before the tar is read

    def identity(self) -> list:
        return shard_fingerprint(self.shards)

    def embed_shard(self, model: Model, shard: int, shard_size: int, batch_size: int, num_workers: int, bar) -> dict:
        chunks, paths, labels, failed, batch = [], [], [], [], []

        def flush():
            if batch:
                features = embed(model, [image for _, image, _ in batch], progress=bar, batch_size=batch_size)
                chunks.append(features)
                paths.extend(path for path, _, _ in batch)
                labels.extend(label for _, _, label in batch)
                batch.clear()

        for path, image, label, error in iter_samples(self.shards[shard]):
            if error:
                failed.append([path, error])
                bar.update(1)
                continue
            batch.append((path, image, label))
            if len(batch) == batch_size:
                flush()
        flush()
        ensemble, meta = model.embedding_shape
        features = torch.cat(chunks) if chunks else torch.empty(0, ensemble, meta)
        return by_split(features, [self.split] * len(paths), paths, labels, failed)


def by_split(features: torch.Tensor, splits: list[str], paths: list[str], labels: list[str], failed: list) -> dict:
    """A shard's rows grouped by split, in order: what :func:`save_shard` writes."""
    rows: dict[str, list[int]] = {}
    for row, split in enumerate(splits):
        rows.setdefault(split, []).append(row)
    return {"features": {split: features[r] for split, r in rows.items()},
            "splits": {split: {"paths": [paths[i] for i in r], "labels": [labels[i] for i in r]}
                       for split, r in rows.items()},
            "failed": failed}


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


def from_shards(pattern: str, split: str) -> TarCollection:
    return TarCollection(expand_shards(pattern), split, pattern)


def fingerprint(model: Model, collection, shard_size: int, batch_size: int) -> str:
    """Changes whenever a finished shard could differ: another model file, image list, shard or batch size."""
    stat = Path(model.path).stat()
    digest = hashlib.sha256(json.dumps(
        [str(Path(model.path).resolve()), stat.st_size, stat.st_mtime_ns, shard_size, batch_size,
         collection.identity()], separators=(",", ":")).encode())
    return digest.hexdigest()[:16]


def parts_folder(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.safetensors"


def finished(parts: Path, shard: int, key: str) -> bool:
    meta = read_shard_metadata(parts / shard_name(shard)) if (parts / shard_name(shard)).is_file() else None
    return meta is not None and meta.get("fingerprint") == key


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


def embed_shards(model: Model, collection, parts: Path, key: str, shard_size: int, batch_size: int,
                 num_workers: int, context: distributed.Context) -> tuple[int, int]:
    """Embed this rank's unfinished shards; returns (shards done now, shards skipped as finished)."""
    from tqdm import tqdm

    shard_count = collection.shard_count(shard_size)
    if context.is_main:  # the one rank that prints counts every rank's finished shards
        kept = sum(finished(parts, s, key) for s in range(shard_count))
        if kept:
            print(f"Resuming: {kept} finished shard(s) of {shard_count} kept", flush=True)
    mine = range(context.rank, shard_count, context.world_size)
    todo = [s for s in mine if not finished(parts, s, key)]
    skipped = len(mine) - len(todo)
    images = sum(collection.shard_images(s, shard_size) for s in todo) or None
    with tqdm(total=images, unit="img", desc="Embed", file=sys.stderr, dynamic_ncols=True,
              disable=not context.is_main, mininterval=0.5 if sys.stderr.isatty() else 10.0) as bar:
        for shard in todo:
            done = collection.embed_shard(model, shard, shard_size, batch_size, num_workers, bar)
            save_shard(parts / shard_name(shard), done["features"], done["splits"],
                       {"fingerprint": key, "failed": done["failed"], "embedding_shape": list(model.embedding_shape)})
    return len(todo), skipped


def database_info(model: Model, collection, skipped: list[list]) -> dict:
    return {"model_file": str(Path(model.path).resolve()), "image_size": model.image_size,
            "mean": model.mean, "std": model.std, "source": collection.source,
            "data_name": model.config.get("data_name"), "skipped": skipped}


def shard_summary(parts: Path, shard_count: int) -> tuple[dict[str, int], list[list]]:
    """Images per split and the ``[path, error]`` of skipped images, from the shards' headers alone."""
    counts: dict[str, int] = {}
    skipped: list[list] = []
    for shard in range(shard_count):
        meta = read_shard_metadata(parts / shard_name(shard))
        for split, listing in meta["splits"].items():
            counts[split] = counts.get(split, 0) + len(listing["paths"])
        skipped += meta["failed"]
    return counts, skipped


def merge(model: Model, collection, parts: Path, shard_count: int, skipped: list[list]) -> Database:
    """All shards, in order, into one in-memory database (for outputs under ``--max_file_gb``)."""

    def slices():
        for shard in range(shard_count):
            features, meta = read_shard(parts / shard_name(shard))
            for split, tensor in features.items():
                yield split, tensor, meta["splits"][split]["paths"], meta["splits"][split]["labels"]

    return Database(*gather(slices()), model.config, database_info(model, collection, skipped))


def publish_sharded(model: Model, collection, parts: Path, output: Path, shard_count: int, skipped: list[list]) -> None:
    """Manifest into the parts folder, then the folder into place; an earlier database there is replaced last."""
    write_manifest(parts, [shard_name(s) for s in range(shard_count)], model.config,
                   database_info(model, collection, skipped))
    (parts / "job.json").unlink()
    previous = output.with_name(output.name + f".previous-{os.getpid()}")
    if output.exists():
        output.rename(previous)
    parts.rename(output)
    if previous.is_dir():
        shutil.rmtree(previous)
    elif previous.exists():
        previous.unlink()


def check_output(output: Path) -> None:
    """An existing folder is replaced only when it is a sharded database; anything else is refused."""
    if output.is_dir() and not (output / MANIFEST).is_file():
        raise UsageError(f"--output {output} is a folder that is not a REIR database; give a new name, "
                         f"such as {output}/collection_data_base")


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
    check_output(output)
    if args.max_file_gb <= 0:
        raise UsageError(f"--max_file_gb {args.max_file_gb} must be positive")
    context, device = distributed.setup(args.device)
    try:
        model = load_model(args.model, device or training_devices(args.device, [0])[0])
        return run(model, open_collection(args, model), output, args, context)
    finally:
        distributed.cleanup(context)


def run(model: Model, collection, output: Path, args, context: distributed.Context) -> int:
    parts = parts_folder(output)
    key = fingerprint(model, collection, args.shard_size, args.batch_size)
    if context.is_main:
        prepare_parts(parts, key)
    distributed.barrier(context)
    shard_count = collection.shard_count(args.shard_size)
    count = sum(collection.shard_images(s, args.shard_size) for s in range(shard_count))
    print(f"Embedding {f'{count} images' if count else f'{shard_count} tar shard(s)'} from {collection.source} "
          f"with {model.path} on {model.device} ({shard_count} shard(s)"
          + (f" of {args.shard_size}" if count else "") + (f", {context.world_size} ranks" if context.enabled else "")
          + ")", flush=True)
    embed_shards(model, collection, parts, key, args.shard_size, args.batch_size, args.num_workers, context)
    distributed.barrier(context)
    if not context.is_main:
        return 0
    counts, skipped = shard_summary(parts, shard_count)
    if not counts:
        raise ReirError(f"none of the {count or len(skipped)} images could be read"
                        + (f" (e.g. {skipped[0][1]})" if skipped else "") + "; check the collection")
    ensemble, meta = model.embedding_shape
    sharded = args.shard_output or sum(counts.values()) * ensemble * meta * 4 > args.max_file_gb * 2**30
    if sharded:
        publish_sharded(model, collection, parts, output, shard_count, skipped)
    else:
        if output.is_dir():
            raise UsageError(f"--output {output} is a sharded database; pass --shard_output to replace it")
        merge(model, collection, parts, shard_count, skipped).save(output)
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
    sizes = ", ".join(f"{split} {n}" for split, n in counts.items())
    form = f"a sharded database of {shard_count} shard(s) and {MANIFEST}" if sharded else "one file"
    print(f"Wrote {output} ({form}): {sizes} images, embeddings {(ensemble, meta)}")
    return 0
