"""REIR embeddings in a Milvus collection: the same search as :class:`reir.Index`, past one machine.

Milvus is a vector database that runs embedded (Milvus Lite: ``pip install milvus-lite``, a local
``*.db`` path as the URI), as one server (``http://HOST:19530``) or as a distributed cluster; the
same :class:`pymilvus.MilvusClient` calls reach all three, so the index built and searched here on a
laptop is built and searched the same way on a cluster. A collection holds one row per image:
``id`` (its position, as in a FAISS index), ``vector`` (the flattened scaled embedding, so the
inner product is REIR's similarity), ``path`` and ``label``. The id map lives in the collection,
not in memory; what else :class:`reir.Index` records (model file, splits, index and search
parameters, whether any image is labelled) is a collection property.

A server differs from Milvus Lite in when rows become what is searched: it keeps inserted rows in
growing segments, searched exhaustively (or through a temporary index) and left out of its row
statistics until a flush seals them; it builds the collection's index on sealed segments in the
background; and a loaded collection keeps serving segments as they were when it was loaded. So
every write ends with a flush, a wait for the index and a new load (:meth:`MilvusIndex.publish`),
rows are counted by a ``count(*)`` query, and collections are created with ``Strong`` consistency
(a search sees every row inserted before it). Milvus Lite does all of this too, in well under a second.

A collection is built whole under a staging name (:func:`staging_name`) and takes its own name only once
it is published, so a build that fails or is killed midway leaves the collection it was to replace as it
was. What REIR wrote is recognised by its info property (:func:`reir_info`); a collection of that name
that is not REIR's is a user's, and refused unless the caller passes ``overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from reir.errors import ReirError, UsageError
from reir.retrieval.database import UNLABELLED
from reir.retrieval.index_common import as_vectors, common_folder, database_chunks
from reir.retrieval.results import Results
from reir.validation import check_finite, check_k

INDEX_TYPES = ("FLAT", "HNSW", "IVF_FLAT", "IVF_PQ")
INFO_PROPERTY = "reir_info"
INSERT_BATCH = 4096  # rows per insert: ~9.4 MB of 576-dimensional vectors, far below gRPC's message limit
MAX_PATH = 4096
MAX_LABEL = 1024
SEARCH_PARAMETERS = {"efSearch": "ef", "nprobe": "nprobe"}  # FAISS's names -> Milvus's
SERVER_SCHEMES = ("http://", "https://", "tcp://", "unix:")  # any other URI is a Milvus Lite file
CACHED_ROWS = 10_000
INDEX_WAIT_S = 3600  # the longest a write waits for a server to index its rows
TOKEN_VARIABLE = "MILVUS_TOKEN"  # "user:password" or an API key, for a deployment that requires one
STAGING_SUFFIX = "_reir_staging"  # Milvus names allow letters, digits and underscores


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise ReirError("the milvus backend needs pymilvus (and milvus-lite for local files); "
                        "pip install pymilvus milvus-lite") from None
    return pymilvus


def required_uri(uri: str | None) -> str:
    """``uri``, refused when missing: every Milvus index lives at one."""
    if not uri:
        raise UsageError("the milvus backend needs a URI: a Milvus Lite *.db file or http://HOST:19530")
    return uri


def connect(uri: str):
    """A client for Milvus Lite (a local path ending in .db) or a Milvus server / cluster (http://HOST:19530,
    ``http://HOST:19530/DATABASE`` for a database other than ``default``), authenticated by the token in
    the environment variable :data:`TOKEN_VARIABLE` when it is set."""
    uri = required_uri(uri)
    pymilvus = _pymilvus()
    # pymilvus logs every failed call with its traceback; ours become one-line ReirErrors instead
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    is_local = not uri.startswith(SERVER_SCHEMES)
    if is_local and not uri.endswith(".db"):
        raise UsageError(f"URI {uri} is neither a Milvus Lite file (name it *.db) nor a server "
                         "(http://HOST:19530)")
    if is_local:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        # Milvus Lite's in-process gRPC server logs a traceback for each call it does not implement
        # (pymilvus asks for timestamps it can do without); nothing fails, so keep it quiet
        logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    try:
        return pymilvus.MilvusClient(uri=uri, token=os.environ.get(TOKEN_VARIABLE, ""))
    except Exception as exc:  # noqa: BLE001 - pymilvus raises many kinds for an unreachable server
        refusal = _unauthenticated(exc)
        if refusal:
            raise ReirError(f"Milvus at {uri} refused the credentials ({refusal}); set {TOKEN_VARIABLE} to "
                            "user:password or an API key") from None
        raise ReirError(f"cannot reach Milvus at {uri} ({_message(exc)}); start the server or check the URI") from None


def _unauthenticated(exc: Exception) -> str | None:
    """The server's reason when it refused the credentials: pymilvus reports any failed connection as the same
    "illegal connection params or server unavailable", with gRPC's own status underneath."""
    cause = exc.__cause__ or exc.__context__
    code, details = getattr(cause, "code", None), getattr(cause, "details", None)
    if callable(code) and callable(details) and getattr(code(), "name", "") == "UNAUTHENTICATED":
        return str(details())
    return None


def release(uri: str) -> None:
    """Stop the in-process Milvus Lite server of a local file, for every client of it in this process (a no-op
    for remote servers); it finishes its background work first."""
    if uri.startswith(SERVER_SCHEMES):
        return
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return
    server_manager_instance.release_server(str(Path(uri).resolve()))


def staging_name(collection: str) -> str:
    """Where a collection named ``collection`` is built before it takes that name."""
    return collection + STAGING_SUFFIX


def reir_info(client, collection: str) -> dict | None:
    """What REIR recorded on a collection it wrote (its :data:`INFO_PROPERTY`); ``None`` for any other."""
    described = client.describe_collection(collection)
    try:
        info = json.loads((described.get("properties") or {}).get(INFO_PROPERTY, "null") or "null")
    except ValueError:
        return None
    if not isinstance(info, dict) or "index_type" not in info or not isinstance(info.get("dim"), int) \
            or not isinstance(info.get("search_parameters", {}), dict) \
            or not isinstance(info.get("labelled", False), bool):
        return None
    return info


def claim_collection(client, uri: str, collection: str, overwrite: bool = False) -> None:
    """Refuse, before any work, a build that would replace a collection REIR did not write: the one named
    ``collection`` or its staging collection. REIR's own (an earlier build, or what a killed one left) are
    replaced; any other only with ``overwrite``."""
    for name in (collection, staging_name(collection)):
        try:
            foreign = client.has_collection(name) and reir_info(client, name) is None
        except Exception as exc:  # noqa: BLE001 - the server's refusal
            raise ReirError(f"Milvus at {uri} cannot describe collection {name} ({_message(exc)})") from None
        if foreign and not overwrite:
            raise UsageError(f"collection {name} at {uri} already exists and was not written by reir index; "
                             "set `overwrite` to replace it or choose another `collection`")


def claimed_client(uri: str, collection: str, overwrite: bool = False):
    """A client for ``uri``, once :func:`claim_collection` allows building ``collection`` there (closed if not)."""
    client = connect(uri)
    try:
        claim_collection(client, uri, collection, overwrite)
    except BaseException:
        client.close()
        release(uri)
        raise
    return client


def index_parameters(index_type: str, parameters: dict | None) -> dict:
    index_type = index_type.upper()
    if index_type not in INDEX_TYPES:
        raise UsageError(f"index type {index_type} is not one of {', '.join(INDEX_TYPES)}")
    defaults = {"HNSW": {"M": 32, "efConstruction": 200}, "IVF_FLAT": {"nlist": 1024},
                "IVF_PQ": {"nlist": 1024, "m": 96, "nbits": 8}}.get(index_type, {})
    return {**defaults, **(parameters or {})}


class MilvusIndex:
    """Database images in a Milvus collection, searchable by REIR's similarity (inner product).

    A :class:`reir.retrieval.index_common.SearchIndex`, like :class:`reir.retrieval.index.Index`;
    ``paths`` and ``labels`` are read from the collection on demand. ``FLAT`` is exact; ``HNSW``,
    ``IVF_FLAT`` and ``IVF_PQ`` are approximate.
    """

    backend = "milvus"

    def __init__(self, client, uri: str, collection: str, index_type: str, dim: int, info: dict | None = None):
        self.client = client
        self.uri = uri
        self.collection = collection
        # set while the rows are in a staging collection: the name it takes at its first publish, and whether
        # it may replace a collection of that name REIR did not write
        self.publish_as: str | None = None
        self.overwrite = False
        self.index_type = index_type
        self._dim = dim
        self.info = dict(info or {})
        self.search_parameters: dict = {}
        self._count: int | None = None
        self._rows: OrderedDict[int, tuple[str, str]] = OrderedDict()
        self.paths = _FieldView(self, 0)
        self.labels = _FieldView(self, 1)

    @property
    def factory(self) -> str:
        return f"milvus {self.index_type}"

    @property
    def exact(self) -> bool:
        return self.index_type == "FLAT"

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def root(self) -> str:
        """The deepest folder holding every image, kept in the collection's info as rows are added."""
        if "root" not in self.info:  # a collection written before the root was kept
            self.info["root"] = common_folder(self.paths)
        return self.info["root"]

    @property
    def labelled(self) -> bool:
        """Whether any image has a label, kept in the collection's info as rows are added."""
        return self.info["labelled"]

    def __len__(self) -> int:
        """Rows counted by the server (its statistics leave out rows not yet flushed)."""
        if self._count is None:
            try:
                counted = self.client.query(self.collection, filter="", output_fields=["count(*)"])
            except Exception as exc:  # noqa: BLE001 - the server's refusal
                raise ReirError(f"Milvus cannot count {self.collection} ({_message(exc)})") from None
            self._count = int(counted[0]["count(*)"])
        return self._count

    @classmethod
    def create(cls, uri: str, collection: str, dim: int, index_type: str = "FLAT", parameters: dict | None = None,
               info: dict | None = None, *, overwrite: bool = False) -> MilvusIndex:
        """A new, empty collection, named ``collection`` once published (:meth:`publish`): it then replaces
        the collection of that name if REIR wrote it, any with ``overwrite``; another is refused here."""
        index_type = index_type.upper()
        parameters = index_parameters(index_type, parameters)
        client = claimed_client(required_uri(uri), collection, overwrite)
        try:
            return cls._create(client, uri, collection, dim, index_type, parameters, info, overwrite)
        except BaseException:
            client.close()
            release(uri)
            raise

    @classmethod
    def _create(cls, client, uri: str, collection: str, dim: int, index_type: str, parameters: dict,
                info: dict | None, overwrite: bool) -> MilvusIndex:
        """:meth:`create` with a client :func:`claimed_client` opened: the staging collection, its info
        property set as it is made (so a build killed at any point leaves a collection REIR knows as its own)."""
        pymilvus = _pymilvus()
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("path", pymilvus.DataType.VARCHAR, max_length=MAX_PATH)
        schema.add_field("label", pymilvus.DataType.VARCHAR, max_length=MAX_LABEL)
        index_params = client.prepare_index_params()
        index_params.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=parameters)
        info = {**(info or {}), "index_type": index_type, "index_parameters": parameters, "dim": dim,
                "labelled": False}
        created = cls(client, uri, staging_name(collection), index_type, dim, info)
        created.publish_as, created.overwrite = collection, overwrite
        try:
            if client.has_collection(created.collection):  # left by a build that stopped; REIR's (claimed)
                client.drop_collection(created.collection)
            client.create_collection(created.collection, schema=schema, index_params=index_params,
                                     consistency_level="Strong", properties=created.info_properties())
        except Exception as exc:  # noqa: BLE001 - the server's refusal, e.g. an invalid index parameter
            raise UsageError(f"Milvus refused {index_type} {parameters} ({_message(exc)}); "
                             "check the index parameters") from None
        return created

    @classmethod
    def build(cls, features, paths: Sequence[str] | None = None, labels: Sequence[str] | None = None,
              index_type: str = "FLAT", info: dict | None = None, *, uri: str | None = None, collection: str = "reir",
              parameters: dict | None = None, overwrite: bool = False) -> MilvusIndex:
        """A collection over ``features`` (``[N, ensemble, meta]`` or ``[N, D]``), inserted in batches; it
        replaces a collection of that name as :meth:`create` says, once built whole."""
        vectors = as_vectors(features)
        built = cls.create(required_uri(uri), collection, vectors.shape[1], index_type, parameters, info,
                           overwrite=overwrite)
        try:
            built.add(vectors, paths, labels)
        except BaseException:
            built.discard()
            raise
        return built

    @classmethod
    def from_database(cls, database, splits: Sequence[str] | None = None, index_type: str = "FLAT", *,
                      uri: str | None = None, collection: str = "reir", parameters: dict | None = None,
                      overwrite: bool = False) -> MilvusIndex:
        """A collection over a database's splits, streamed shard by shard from a sharded database; it
        replaces a collection of that name as :meth:`create` says (refused before a shard is read), once
        built whole."""
        index_type = index_type.upper()
        parameters = index_parameters(index_type, parameters)
        chosen, info, chunks = database_chunks(database, splits)
        uri = required_uri(uri)
        client = claimed_client(uri, collection, overwrite)
        index = None
        try:
            for _, features, paths, labels in chunks:
                if index is None:
                    index = cls._create(client, uri, collection, math.prod(features.shape[1:]), index_type,
                                        parameters, info, overwrite)
                index.insert(features, paths, labels)
            if index is None:
                raise ReirError(f"the splits {', '.join(chosen)} hold no images; embed some first")
            index.publish()
        except BaseException:
            if index is None:
                client.close()
                release(uri)
            else:
                index.discard()
            raise
        return index

    def discard(self) -> None:
        """After a failed build: drop the staging collection (the collection it was to replace is untouched)
        and close; a collection already published is only closed."""
        if self.publish_as is not None:
            with contextlib.suppress(Exception):  # the failure that led here is the one to report
                self.client.drop_collection(self.collection)
        with contextlib.suppress(Exception):
            self.close()

    def add(self, features, paths: Sequence[str] | None = None, labels: Sequence[str] | None = None) -> None:
        """Rows ``len .. len + N - 1``, then searched through the collection's index (:meth:`publish`)."""
        self.insert(features, paths, labels)
        self.publish()

    def insert(self, features, paths: Sequence[str] | None = None, labels: Sequence[str] | None = None) -> None:
        """Rows ``len .. len + N - 1``, in batches of :data:`INSERT_BATCH`; searchable at once, through the
        collection's index only once published (several inserts, one :meth:`publish`)."""
        vectors = check_finite(as_vectors(features), "the embeddings to index", "re-embed the images (reir embed)")
        if vectors.shape[1] != self.dim:
            raise ReirError(f"vectors of dimension {vectors.shape[1]} cannot join an index of dimension {self.dim}; "
                            "embed with the same model")
        paths = [str(p) for p in paths] if paths is not None else [""] * len(vectors)
        labels = [str(label) for label in labels] if labels is not None else [UNLABELLED] * len(vectors)
        if len(paths) != len(vectors) or len(labels) != len(vectors):
            raise ReirError(f"{len(vectors)} vectors but {len(paths)} paths and {len(labels)} labels; give one each")
        too_long = next((p for p in paths if len(p.encode()) > MAX_PATH), None)
        if too_long is not None:
            raise ReirError(f"path {too_long[:60]}... is longer than {MAX_PATH} bytes; shorten it")
        start, array = len(self), vectors.numpy()
        for first in range(0, len(vectors), INSERT_BATCH):
            last = min(first + INSERT_BATCH, len(vectors))
            rows = [{"id": start + i, "vector": array[i], "path": paths[i], "label": labels[i]}
                    for i in range(first, last)]
            try:
                self.client.insert(self.collection, rows)
            except Exception as exc:  # noqa: BLE001 - the server's refusal
                raise ReirError(f"Milvus refused an insert into {self.collection} ({_message(exc)})") from None
        self._count = start + len(vectors)
        self.info["root"] = common_folder(paths, self.info.get("root"))
        self.info["labelled"] = self.info["labelled"] or any(label != UNLABELLED for label in labels)
        self.save_info()

    def publish(self) -> None:
        """Make what is searched the collection as built: flush the inserted rows into sealed segments, wait
        until the server has indexed them all, and load the collection again to serve that index.

        Milvus Lite indexes flushed rows in a background thread and has no call that waits for it (its
        index state always reads finished); a load that meets that thread reads a half-written index file.
        Stopping its embedded server waits for the thread, so a Lite file is reopened instead.

        The first publish of a new collection then gives it its name (:meth:`take_name`).
        """
        try:
            self.client.flush(self.collection)
            if self.uri.startswith(SERVER_SCHEMES):
                deadline = time.monotonic() + INDEX_WAIT_S
                while not self._indexed():
                    if time.monotonic() > deadline:
                        raise ReirError(f"Milvus did not finish indexing {self.collection} in {INDEX_WAIT_S} s; "
                                        "look at the server's index nodes, then build again")
                    time.sleep(0.2)
                self.client.release_collection(self.collection)
            else:
                self.client.close()
                release(self.uri)
                self.client = connect(self.uri)
            self.client.load_collection(self.collection)
        except ReirError:
            raise
        except Exception as exc:  # noqa: BLE001 - the server's refusal
            raise ReirError(f"Milvus could not flush and load {self.collection} ({_message(exc)})") from None
        if self.publish_as is not None:
            self.take_name()

    def take_name(self) -> None:
        """Replace the collection this one is to be (claimed again: one may have appeared since the build
        began) with this staging collection, built and loaded: a drop, then a rename, the nearest Milvus
        has to one step. A rename keeps the collection's properties (its info)."""
        name, staging = self.publish_as, self.collection
        assert name is not None  # called by publish while staged
        claim_collection(self.client, self.uri, name, self.overwrite)
        try:
            if self.client.has_collection(name):
                self.client.drop_collection(name)
            self.client.rename_collection(staging, name)
            self.collection, self.publish_as = name, None
            self.client.load_collection(name)  # Milvus Lite releases a renamed collection
        except Exception as exc:  # noqa: BLE001 - the server's refusal
            raise ReirError(f"Milvus could not rename {staging} to {name} and load it ({_message(exc)}); "
                            "build again") from None

    def _indexed(self) -> bool:
        described = self.client.describe_index(self.collection, "vector")
        return described["pending_index_rows"] == 0 and described["indexed_rows"] >= described["total_rows"]

    def tune(self, **parameters) -> None:
        """Search-time parameters, by FAISS's names (``efSearch``, ``nprobe``) or Milvus's (``ef``)."""
        for name, value in parameters.items():
            milvus_name = SEARCH_PARAMETERS.get(name, name)
            if milvus_name not in ("ef", "nprobe"):
                raise UsageError(f"milvus {self.index_type} has no search parameter {name}; use efSearch or nprobe")
            self.search_parameters[milvus_name] = value

    def search(self, queries, k: int = 10) -> Results:
        """``[Q, k]`` scores and ids best first; ids ``-1`` (scores ``-inf``) pad rows not filled."""
        queries = as_vectors(queries)
        if queries.shape[1] != self.dim:
            raise ReirError(f"queries have dimension {queries.shape[1]} but the index {self.dim}; "
                            "embed with the model the index was built for")
        k = min(check_k(k), len(self))
        scores = torch.full((len(queries), k), float("-inf"))
        ids = torch.full((len(queries), k), -1, dtype=torch.long)
        if k == 0 or not len(queries):
            return Results(scores, ids, len(self))
        params: dict[str, Any] = {"metric_type": "IP", "params": dict(self.search_parameters)}
        if "ef" in params["params"]:
            params["params"]["ef"] = max(params["params"]["ef"], k)
        try:
            hits = self.client.search(self.collection, data=list(queries.numpy()), limit=k,
                                      output_fields=["path", "label"], search_params=params)
        except Exception as exc:  # noqa: BLE001 - the server's refusal
            raise ReirError(f"Milvus search in {self.collection} failed ({_message(exc)})") from None
        for row, found in enumerate(hits):
            for column, hit in enumerate(found):
                ids[row, column] = int(hit["id"])
                scores[row, column] = float(hit["distance"])
                self._remember(int(hit["id"]), hit["entity"]["path"], hit["entity"]["label"])
        return Results(scores, ids, len(self))

    def row(self, image_id: int) -> tuple[str, str]:
        """``(path, label)`` of one image, from a small cache or the collection."""
        if image_id in self._rows:
            self._rows.move_to_end(image_id)
            return self._rows[image_id]
        if not 0 <= image_id < len(self):
            raise IndexError(image_id)
        found = self.client.query(self.collection, ids=[image_id], output_fields=["path", "label"])
        if not found:
            raise IndexError(image_id)
        return self._remember(image_id, found[0]["path"], found[0]["label"])

    def _remember(self, image_id: int, path: str, label: str) -> tuple[str, str]:
        self._rows[image_id] = (path, label)
        if len(self._rows) > CACHED_ROWS:
            self._rows.popitem(last=False)
        return path, label

    def iter_rows(self, batch: int = 1000):
        """``(path, label)`` of every image in id order, a page at a time."""
        for first in range(0, len(self), batch):
            found = self.client.query(self.collection, filter=f"id >= {first} and id < {first + batch}",
                                      output_fields=["path", "label"])
            yield from ((r["path"], r["label"]) for r in sorted(found, key=lambda r: r["id"]))

    def save_info(self) -> None:
        """What serving needs besides the rows (model file, splits, index and search parameters, whether any
        image is labelled), as a collection property."""
        self.client.alter_collection_properties(self.collection, properties=self.info_properties())

    def info_properties(self) -> dict[str, str]:
        """The collection property :meth:`save_info` sets: the info, with the search parameters as now."""
        self.info["search_parameters"] = dict(self.search_parameters)
        return {INFO_PROPERTY: json.dumps(self.info)}

    @classmethod
    def load(cls, uri: str, collection: str = "reir") -> MilvusIndex:
        client = connect(uri)
        if not client.has_collection(collection):
            raise ReirError(f"Milvus at {uri} has no collection {collection}; build it with "
                            f"reir index `backend` milvus `uri` {uri} `collection` {collection}")
        info = reir_info(client, collection)
        if info is None:
            raise ReirError(f"collection {collection} at {uri} was not written by reir index; rebuild it")
        client.load_collection(collection)  # a reopened collection starts released: searchable only once loaded
        if "labelled" not in info:  # written before the flag was kept: one labelled row, found by the server
            info["labelled"] = bool(client.query(collection, filter=f'label != "{UNLABELLED}"',
                                                 output_fields=["id"], limit=1))
        loaded = cls(client, uri, collection, info["index_type"], info["dim"], info)
        loaded.tune(**info.get("search_parameters", {}))
        return loaded

    def close(self) -> None:
        """Close the connection; a Milvus Lite file's in-process server stops with it."""
        self.client.close()
        release(self.uri)


class _FieldView(Sequence):
    """``index.paths`` / ``index.labels`` of a Milvus index: read from the collection when asked."""

    def __init__(self, source: MilvusIndex, column: int):
        self.source = source  # not "index": that is Sequence.index
        self.column = column

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, image_id):
        if isinstance(image_id, slice):
            return [self[i] for i in range(*image_id.indices(len(self)))]
        return self.source.row(int(image_id))[self.column]

    def __iter__(self):
        return (row[self.column] for row in self.source.iter_rows())


def _message(exc: Exception) -> str:
    text = str(getattr(exc, "message", "") or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
