"""The Python API: a trained model file to embeddings, an index, search results and metrics.

Four names are exported from the package, so a library user needs no CLI and no database::

    import reir
    model = reir.load_model("epochs/<name>_model.safetensors")
    features = reir.embed(model, "my_photos/")          # [N, ensemble, meta]
    index = reir.Index.build(features, paths=...)        # exact inner product ("Flat")
    scores, ids = index.search(reir.embed(model, ["query.jpg"]), k=10)
    reir.evaluate(features, labels)                      # Recall@K, MAP@R, ...

Every ``reir`` command that embeds, indexes or searches calls these, so the CLI and the
library share one code path. Exact search ranks through :func:`reir.knn.knn`, the same
ranking evaluation uses; other FAISS factory strings give approximate indexes.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .errors import ReirError
from .fileio import atomic_write, load_tensors, read_json
from .model import ModelConfig, REIRNet, create_model, embedding_from_logits
from .knn import flatten, knn

MODEL_FORMAT = "reir-model/1"
INDEX_FORMAT = "reir-index/1"
EXACT_FACTORY = "Flat"
UNLABELLED = ""  # the label of an image whose class is unknown


@dataclass
class Model:
    """A trained network and the preprocessing its training used (resize, normalisation)."""

    network: REIRNet
    image_size: int
    mean: list[float]
    std: list[float]
    config: dict = field(default_factory=dict)  # the training run's configuration
    path: Path | None = None

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def embedding_shape(self) -> tuple[int, int]:
        """``(ensemble, meta)``: the shape of one image's embedding."""
        return self.network.config.ensemble_size, self.network.config.meta_class_size

    @property
    def transform(self):
        from .data.images import build_transform

        return build_transform(self.image_size, self.mean, self.std, False)

    def to(self, device: torch.device | str) -> "Model":
        self.network.to(device)
        return self


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> Model:
    """A model file written by training (``epochs/<name>_model.safetensors``), ready to embed.

    The file carries its own configuration, normalisation and image size, so no database
    or dataset is needed. Nothing is unpickled.
    """
    state, meta = load_tensors(path, "model file")
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT or "model" not in meta:
        raise ReirError(f"model file {path} is not a REIR model; pass an epochs/*_model.safetensors file "
                        "written by train.py")
    info = meta.get("info", {})
    missing = [key for key in ("image_size", "mean", "std") if key not in info]
    if missing:
        raise ReirError(f"model file {path} lacks {', '.join(missing)}; retrain with the current train.py")
    network = create_model(ModelConfig(**meta["model"]), weights="none")
    try:
        network.load_state_dict(state)
    except RuntimeError:
        raise ReirError(f"model file {path} does not match its recorded configuration; retrain with train.py") from None
    network.eval().to(device)
    return Model(network, int(info["image_size"]), list(info["mean"]), list(info["std"]),
                 meta.get("config", {}), Path(path))


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image file below ``folder`` (by extension), hidden ones left out, in sorted order."""
    folder = Path(folder)
    extensions = {e.lower() for e in Image.registered_extensions()}
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if path.suffix.lower() in extensions:
            found.append(path)
    return found


def read_image(path: str | os.PathLike) -> Image.Image:
    """An image file as RGB; a file that is missing, not an image, truncated or absurdly large is a ReirError."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ReirError(f"image {path} does not exist") from None
    except Image.DecompressionBombError:
        raise ReirError(f"image {path} has too many pixels to decode safely") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ReirError(f"image {path} cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


class ImageItems(Dataset):
    """Paths or PIL images -> ``(tensor, error)``; an unreadable file gives a blank tensor and its error."""

    def __init__(self, items: Sequence, transform, image_size: int):
        self.items = items
        self.transform = transform
        self.blank = torch.zeros(3, image_size, image_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int):
        item = self.items[position]
        if isinstance(item, Image.Image):
            return self.transform(item.convert("RGB")), ""
        try:
            return self.transform(read_image(item)), ""
        except ReirError as exc:
            return self.blank, str(exc)


@torch.no_grad()
def embed_batch(model: Model, images: torch.Tensor) -> torch.Tensor:
    """``[batch, 3, S, S]`` normalised images -> ``[batch, ensemble, meta]`` embeddings on the CPU."""
    model.network.eval()
    return embedding_from_logits(model.network(images.to(model.device, non_blocking=True))).cpu()


def embed_items(model: Model, items: Sequence, batch_size: int = 64, num_workers: int = 0,
                progress=None) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """Embeddings of the readable items, in order, and ``(position, error)`` of the unreadable ones.

    ``progress`` (a tqdm bar or anything with ``update(n)``) is advanced by each batch's size.
    """
    loader = DataLoader(ImageItems(items, model.transform, model.image_size), batch_size=batch_size,
                        num_workers=num_workers, shuffle=False, collate_fn=_collate_items,
                        pin_memory=model.device.type == "cuda")
    chunks, failures, start = [], [], 0
    for images, errors in loader:
        good = [i for i, error in enumerate(errors) if not error]
        failures += [(start + i, error) for i, error in enumerate(errors) if error]
        if good:
            chunks.append(embed_batch(model, images[good] if len(good) < len(errors) else images))
        start += len(errors)
        if progress is not None:
            progress.update(len(errors))
    ensemble, meta = model.embedding_shape
    return (torch.cat(chunks) if chunks else torch.empty(0, ensemble, meta)), failures


def _collate_items(batch):
    return torch.stack([image for image, _ in batch]), [error for _, error in batch]


def embed(model: Model, images, batch_size: int = 64, num_workers: int = 0, progress: bool = False) -> torch.Tensor:
    """Embeddings ``[N, ensemble, meta]`` (every branch L2-normalised) of ``images``.

    ``images`` is a folder (every image below it, sorted by path), one image path, a list of
    paths and/or PIL images, or a DataLoader whose batches are image tensors (or tuples whose
    first element is one) already transformed like ``model.transform``. An unreadable image is
    an error naming it; ``reir embed`` instead skips and lists such files.
    """
    if isinstance(images, DataLoader):
        return torch.cat([embed_batch(model, batch[0] if isinstance(batch, (tuple, list)) else batch)
                          for batch in images])
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if path.is_dir():
            images = image_files(path)
            if not images:
                raise ReirError(f"folder {path} holds no image files")
        else:
            images = [path]
    elif isinstance(images, Image.Image):
        images = [images]
    items = list(images)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), unit="img", desc="Embed", file=sys.stderr, dynamic_ncols=True)
    try:
        features, failures = embed_items(model, items, batch_size, num_workers, bar)
    finally:
        if bar is not None:
            bar.close()
    if failures:
        raise ReirError(f"{failures[0][1]}; remove it (reir embed skips and lists unreadable images)")
    return features


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ReirError("indexes need faiss-cpu; pip install faiss-cpu") from None
    return faiss


