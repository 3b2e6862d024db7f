"""What every index backend shares: vectors from embeddings, a database read chunk by chunk, the splits
that form the searchable collection and the folder that holds its images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from reir.errors import ReirError
from reir.retrieval.database import Database, iter_database, load_database, read_manifest
from reir.retrieval.similarity import flatten

# The key under which a database's (and an index's) info records the folder its images came from
# (reir.retrieval.collection_files decides what may be served with it).
ROOT_KEY = "collection_root"


def database_chunks(database, splits: Sequence[str] | None = None):
    """``(splits, info, chunks)`` of a database (object, file or sharded folder) for indexing.

    ``chunks`` yields ``(split, features, paths, labels)`` in id order, all of one split before
    the next; a sharded database is read one shard at a time.
    """
    if isinstance(database, Database):
        loaded, manifest, source = database, None, None
    elif Path(database).is_dir():
        loaded, manifest, source = None, read_manifest(database), str(database)
    else:
        loaded, manifest, source = load_database(database), None, str(database)
    available = list(manifest["counts"]) if manifest else list(loaded.features)
    chosen = list(splits or collection_splits(available))
    missing = [s for s in chosen if s not in available]
    if missing:
        raise ReirError(f"database has no split {', '.join(missing)}; it has {', '.join(available)}")
    recorded = manifest["info"] if manifest else loaded.info
    info = {"splits": chosen, "model_file": recorded.get("model_file"), **({"database": source} if source else {}),
            **({ROOT_KEY: recorded[ROOT_KEY]} if recorded.get(ROOT_KEY) else {})}
    if manifest:
        chunks = (chunk for split in chosen for chunk in iter_database(database, [split], manifest))
    else:
        chunks = ((s, loaded.features[s], loaded.paths(s), loaded.labels(s)) for s in chosen)
    return chosen, info, chunks


def common_folder(paths: Iterable[str], start: str | None = None) -> str:
    """The deepest folder holding every path (and ``start``, a folder found before); "" when they share none."""
    folders = {os.path.dirname(p) for p in paths if p} | ({start} if start is not None else set())
    try:
        return os.path.commonpath(folders) if folders else ""
    except ValueError:  # absolute and relative paths mixed
        return ""


def collection_splits(database) -> list[str]:
    """The splits that form the searchable collection: all but train, or train when it is alone.

    ``database`` is a :class:`Database` or its split names.
    """
    names = list(getattr(database, "features", database))
    return [s for s in names if s != "train"] or names


def as_vectors(features) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        features = torch.as_tensor(features)
    if features.dim() not in (2, 3):
        raise ReirError(f"embeddings must be [N, ensemble, meta] or [N, D], not {tuple(features.shape)}")
    return flatten(features.detach().float().cpu()).contiguous()
