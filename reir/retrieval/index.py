"""A searchable collection: REIR embeddings in a FAISS index, with the id map of paths and labels."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from reir.errors import ReirError, UsageError
from reir.fileio import atomic_write, file_sha256, read_json, replace
from reir.retrieval.database import UNLABELLED
from reir.retrieval.faiss_layout import check_faiss_layout
from reir.retrieval.index_common import as_vectors, common_folder, database_chunks
from reir.retrieval.results import Results
from reir.retrieval.similarity import knn
from reir.validation import check_finite, check_k, check_text_list, file_structure

INDEX_FORMAT = "reir-index/1"
EXACT_FACTORY = "Flat"
NON_FINITE_FIX = "re-embed the images (reir embed) and rebuild the index"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ReirError("indexes need faiss-cpu; pip install faiss-cpu") from None
    return faiss


class Index:
    """Database images searchable by REIR's similarity, the mean per-branch cosine.

    Vectors are the flattened, scaled embeddings (:func:`reir.retrieval.similarity.flatten`), whose inner
    product is exactly that similarity. ``factory="Flat"`` is exact and ranks through
    :func:`reir.retrieval.similarity.knn` (the ranking evaluation uses, ties to the lower id); any other
    FAISS factory string (``HNSW32``, ``IVF1024,Flat``, ``IVF4096,PQ48`` ...) is an
    approximate inner-product index, trained on the vectors it is built from.
    Ids are positions ``0 .. len-1``; ``paths`` and ``labels`` describe them. A
    :class:`reir.retrieval.index_common.SearchIndex`.
    """

    def __init__(self, faiss_index, factory: str, paths: list[str], labels: list[str], info: dict | None = None):
        self.faiss_index = faiss_index
        self.factory = factory
        self.paths = paths
        self.labels = labels
        self.info = dict(info or {})  # its own: the flags recorded below are this index's
        if "labelled" not in self.info:  # given rows (an id map written before the flag was kept)
            self.info["labelled"] = any(label != UNLABELLED for label in labels)
        self._exact_vectors: torch.Tensor | None = None

    @property
    def exact(self) -> bool:
        return self.factory == EXACT_FACTORY

    @property
    def dim(self) -> int:
        return self.faiss_index.d

    def __len__(self) -> int:
        return self.faiss_index.ntotal

    @property
    def root(self) -> str:
        """The deepest folder holding every indexed image ("" when the paths share none)."""
        return common_folder(self.paths)

    @property
    def labelled(self) -> bool:
        """Whether any image has a label, recorded in ``info`` as images are added and saved with it."""
        return self.info["labelled"]

    def close(self) -> None:
        """Nothing to release: a FAISS index lives in this process's memory."""

    @classmethod
    def build(cls, features: torch.Tensor, paths: Sequence[str] | None = None, labels: Sequence[str] | None = None,
              factory: str = EXACT_FACTORY, info: dict | None = None, train_size: int | None = None) -> Index:
        """An index over ``features`` (``[N, ensemble, meta]`` or flattened ``[N, D]``).

        Approximate factories are trained on the features (on a random ``train_size`` of them when given).
        """
        vectors = check_finite(as_vectors(features), "the embeddings to index", NON_FINITE_FIX)
        index = _new_faiss_index(vectors.shape[1], factory)
        if not index.is_trained:
            sample = vectors
            if train_size is not None and train_size < len(vectors):
                sample = vectors[torch.randperm(len(vectors), generator=torch.Generator().manual_seed(0))[:train_size]]
            try:
                index.train(sample.numpy())
            except RuntimeError as exc:
                raise ReirError(f"cannot train {factory!r} on {len(sample)} vectors ({_faiss_message(exc)}); "
                                "use fewer IVF lists, a smaller PQ, or Flat for small collections") from None
        built = cls(index, factory, [], [], info)
        built.add(vectors, paths, labels)
        return built

    @classmethod
    def from_database(cls, database, splits: Sequence[str] | None = None, factory: str = EXACT_FACTORY,
                      train_size: int | None = None) -> Index:
        """An index over a database's splits (default: every split but train, else train).

        A sharded database is added shard by shard when the index needs no training (Flat, HNSW);
        a trained one (IVF, PQ) is trained on all the vectors, so they are gathered first.
        """
        chosen, info, chunks = database_chunks(database, splits)
        first = next(chunks, None)
        if first is None:
            raise ReirError(f"the splits {', '.join(chosen)} hold no images; embed some first")
        dim = math.prod(first[1].shape[1:])
        chunks = itertools.chain([first], chunks)
        if not _new_faiss_index(dim, factory).is_trained:
            gathered = list(chunks)
            return cls.build(torch.cat([c[1] for c in gathered]), [p for c in gathered for p in c[2]],
                             [label for c in gathered for label in c[3]], factory, info, train_size)
        index = cls(_new_faiss_index(dim, factory), factory, [], [], info)
        for _, features, paths, labels in chunks:
            index.add(features, paths, labels)
        return index

    def add(self, features: torch.Tensor, paths: Sequence[str] | None = None,
            labels: Sequence[str] | None = None) -> None:
        vectors = check_finite(as_vectors(features), "the embeddings to index", NON_FINITE_FIX)
        if len(self) and vectors.shape[1] != self.dim:
            raise ReirError(f"vectors of dimension {vectors.shape[1]} cannot join an index of dimension {self.dim}; "
                            "embed with the same model")
        paths = list(paths) if paths is not None else [""] * len(vectors)
        labels = list(labels) if labels is not None else [UNLABELLED] * len(vectors)
        if len(paths) != len(vectors) or len(labels) != len(vectors):
            raise ReirError(f"{len(vectors)} vectors but {len(paths)} paths and {len(labels)} labels; give one each")
        self.faiss_index.add(vectors.numpy())
        self.paths += [str(p) for p in paths]
        self.labels += [str(label) for label in labels]
        self.info["labelled"] = self.info["labelled"] or any(str(label) != UNLABELLED for label in labels)
        self._exact_vectors = None

    def tune(self, **parameters) -> None:
        """Search-time FAISS parameters of approximate indexes, e.g. ``nprobe=16`` or ``efSearch=128``."""
        space = _faiss().ParameterSpace()
        for name, value in parameters.items():
            try:
                space.set_index_parameter(self.faiss_index, name, value)
            except RuntimeError as exc:
                raise UsageError(f"{self.factory} has no search parameter {name} ({_faiss_message(exc)})") from None

    def search(self, queries: torch.Tensor, k: int = 10) -> Results:
        """The top ``k`` per query, best first, with this index's labels; ids ``-1`` pad rows an approximate
        index could not fill. Unpacks as ``scores, ids``, each ``[Q, k]``."""
        queries = as_vectors(queries)
        k = check_k(k)
        if queries.shape[1] != self.dim:
            raise ReirError(f"queries have dimension {queries.shape[1]} but the index {self.dim}; "
                            "embed with the model the index was built for")
        if self.exact:
            scores, ids = knn(queries, self.vectors(), k)
        else:
            scores, ids = self.faiss_index.search(queries.numpy(), min(k, len(self)))
            scores, ids = torch.from_numpy(scores), torch.from_numpy(ids).long()
        return Results(scores, ids, len(self), gallery_labels=self.labels)

    def vectors(self) -> torch.Tensor:
        """The stored vectors of an exact index, ``[N, D]`` (shared with FAISS, not copied)."""
        if not self.exact:
            raise ReirError(f"a {self.factory} index does not keep exact vectors; build a Flat index")
        if self._exact_vectors is None:
            faiss = _faiss()
            flat = faiss.downcast_index(self.faiss_index)
            array = faiss.rev_swig_ptr(flat.get_xb(), len(self) * self.dim) if len(self) else []
            self._exact_vectors = torch.as_tensor(array, dtype=torch.float32).reshape(len(self), self.dim)
        return self._exact_vectors

    def check_stored_vectors(self, path) -> None:
        """Refuses an index whose stored vectors hold NaN or infinities (where it keeps them as floats)."""
        if self.exact:
            check_finite(self.vectors(), f"index {path}", NON_FINITE_FIX)
            return
        for start in range(0, len(self), 65536):
            try:
                # torch.as_tensor: faiss returns a tensor instead once faiss.contrib.torch_utils has been imported
                rows = self.faiss_index.reconstruct_n(start, min(65536, len(self) - start))
            except RuntimeError:
                return  # an index that cannot give its vectors back (IVF without a direct map) is checked when built
            check_finite(torch.as_tensor(rows), f"index {path}", NON_FINITE_FIX)

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """FAISS's own file at ``path`` and the id map (paths, labels, factory) at ``<path>.ids.json``.

        The two files are one artifact, and the id map is its commit record: it names the SHA-256 and
        size of the index bytes it belongs to. The new index is first written whole to a hidden
        sibling (:func:`pending_path`), then the id map replaces the old one (the commit), then the
        index file replaces the old one. A crash or a full disk before the commit leaves the old pair;
        after it, :meth:`load` finds the new bytes in the sibling until the last rename is done. So an
        interrupted save leaves the old index or the new one, never new vectors beside old paths.
        """
        faiss = _faiss()
        path = Path(path)
        data = faiss.serialize_index(self.faiss_index).tobytes()
        pending = pending_path(path)
        _finish_committed_save(path)
        atomic_write(pending, data)
        id_map = {"format": INDEX_FORMAT, "factory": self.factory, "dim": self.dim, "count": len(self),
                  "index_sha256": hashlib.sha256(data).hexdigest(), "index_bytes": len(data),
                  "metric": "inner product of flattened scaled embeddings (mean per-branch cosine)",
                  "info": self.info, "paths": self.paths, "labels": self.labels}
        ids_path = id_map_path(path)
        try:
            atomic_write(ids_path, json.dumps(id_map, separators=(",", ":")))
        except BaseException:
            if _recorded_digest(path) != id_map["index_sha256"]:  # not committed: the pending bytes are nobody's
                pending.unlink(missing_ok=True)
            raise
        replace(pending, path)
        return path, ids_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Index:
        faiss = _faiss()
        path = Path(path)
        id_map = read_json(id_map_path(path), "index id map")
        if not isinstance(id_map, dict) or id_map.get("format") != INDEX_FORMAT:
            raise ReirError(f"{id_map_path(path)} is not a REIR index id map; rebuild it with reir index")
        with file_structure(id_map_path(path), "index id map", "rebuild it with reir index"):
            check_text_list(id_map["labels"], "labels", len(check_text_list(id_map["paths"], "paths")))
            info = id_map.get("info", {})
            if not isinstance(id_map["factory"], str) or not isinstance(info, dict) \
                    or not isinstance(info.get("search_parameters", {}), dict) \
                    or not isinstance(info.get("labelled", False), bool):
                raise TypeError("factory, info, its search_parameters or labelled is of the wrong kind")
        if not path.is_file():
            raise ReirError(f"index {path} does not exist; build it with reir index")
        data = _index_bytes(path, id_map)
        with file_structure(id_map_path(path), "index id map", "rebuild it with reir index"):
            check_faiss_layout(data, int(id_map["dim"]), len(id_map["paths"]), path)
        try:
            index = faiss.deserialize_index(_numpy_bytes(data))
        except RuntimeError as exc:
            raise ReirError(f"index {path} is not a FAISS index ({_faiss_message(exc)}); "
                            "rebuild it with reir index") from None
        if index.ntotal != len(id_map["paths"]) or index.ntotal != len(id_map["labels"]):
            raise ReirError(f"index {path} holds {index.ntotal} vectors but its id map {len(id_map['paths'])}; "
                            "rebuild both with reir index")
        loaded = cls(index, id_map["factory"], id_map["paths"], id_map["labels"], info)
        loaded.check_stored_vectors(path)
        with file_structure(id_map_path(path), "index id map", "rebuild it with reir index"):
            loaded.tune(**info.get("search_parameters", {}))
        return loaded


