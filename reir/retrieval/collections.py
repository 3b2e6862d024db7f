"""Collections of images to embed: a folder, a CSV (``path[,label]``), a prepared dataset or WebDataset tar
shards, each cut into shards of work that :mod:`reir.retrieval.embedding_job` embeds one at a time."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from reir.data.images import image_files
from reir.data.tarshards import expand_shards, iter_samples, shard_fingerprint
from reir.errors import ReirError, UsageError
from reir.model.embedding import embed
from reir.model.files import Model
from reir.retrieval.collection_files import recorded_root
from reir.retrieval.database import UNLABELLED


@dataclass
class Collection:
    """Images to embed, in order: the split each goes to, its path and its label (``""`` if unknown)."""

    splits: list[str]
    paths: list[str]
    labels: list[str]
    source: str
    root: str  # the folder served images must lie under (reir.retrieval.collection_files)
    data_name: str | None = None  # the prepared dataset it lists; None for a folder or CSV of images

    def shard_count(self, shard_size: int) -> int:
        return -(-len(self.paths) // shard_size)

    def shard_images(self, shard: int, shard_size: int) -> int:
        return min(shard_size, len(self.paths) - shard * shard_size)

    def job_arguments(self) -> dict:
        """What an embedding job of this collection records and checks on resume (see ``JobArguments``): the
        splits, whether labels were read, and a digest of every image's split, path and label."""
        rows = hashlib.sha256(json.dumps([self.splits, self.paths, self.labels], separators=(",", ":")).encode())
        return {"inputs": self.source, "splits": list(dict.fromkeys(self.splits)),
                "labelled": any(label != UNLABELLED for label in self.labels), "images": rows.hexdigest()}

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
    root: str
    data_name: str | None = None

    def shard_count(self, shard_size: int) -> int:
        return len(self.shards)

    def shard_images(self, shard: int, shard_size: int) -> int:
        return 0  # unknown before the tar is read

    def job_arguments(self) -> dict:
        """As :meth:`Collection.job_arguments`; a tar sample's label is its own, so ``labelled`` is ``None``."""
        shards = hashlib.sha256(json.dumps(shard_fingerprint(self.shards), separators=(",", ":")).encode())
        return {"inputs": self.source, "splits": [self.split], "labelled": None, "images": shards.hexdigest()}

    def embed_shard(self, model: Model, shard: int, shard_size: int, batch_size: int, num_workers: int, bar) -> dict:
        chunks: list[torch.Tensor] = []
        paths: list[str] = []
        labels: list[str] = []
        failed: list[list[str]] = []
        batch: list[tuple] = []

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
        raise ReirError(f"folder {folder} holds no image files; pass a folder of images, a CSV or `data_name`")
    labels = [UNLABELLED] * len(files)
    if labels_from_folders:
        loose = [f for f in files if len(f.relative_to(folder).parts) < 2]
        if loose:
            raise ReirError(f"{loose[0]} is not inside a class folder; with `labels_from_folders` every image "
                            f"must be in {folder}/<class>/")
        labels = [f.relative_to(folder).parts[0] for f in files]
    return Collection([split] * len(files), [str(f.resolve()) for f in files], labels, str(folder.resolve()),
                      str(folder.resolve()))


def from_csv(path: Path, split: str) -> Collection:
    """``path`` column (relative to the CSV's folder or absolute), optional ``label`` column."""
    from reir.data.custom import open_user_csv

    with open_user_csv(path) as reader:
        if "path" not in (reader.fieldnames or []):
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
    return Collection([split] * len(paths), paths, labels, str(path.resolve()), recorded_root(paths))


def from_dataset(data_name: str, data_path: str, crop_type: str, image_size: int,
                 splits: list[str] | None) -> Collection:
    from reir.data.sources import load_dataset

    split_list = load_dataset(data_name, data_path, crop_type, image_size)
    chosen = splits or list(split_list.splits)
    unknown = [s for s in chosen if s not in split_list.splits]
    if unknown:
        raise UsageError(f"dataset {data_name} has no split {unknown[0]}; it has {', '.join(split_list.splits)}")
    names, paths, labels = [], [], []
    for split in chosen:
        names += [split] * len(split_list.splits[split])
        paths += split_list.absolute(split)
        labels += split_list.splits[split].labels
    return Collection(names, paths, labels, f"{data_name} ({crop_type}) in {data_path}", recorded_root(paths),
                      data_name)


def from_shards(pattern: str, split: str) -> TarCollection:
    shards = expand_shards(pattern)
    return TarCollection(shards, split, pattern, recorded_root([str(s.resolve()) for s in shards]))
