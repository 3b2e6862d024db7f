"""Choosing an index backend: FAISS (:class:`reir.retrieval.index.Index`, an index file and its id map) or
Milvus (:class:`reir.retrieval.milvus.MilvusIndex`, a collection in Milvus Lite or a Milvus server).

Both classes know nothing of each other; these functions are the one place that picks between them,
so neither module imports the other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from reir.errors import ReirError, UsageError
from reir.retrieval.index import EXACT_FACTORY, Index
from reir.retrieval.index_common import SearchIndex
from reir.retrieval.milvus import MilvusIndex

BACKENDS = ("faiss", "milvus")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UsageError(f"unknown index backend {backend!r}; use faiss or milvus")
    return backend


def milvus_type(factory: str) -> str:
    """A FAISS-style factory name as a Milvus index type (``Flat`` -> ``FLAT``, ``hnsw`` -> ``HNSW``)."""
    return "FLAT" if factory == EXACT_FACTORY else factory.upper()


def build_index(features: torch.Tensor, paths: Sequence[str] | None = None, labels: Sequence[str] | None = None,
                factory: str = EXACT_FACTORY, info: dict | None = None, train_size: int | None = None, *,
                backend: str = "faiss", uri: str | None = None, collection: str = "reir",
                parameters: dict | None = None, overwrite: bool = False) -> SearchIndex:
    """An index over ``features``; with ``backend="milvus"`` a collection at ``uri``, ``factory`` then being a
    Milvus index type (``FLAT``, ``HNSW``, ``IVF_FLAT``, ``IVF_PQ``). The collection replaces one of that name
    REIR wrote; one it did not is refused unless ``overwrite``."""
    if check_backend(backend) == "milvus":
        return MilvusIndex.build(features, paths, labels, milvus_type(factory), info, uri=uri, collection=collection,
                                 parameters=parameters, overwrite=overwrite)
    return Index.build(features, paths, labels, factory, info, train_size)


def index_from_database(database, splits: Sequence[str] | None = None, factory: str = EXACT_FACTORY,
                        train_size: int | None = None, *, backend: str = "faiss", uri: str | None = None,
                        collection: str = "reir", parameters: dict | None = None,
                        overwrite: bool = False) -> SearchIndex:
    """An index over a database's splits (default: every split but train, else train), of either backend; a
    Milvus collection replaces one of that name REIR wrote, one it did not only with ``overwrite``."""
    if check_backend(backend) == "milvus":
        return MilvusIndex.from_database(database, splits, milvus_type(factory), uri=uri, collection=collection,
                                         parameters=parameters, overwrite=overwrite)
    return Index.from_database(database, splits, factory, train_size)


def open_index(backend: str = "faiss", path: str | os.PathLike | None = None, *, uri: str | None = None,
               collection: str = "reir") -> SearchIndex:
    """A saved index: a FAISS file (``path``) or a Milvus collection (``uri``, ``collection``)."""
    if check_backend(backend) == "milvus":
        if not uri:
            raise UsageError("the milvus backend needs `uri` (a Milvus Lite *.db file or http://HOST:19530)")
        return MilvusIndex.load(uri, collection)
    if path is None:
        raise ReirError("the faiss backend opens an index file; give its path")
    return Index.load(path)
