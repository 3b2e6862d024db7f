"""The Python API: a trained model file to embeddings, an index, search results and metrics.

Four names are exported from the package, so a library user needs no CLI and no database::

    import reir
    model = reir.load_model("epochs/<name>_model.safetensors")
    features = reir.embed(model, "my_photos/")          # [N, ensemble, meta]
    index = reir.Index.build(features, paths=...)        # exact inner product ("Flat")
    scores, ids = index.search(reir.embed(model, ["query.jpg"]), k=10)
    reir.evaluate(features, labels)                      # Recall@K, MAP@R, ...

Every ``reir`` command that embeds, indexes or searches calls these, so the CLI and the
library share one code path. Exact search ranks through :func:`reir.retrieval.similarity.knn`, the same
ranking evaluation uses; other FAISS factory strings give approximate indexes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from reir.errors import ReirError
from reir.fileio import load_tensors
from reir.model.network import ModelConfig, REIRNet, create_model, embedding_from_logits
from reir.retrieval.database import UNLABELLED
from reir.validation import (as_features, check_device, check_k, check_labels, check_positive_ints,
                             check_recorded_fields, file_structure)

MODEL_FORMAT = "reir-model/1"


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
        from reir.data.images import build_transform

        return build_transform(self.image_size, self.mean, self.std, False)

    def to(self, device: torch.device | str) -> "Model":
        self.network.to(device)
        return self


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> Model:
    """A model file written by training (``epochs/<name>_model.safetensors``), ready to embed.

    The file carries its own configuration, normalisation and image size, so no database
    or dataset is needed. Nothing is unpickled.
    """
    device = check_device(device)
    with file_structure(path, "model file", "pass an epochs/*_model.safetensors file written by train.py"):
        state, meta = load_tensors(path, "model file")
        if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT or "model" not in meta:
            raise ReirError(f"model file {path} is not a REIR model; pass an epochs/*_model.safetensors file "
                            "written by train.py")
        info = meta.get("info", {})
        missing = [key for key in ("image_size", "mean", "std") if key not in info]
        if missing:
            raise ReirError(f"model file {path} lacks {', '.join(missing)}; retrain with the current train.py")
        image_size, mean, std = _preprocessing(info)
        config = ModelConfig(**check_recorded_fields(meta["model"], ModelConfig, "model"))
        branches = {key.split(".")[1] for key in state if key.startswith("branches.")}
        if config.ensemble_size != len(branches) or not 0 < config.meta_class_size <= 2**20:
            raise ValueError(f"{len(branches)} branches stored for ensemble_size {config.ensemble_size}")
        network = create_model(config, weights="none")
    try:
        network.load_state_dict(state)
    except RuntimeError:
        raise ReirError(f"model file {path} does not match its recorded configuration; retrain with train.py") from None
    network.eval().to(device)
    return Model(network, image_size, mean, std, meta.get("config", {}), Path(path))


def _preprocessing(info: dict) -> tuple[int, list[float], list[float]]:
    """Image size, mean and std as recorded; anything else is a damaged file."""
    size, mean, std = info["image_size"], info["mean"], info["std"]
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= 2**14:
        raise ValueError(f"image_size {size!r:.20}")
    for values in (mean, std):
        if not isinstance(values, list) or len(values) != 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e6 for v in values):
            raise ValueError(f"mean/std {values!r:.40}")
    if not all(v > 0 for v in std):
        raise ValueError(f"std {std!r:.40}")
    return size, [float(v) for v in mean], [float(v) for v in std]


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
    if not isinstance(model, Model):
        raise ReirError(f"model must be a reir.Model from reir.load_model, not {type(model).__name__}")
    batch_size = check_k(batch_size, "batch_size")
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
    elif isinstance(images, (bytes, torch.Tensor)) or not isinstance(images, Iterable):
        raise ReirError(f"images must be a folder, an image path, a list of paths or PIL images, or a DataLoader, "
                        f"not {type(images).__name__}")
    items = list(images)
    strange = [item for item in items if not isinstance(item, (str, os.PathLike, Image.Image))][:1]
    if strange:
        raise ReirError(f"images holds a {type(strange[0]).__name__}; give image paths or PIL images")
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


def evaluate(features, labels: Sequence | torch.Tensor | None = None, *, recalls: Iterable[int] = (1, 2, 4, 8),
             gallery: torch.Tensor | None = None, gallery_labels: Sequence | torch.Tensor | None = None,
             with_nmi: bool = True, device: torch.device | str | None = None
             ) -> dict[str, float | None]:
    """Recall@K, precision@1, R-precision, MAP@R and NMI (``None`` when skipped), exact.

    ``features`` with ``labels``: every image queries the others (itself excluded), or the
    ``gallery`` when one is given. ``features`` may instead be a database (or its path):
    its test split against itself, or query against gallery, as ``reir eval`` does.
    """
    from reir.retrieval.database import Database, load_database
    from reir.retrieval.metrics import evaluate_embeddings

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
        features = as_features(features, "features")
        labels = check_labels(labels, len(features), "labels", "features")
        if gallery is not None:
            gallery = as_features(gallery, "gallery")
            if gallery_labels is None:
                raise ReirError("evaluate was given a gallery but no gallery_labels; pass the gallery's labels "
                                "(metrics cannot score a gallery with the queries' labels)")
            gallery_labels = check_labels(gallery_labels, len(gallery), "gallery_labels", "gallery")
        elif gallery_labels is not None:
            raise ReirError("evaluate was given gallery_labels but no gallery; pass gallery= too, or neither")
        labels, gallery_labels = _label_ids(labels, gallery_labels)
    recalls = check_positive_ints(recalls, "recalls")
    if device is not None:
        device = check_device(device)
    return evaluate_embeddings(features, labels, sorted(set(recalls)), gallery, gallery_labels,
                               with_nmi=with_nmi, device=device)


def _label_ids(labels, gallery_labels):
    """Class names (or ids) of queries and gallery as integers on one shared vocabulary."""
    groups = [labels] + ([gallery_labels] if gallery_labels is not None else [])
    if all(isinstance(g, torch.Tensor) for g in groups):
        return labels, gallery_labels
    from reir.retrieval.database import shared_label_ids

    ids = shared_label_ids(*([str(l) for l in (g.tolist() if isinstance(g, torch.Tensor) else g)] for g in groups))
    return ids[0], (ids[1] if len(ids) > 1 else None)