class Index:
    """Database images searchable by REIR's similarity, the mean per-branch cosine.

    Vectors are the flattened, scaled embeddings (:func:`reir.knn.flatten`), whose inner
    product is exactly that similarity. ``factory="Flat"`` is exact and ranks through
    :func:`reir.knn.knn` (the ranking evaluation uses, ties to the lower id); any other
    FAISS factory string (``HNSW32``, ``IVF1024,Flat``, ``IVF4096,PQ48`` ...) is an
    approximate inner-product index, trained on the vectors it is built from.
    Ids are positions ``0 .. len-1``; ``paths`` and ``labels`` describe them.
    """

    def __init__(self, faiss_index, factory: str, paths: list[str], labels: list[str], info: dict | None = None):
        self.faiss_index = faiss_index
        self.factory = factory
        self.paths = paths
        self.labels = labels
        self.info = info or {}
        self._exact_vectors: torch.Tensor | None = None

    @property
    def exact(self) -> bool:
        return self.factory == EXACT_FACTORY

    @property
    def dim(self) -> int:
        return self.faiss_index.d

    def __len__(self) -> int:
        return self.faiss_index.ntotal

    @classmethod
    def build(cls, features: torch.Tensor, paths: Sequence[str] | None = None, labels: Sequence[str] | None = None,
              factory: str = EXACT_FACTORY, info: dict | None = None, train_size: int | None = None) -> "Index":
        """An index over ``features`` (``[N, ensemble, meta]`` or flattened ``[N, D]``).

        Approximate factories are trained on the features (on a random ``train_size`` of them when given).
        """
        faiss = _faiss()
        vectors = _as_vectors(features)
        try:
            index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ReirError(f"--factory {factory!r} is not a FAISS factory string ({_faiss_message(exc)}); "
                            "try Flat, HNSW32, IVF1024,Flat or IVF4096,PQ48", 2) from None
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
                      **build_options) -> "Index":
        """An index over a database's splits (default: every split but train, else train)."""
        from .database import Database, load_database

        db = database if isinstance(database, Database) else load_database(database)
        splits = list(splits or collection_splits(db))
        missing = [s for s in splits if s not in db.features]
        if missing:
            raise ReirError(f"database has no split {', '.join(missing)}; it has {', '.join(db.features)}")
        features = torch.cat([db.features[s] for s in splits])
        paths = [p for s in splits for p in db.paths(s)]
        labels = [l for s in splits for l in db.labels(s)]
        info = {"splits": splits, "model_file": db.info.get("model_file"),
                **({"database": str(database)} if not isinstance(database, Database) else {})}
        return cls.build(features, paths, labels, factory, info, **build_options)

    def add(self, features: torch.Tensor, paths: Sequence[str] | None = None,
            labels: Sequence[str] | None = None) -> None:
        vectors = _as_vectors(features)
        if len(self) and vectors.shape[1] != self.dim:
            raise ReirError(f"vectors of dimension {vectors.shape[1]} cannot join an index of dimension {self.dim}; "
                            "embed with the same model")
        paths = list(paths) if paths is not None else [""] * len(vectors)
        labels = list(labels) if labels is not None else [UNLABELLED] * len(vectors)
        if len(paths) != len(vectors) or len(labels) != len(vectors):
            raise ReirError(f"{len(vectors)} vectors but {len(paths)} paths and {len(labels)} labels; give one each")
        self.faiss_index.add(vectors.numpy())
        self.paths += [str(p) for p in paths]
        self.labels += [str(l) for l in labels]
        self._exact_vectors = None

    def tune(self, **parameters) -> None:
        """Search-time FAISS parameters of approximate indexes, e.g. ``nprobe=16`` or ``efSearch=128``."""
        space = _faiss().ParameterSpace()
        for name, value in parameters.items():
            try:
                space.set_index_parameter(self.faiss_index, name, value)
            except RuntimeError as exc:
                raise ReirError(f"{self.factory} has no search parameter {name} ({_faiss_message(exc)})", 2) from None

    def search(self, queries: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, ids)``, each ``[Q, k]`` best first; ids ``-1`` pad rows an approximate index could not fill."""
        queries = _as_vectors(queries)
        if queries.shape[1] != self.dim:
            raise ReirError(f"queries have dimension {queries.shape[1]} but the index {self.dim}; "
                            "embed with the model the index was built for")
        if self.exact:
            return knn(queries, self.vectors(), k)
        scores, ids = self.faiss_index.search(queries.numpy(), min(k, len(self)))
        return torch.from_numpy(scores), torch.from_numpy(ids).long()

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

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """FAISS's own file at ``path`` and the id map (paths, labels, factory) at ``<path>.ids.json``."""
        faiss = _faiss()
        path = Path(path)
        atomic_write(path, faiss.serialize_index(self.faiss_index).tobytes())
        id_map = {"format": INDEX_FORMAT, "factory": self.factory, "dim": self.dim, "count": len(self),
                  "metric": "inner product of flattened scaled embeddings (mean per-branch cosine)",
                  "info": self.info, "paths": self.paths, "labels": self.labels}
        ids_path = id_map_path(path)
        atomic_write(ids_path, json.dumps(id_map, separators=(",", ":")))
        return path, ids_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Index":
        faiss = _faiss()
        path = Path(path)
        id_map = read_json(id_map_path(path), "index id map")
        if not isinstance(id_map, dict) or id_map.get("format") != INDEX_FORMAT:
            raise ReirError(f"{id_map_path(path)} is not a REIR index id map; rebuild it with reir index")
        if not path.is_file():
            raise ReirError(f"index {path} does not exist; build it with reir index")
        try:
            index = faiss.deserialize_index(_numpy_bytes(path.read_bytes()))
        except RuntimeError as exc:
            raise ReirError(f"index {path} is not a FAISS index ({_faiss_message(exc)}); rebuild it with reir index") from None
        if index.ntotal != len(id_map["paths"]) or index.ntotal != len(id_map["labels"]):
            raise ReirError(f"index {path} holds {index.ntotal} vectors but its id map {len(id_map['paths'])}; "
                            "rebuild both with reir index")
        loaded = cls(index, id_map["factory"], id_map["paths"], id_map["labels"], id_map.get("info", {}))
        loaded.tune(**loaded.info.get("search_parameters", {}))
        return loaded


