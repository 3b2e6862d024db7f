"""The feature database: what inference, ablation and evaluation need, in safe files.

A single safetensors file holds the embeddings of every split (``<split>_features``,
``[N, ensemble, meta]``); its JSON metadata holds the image paths and labels per
split, the dataset's normalisation, the training configuration (to rebuild the
model) and the metrics of the epoch it was written at.

A sharded database is a folder of such files, each holding a slice of every split, and a
``manifest.json`` (format, model, shard list with counts and SHA-256 checksums, totals,
the configuration and information a single file carries). No process ever needs more than
one shard in memory to write it or to stream it (:func:`iter_database`);
:func:`load_database` reads both forms into one :class:`Database`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reir.errors import ReirError
from reir.fileio import METADATA_KEY, file_sha256, load_tensors, save_tensors, write_json
from reir.validation import check_finite, check_text_list, file_structure

FORMAT = "reir-database/1"
SHARDED_FORMAT = "reir-database-shards/1"
SHARD_FORMAT = "reir-database-shard/1"
MANIFEST = "manifest.json"
SUFFIX = "_data_base.safetensors"
UNLABELLED = ""  # the label of an image whose class is unknown
NON_FINITE_FIX = "re-embed the images (reir embed) or retrain; a model giving NaN has diverged"


def shared_label_ids(*label_lists: Sequence[str]) -> list[torch.Tensor]:
    """Class names of several splits as integers on one vocabulary, so equal names get equal ids."""
    vocabulary = {name: i for i, name in enumerate(sorted({label for labels in label_lists for label in labels}))}
    return [torch.tensor([vocabulary[label] for label in labels]) for labels in label_lists]


@dataclass
class Database:
    features: dict[str, torch.Tensor]
    splits: dict[str, dict[str, list[str]]]  # split -> {"paths": [...], "labels": [...]}
    config: dict
    info: dict = field(default_factory=dict)  # data_name, crop_type, mean, std, metrics, epoch, ...

    def paths(self, split: str) -> list[str]:
        return self.splits[split]["paths"]

    def labels(self, split: str) -> list[str]:
        return self.splits[split]["labels"]

    def label_ids(self, *splits: str) -> list[torch.Tensor]:
        """Labels of several splits as integers on one shared vocabulary."""
        return shared_label_ids(*(self.labels(s) for s in splits))

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return ("query", "gallery") if "query" in self.splits else ("test",)

    def save(self, path: str | Path) -> Path:
        for name, tensor in self.features.items():
            check_finite(tensor, f"split {name} of the database", NON_FINITE_FIX)
        return save_tensors(path, {f"{name}_features": t for name, t in self.features.items()},
                            {"format": FORMAT, "splits": self.splits, "config": self.config, "info": self.info})


def load_database(path: str | os.PathLike) -> Database:
    """A database file, or a sharded database folder read shard by shard into one :class:`Database`."""
    if Path(path).is_dir():
        manifest = read_manifest(path)
        return Database(*gather(iter_database(path, manifest=manifest)), manifest["config"], manifest["info"])
    with file_structure(path, "database", f"pass a *{SUFFIX} file written by train.py or reir embed"):
        tensors, meta = load_tensors(path, "database")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ReirError(f"database {path} is not a REIR database; pass a *{SUFFIX} file written by train.py")
        features = {name[: -len("_features")]: t for name, t in tensors.items() if name.endswith("_features")}
        for name, tensor in features.items():
            check_finite(tensor, f"database {path} (split {name})", NON_FINITE_FIX)
        splits = meta["splits"]
        for name, tensor in features.items():
            if name not in splits or len(splits[name]["paths"]) != len(tensor):
                raise ReirError(f"database {path} is inconsistent in split {name!r}; regenerate it with train.py")
        for name, split in splits.items():
            check_text_list(split["labels"], f"split {name} labels", len(check_text_list(split["paths"], name)))
        if not isinstance(meta["config"], dict) or not isinstance(meta.get("info", {}), dict):
            raise TypeError("config or info is not an object")
        return Database(features, splits, meta["config"], meta.get("info", {}))


def gather(slices) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, list[str]]]]:
    """``(split, features, paths, labels)`` slices, in order, into one tensor and one listing per split."""
    chunks: dict[str, list[torch.Tensor]] = {}
    splits: dict[str, dict[str, list[str]]] = {}
    for split, features, paths, labels in slices:
        chunks.setdefault(split, []).append(features)
        listing = splits.setdefault(split, {"paths": [], "labels": []})
        listing["paths"] += paths
        listing["labels"] += labels
    return {s: torch.cat(c) for s, c in chunks.items()}, splits


def resolve_database_path(name: str, output_dir: str | Path = ".") -> Path:
    """A database given as in the original (a name under ``results/``) or as any path."""
    candidate = Path(name)
    if candidate.is_file() or (candidate / MANIFEST).is_file():
        return candidate
    under_results = Path(output_dir) / "results" / name
    for option in (under_results, under_results.with_name(under_results.name + SUFFIX)):
        if option.is_file() or (option / MANIFEST).is_file():
            return option
    if name.endswith(".pth"):  # the original's names: look for our safe equivalent
        stem = Path(name).name[: -len(".pth")]
        if stem.endswith("_data_base"):
            stem = stem[: -len("_data_base")]
        option = Path(output_dir) / "results" / f"{stem}{SUFFIX}"
        if option.is_file():
            return option
    raise ReirError(f"database {name} not found (also looked in {Path(output_dir) / 'results'}); "
                    "train a model first or pass the path of a *_data_base.safetensors file")


def save_shard(path: str | Path, features: dict[str, torch.Tensor], splits: dict[str, dict[str, list[str]]],
               extra: dict | None = None) -> Path:
    """One shard of a sharded database: a slice of each split, with its paths and labels."""
    for name, tensor in features.items():
        check_finite(tensor, f"split {name} of database shard {path}", NON_FINITE_FIX)
    return save_tensors(path, {f"{name}_features": t for name, t in features.items()},
                        {"format": SHARD_FORMAT, "splits": splits, **(extra or {})})


def read_shard(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A shard's features per split and its metadata; a file of any other kind is a :class:`ReirError`."""
    tensors, meta = load_tensors(path, "database shard")
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        raise ReirError(f"{path} is not a REIR database shard; regenerate the database with reir embed")
    features = {name[: -len("_features")]: t for name, t in tensors.items() if name.endswith("_features")}
    for name, tensor in features.items():
        check_finite(tensor, f"database shard {path} (split {name})", NON_FINITE_FIX)
    return features, meta


