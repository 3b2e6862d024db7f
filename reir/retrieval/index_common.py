"""What every index backend shares: the surface it offers (:class:`SearchIndex`), vectors from embeddings,
a database read chunk by chunk, the splits that form the searchable collection and the folder that holds
its images."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from reir.errors import ReirError
from reir.retrieval.database import Database, iter_database, load_database, read_manifest
from reir.retrieval.results import Results
from reir.retrieval.similarity import flatten

# The key under which a database's (and an index's) info records the folder its images came from
# (reir.retrieval.collection_files decides what may be served with it).
ROOT_KEY = "collection_root"


@runtime_checkable
class SearchIndex(Protocol):
    """What the service, the command line and the API use of an index, whichever engine holds it.

    FAISS (:class:`reir.retrieval.index.Index`) and Milvus (:class:`reir.retrieval.milvus.MilvusIndex`)
    both implement it, and one test suite (tests/test_index_contract.py) holds every backend to it:
    ids are positions ``0 .. len - 1`` in the order images were added; an exact index ranks like
    :func:`reir.retrieval.similarity.knn`; ``info`` is what the index records besides its rows (model
    file, splits, search parameters, whether any image is labelled), kept with it when it is saved.
    """

    info: dict

    def add(self, features, paths: Sequence[str] | None = None, labels: Sequence[str] | None = None) -> None:
        """Images ``len .. len + N - 1``: their embeddings (``[N, ensemble, meta]`` or ``[N, D]``), paths and
        labels (default ``""``: unknown)."""

    def search(self, queries, k: int = 10) -> Results:
        """The top ``min(k, len)`` images per query, best first; ids ``-1`` pad what was not found."""

    def tune(self, **parameters) -> None:
        """Search-time parameters of an approximate index (``efSearch``, ``nprobe``)."""

    def close(self) -> None:
        """Release what the index holds outside this object (a connection, an embedded server)."""

    def __len__(self) -> int: ...

    @property
    def paths(self) -> Sequence[str]: ...

    @property
    def labels(self) -> Sequence[str]: ...

    @property
    def dim(self) -> int: ...

    @property
    def factory(self) -> str:
        """The engine and index type, for people: ``Flat``, ``HNSW32``, ``milvus HNSW`` ..."""

    @property
    def exact(self) -> bool: ...

    @property
    def root(self) -> str:
        """The deepest folder holding every image ("" when they share none)."""

    @property
    def labelled(self) -> bool:
        """Whether any image has a label: recorded as images are added, never found by reading them all."""


def database_chunks(database, splits: Sequence[str] | None = None):
    """``(splits, info, chunks)`` of a database (object, file or sharded folder) for indexing.

    ``chunks`` yields ``(split, features, paths, labels)`` in id order, all of one split before
    the next; a sharded database is read one shard at a time.
    """
    loaded: Database | None
    if isinstance(database, Database) or not Path(database).is_dir():
        loaded = database if isinstance(database, Database) else load_database(database)
        manifest, available, recorded = None, list(loaded.features), loaded.info
    else:
        loaded, manifest = None, read_manifest(database)
        available, recorded = list(manifest["counts"]), manifest["info"]
    source = None if isinstance(database, Database) else str(database)
    chosen = list(splits or collection_splits(available))
    missing = [s for s in chosen if s not in available]
    if missing:
        raise ReirError(f"database has no split {', '.join(missing)}; it has {', '.join(available)}")
    info = {"splits": chosen, "model_file": recorded.get("model_file"), **({"database": source} if source else {}),
            **({ROOT_KEY: recorded[ROOT_KEY]} if recorded.get(ROOT_KEY) else {})}
    if loaded is None:
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