def id_map_path(index_path: str | os.PathLike) -> Path:
    return Path(f"{index_path}.ids.json")


def collection_splits(database) -> list[str]:
    """The splits that form the searchable collection: all but train, or train when it is alone."""
    searchable = [s for s in database.features if s != "train"]
    return searchable or list(database.features)


def _as_vectors(features) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        features = torch.as_tensor(features)
    if features.dim() not in (2, 3):
        raise ReirError(f"embeddings must be [N, ensemble, meta] or [N, D], not {tuple(features.shape)}")
    return flatten(features.detach().float().cpu()).contiguous()


def _numpy_bytes(data: bytes):
    import numpy as np

    return np.frombuffer(data, dtype=np.uint8)


def _faiss_message(exc: Exception) -> str:
    """FAISS errors carry a C++ location; keep the sentence that names the problem."""
    text = str(exc).strip()
    found = re.search(r"\.cpp:\d+: (?:Error: )?(.*)", text)
    return (found.group(1) if found else text.splitlines()[-1] if text else type(exc).__name__).strip()


def evaluate(features, labels: Sequence | torch.Tensor | None = None, *, recalls: Iterable[int] = (1, 2, 4, 8),
             gallery: torch.Tensor | None = None, gallery_labels: Sequence | torch.Tensor | None = None,
             with_nmi: bool = True, device: torch.device | str | None = None
             ) -> dict[str, float | None]:
    """Recall@K, precision@1, R-precision, MAP@R and NMI (``None`` when skipped), exact.

    ``features`` with ``labels``: every image queries the others (itself excluded), or the
    ``gallery`` when one is given. ``features`` may instead be a database (or its path):
    its test split against itself, or query against gallery, as ``reir eval`` does.
    """
    from .database import Database, load_database
    from .metrics import evaluate_embeddings

    if isinstance(features, (str, os.PathLike, Database)):
        db = features if isinstance(features, Database) else load_database(features)
        splits = db.eval_splits
        missing = [s for s in splits if s not in db.features]
        if missing:
            raise ReirError(f"database has no {', '.join(missing)} features; regenerate it with train.py")
        unlabelled = [s for s in splits if UNLABELLED in db.labels(s)]
        if unlabelled:
            raise ReirError(f"the {unlabelled[0]} split has images without a label; metrics need every label")
        ids = db.label_ids(*splits)
        features, labels = db.features[splits[0]], ids[0]
        if len(splits) == 2:
            gallery, gallery_labels = db.features[splits[1]], ids[1]
    elif labels is None:
        raise ReirError("evaluate needs labels for the features (or pass a database)")
    else:
        labels, gallery_labels = _label_ids(labels, gallery_labels)
    if device is not None:
        device = torch.device(device)
    return evaluate_embeddings(features, labels, sorted(set(recalls)), gallery, gallery_labels,
                               with_nmi=with_nmi, device=device)


def _label_ids(labels, gallery_labels):
    """Class names (or ids) of queries and gallery as integers on one shared vocabulary."""
    groups = [labels] + ([gallery_labels] if gallery_labels is not None else [])
    if all(isinstance(g, torch.Tensor) for g in groups):
        return labels, gallery_labels
    from .database import shared_label_ids

    ids = shared_label_ids(*([str(l) for l in (g.tolist() if isinstance(g, torch.Tensor) else g)] for g in groups))
    return ids[0], (ids[1] if len(ids) > 1 else None)