def _recorded_digest(path: Path) -> str | None:
    """The index checksum the id map on disk records (``None`` when there is none to read)."""
    try:
        id_map = json.loads(id_map_path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return id_map.get("index_sha256") if isinstance(id_map, dict) else None


def _finish_committed_save(path: Path) -> None:
    """Do the last rename of an earlier save that stopped after its commit, before a new save reuses its pending
    file."""
    pending = pending_path(path)
    if pending.is_file() and _recorded_digest(path) == file_sha256(pending):
        replace(pending, path)


def _index_bytes(path: Path, id_map: dict) -> bytes:
    """The index bytes the id map belongs to: the index file's, or a save's pending ones after its commit.

    An id map written before maps recorded their index's checksum is matched by count alone.
    """
    digest, size = id_map.get("index_sha256"), id_map.get("index_bytes")
    if digest is None:
        return path.read_bytes()
    for candidate in (path, pending_path(path)):
        if candidate.is_file() and candidate.stat().st_size == size:
            data = candidate.read_bytes()
            if hashlib.sha256(data).hexdigest() == digest:
                return data
    raise ReirError(f"index {path} is not the one its id map {id_map_path(path)} belongs to (another "
                    "checksum); rebuild both with reir index")


def _new_faiss_index(dim: int, factory: str):
    faiss = _faiss()
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise UsageError(f"`factory` {factory!r} is not a FAISS factory string ({_faiss_message(exc)}); "
                         "try Flat, HNSW32, IVF1024,Flat or IVF4096,PQ48") from None


def id_map_path(index_path: str | os.PathLike) -> Path:
    return Path(f"{index_path}.ids.json")


def pending_path(index_path: str | os.PathLike) -> Path:
    """Where a save keeps the new index bytes until its last rename (see :meth:`Index.save`)."""
    index_path = Path(index_path)
    return index_path.with_name(f".{index_path.name}.pending")


def _numpy_bytes(data: bytes):
    import numpy as np

    return np.frombuffer(data, dtype=np.uint8)


def _faiss_message(exc: Exception) -> str:
    """FAISS errors carry a C++ location; keep the sentence that names the problem."""
    text = str(exc).strip()
    found = re.search(r"\.cpp:\d+: (?:Error: )?(.*)", text)
    return (found.group(1) if found else text.splitlines()[-1] if text else type(exc).__name__).strip()