def read_shard_metadata(path: str | Path) -> dict | None:
    """A shard's metadata from its header alone (no tensor is read); ``None`` if it is not a shard."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get(METADATA_KEY, "null"))
    except (SafetensorError, OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == SHARD_FORMAT else None


def write_manifest(folder: str | Path, shard_names: list[str], config: dict, info: dict) -> dict:
    """The manifest that makes a folder of shards one database; read from the shards' headers, not their tensors."""
    folder = Path(folder)
    shards, shape = [], None
    totals: dict[str, int] = {}
    for name in shard_names:
        meta = read_shard_metadata(folder / name)
        if meta is None:
            raise ReirError(f"{folder / name} is not a REIR database shard; regenerate the database with reir embed")
        counts = {split: len(listing["paths"]) for split, listing in meta["splits"].items()}
        for split, count in counts.items():
            totals[split] = totals.get(split, 0) + count
        shape = shape or meta.get("embedding_shape")
        shards.append({"file": name, "counts": counts, "sha256": file_sha256(folder / name)})
    manifest = {"format": SHARDED_FORMAT, "model_file": info.get("model_file"), "embedding_shape": shape,
                "counts": totals, "shards": shards, "config": config, "info": info}
    write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict:
    from reir.fileio import read_json

    manifest = read_json(Path(folder) / MANIFEST, "database manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDED_FORMAT:
        raise ReirError(f"{folder} is not a sharded REIR database (no {MANIFEST} of format {SHARDED_FORMAT}); "
                        "write one with reir embed `shard_output`")
    return manifest


def iter_database(path: str | os.PathLike, splits: list[str] | None = None, manifest: dict | None = None
                  ) -> Iterator[tuple[str, torch.Tensor, list[str], list[str]]]:
    """``(split, features, paths, labels)`` slices in database order, one shard in memory at a time.

    Shards are checked against the manifest's checksums and counts as they are read. A
    single-file database yields one slice per split.
    """
    path = Path(path)
    if not path.is_dir():
        db = load_database(path)
        for split in splits or list(db.features):
            yield split, db.features[split], db.paths(split), db.labels(split)
        return
    manifest = manifest or read_manifest(path)
    for entry in manifest["shards"]:
        file = path / entry["file"]
        if not file.is_file() or file_sha256(file) != entry["sha256"]:
            raise ReirError(f"shard {file} is missing or differs from its checksum in {path / MANIFEST}; "
                            "embed the collection again")
        features, meta = read_shard(file)
        for split, tensor in features.items():
            if splits is not None and split not in splits:
                continue
            listing = meta["splits"][split]
            if len(tensor) != entry["counts"].get(split) or len(listing["paths"]) != len(tensor):
                raise ReirError(f"shard {file} is inconsistent in split {split!r}; embed the collection again")
            yield split, tensor, listing["paths"], listing["labels"]


def is_database(path: str) -> bool:
    """A sharded database's folder, or a safetensors file (8-byte header length, then its JSON header):
    told from the content, as an index may be named anything."""
    candidate = Path(path)
    if (candidate / MANIFEST).is_file():
        return True
    try:
        with open(candidate, "rb") as handle:
            return handle.read(9)[8:] == b"{"
    except OSError:
        return False
