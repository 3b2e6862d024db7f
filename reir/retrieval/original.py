"""The original REIR's feature databases (``results/<name>_data_base.pth``) as REIR databases.

The original saved a dict with ``train_``, ``test_`` and (In-shop) ``gallery_`` + ``images`` (paths),
``labels`` and ``features`` (``[N, ensemble, meta]``, each branch L2-normalised). Every split it
saved is kept; with a gallery, its test split is the query split, as REIR names it. Nothing else
may be in the dict.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from reir.data.registry import BENCHMARKS
from reir.errors import ReirError, UsageError
from reir.model.original import converted_name, load_original, original_settings
from reir.retrieval.database import Database, resolve_database_path

log = logging.getLogger(__name__)

ORIGINAL_SPLITS = ("train", "test", "gallery")
FIELDS = ("images", "labels", "features")
NORM_TOLERANCE = 1e-3  # per-branch norms the original's L2 normalisation leaves, stored in fp32 or fp16
USUAL_RECALLS = [1, 2, 4, 8]


def is_original_database(content: Any) -> bool:
    return isinstance(content, dict) and any(isinstance(k, str) and k.endswith("_features") for k in content)


def convert_database(content: Any, path: str | Path, data_path: str | Path | None = None,
                     overrides: dict | None = None, normalisation: str = "dataset") -> Database:
    """A REIR :class:`Database` from the original's dict (already loaded with ``load_original``).

    Relative image paths are taken from ``data_path``, by default the folder the original ran in
    (the one holding its ``results/``): its paths start with its own ``data/`` folder.
    """
    path = Path(path)
    data_path = path.resolve().parent.parent if data_path is None else data_path
    expected = {f"{split}_{field}" for split in ORIGINAL_SPLITS for field in FIELDS}
    unknown = sorted(str(k) for k in content if k not in expected)
    if unknown:
        raise ReirError(f"{path} holds the unknown key {unknown[0]!r}; refused, nothing written "
                        f"(the original's database has only {{train,test,gallery}}_{{images,labels,features}})")
    saved = [s for s in ORIGINAL_SPLITS if any(f"{s}_{f}" in content for f in FIELDS)]
    if "test" not in saved:
        raise ReirError(f"{path} has no test split (test_features); pass a database the original saved")
    settings = original_settings(path, overrides or {}, normalisation)
    renamed = {"test": "query"} if "gallery" in saved else {}
    features, splits = {}, {}
    for split in saved:
        split_features, paths, labels = _split(content, split, path)
        _check_shape(split_features, settings, path, split)
        name = renamed.get(split, split)
        features[name] = split_features
        splits[name] = {"paths": [_absolute(p, data_path) for p in paths], "labels": labels}
    stem = path.name.removesuffix(".pth").removesuffix("_data_base")
    config = {k: v for k, v in settings.items() if k not in ("mean", "std")}
    data_name = settings.get("data_name")
    config.update(save_name=stem, recalls=list(BENCHMARKS[data_name].recalls) if data_name in BENCHMARKS
                  else USUAL_RECALLS)
    model_file = path.resolve().parent.parent / "epochs" / f"{stem}_model.safetensors"
    info = {key: settings.get(key) for key in ("data_name", "crop_type", "mean", "std", "image_size")}
    info.update(model_file=str(model_file), converted_from=str(path.resolve()))
    return Database(features, splits, config, info)


def _split(content: dict, split: str, path: Path) -> tuple[torch.Tensor, list[str], list[str]]:
    missing = [f"{split}_{f}" for f in FIELDS if f"{split}_{f}" not in content]
    if missing:
        raise ReirError(f"{path} lacks {missing[0]}; pass a complete database the original saved")
    paths, labels, features = (content[f"{split}_{f}"] for f in FIELDS)
    if not isinstance(features, torch.Tensor) or features.dim() != 3 or not features.is_floating_point():
        raise ReirError(f"{path}: {split}_features is not a float tensor [N, ensemble, meta]; refused")
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, str) for p in paths):
        raise ReirError(f"{path}: {split}_images is not a list of image paths; refused")
    if not isinstance(labels, (list, tuple)) or not all(isinstance(label, (str, int)) and not isinstance(label, bool)
                                                        for label in labels):
        raise ReirError(f"{path}: {split}_labels is not a list of class labels (strings or integers); refused")
    if not len(paths) == len(labels) == len(features):
        raise ReirError(f"{path}: the {split} split has {len(features)} features, {len(paths)} images and "
                        f"{len(labels)} labels; pass a complete database the original saved")
    norms = features.float().norm(dim=-1)
    if len(norms) and (norms - 1).abs().max() > NORM_TOLERANCE:
        raise ReirError(f"{path}: {split}_features are not L2-normalised per branch (a norm of "
                        f"{norms.flatten()[(norms - 1).abs().argmax()].item():.4f}); pass the original's database")
    return features.detach().float().contiguous(), list(paths), [str(label) for label in labels]


def _check_shape(features: torch.Tensor, settings: dict, path: Path, split: str) -> None:
    """The features' ``[ensemble, meta]`` must be what the file name (or the flags) say, and one per split."""
    shape = tuple(features.shape[1:])
    for key, value in zip(("ensemble_size", "meta_class_size"), shape):
        if settings.setdefault(key, value) != value:
            raise UsageError(f"{path}: {split}_features are {list(shape)} per image but the name or flags say "
                             f"{key} {settings[key]}; drop the flag or pass `{key}` {value}")


def _absolute(image: str, data_path: str | Path) -> str:
    """An image path as the original stored it, made absolute against the folder it ran in."""
    return os.path.normpath(image if os.path.isabs(image) else os.path.join(os.path.abspath(data_path), image))


def find_or_convert_database(name: str, output_dir: str | Path = ".") -> Path:
    """A ``data_base`` setting as a REIR database path: ours when there is one, else the original's
    ``.pth`` converted beside itself on the fly (with a note). Other names resolve as usual."""
    if name.endswith(".pth"):
        given = Path(name)
        originals = [given, Path(output_dir) / "results" / name]
        for original in originals:
            if converted_name(original).is_file():
                return converted_name(original)
        for original in originals:
            if original.is_file():
                target = converted_name(original)
                convert_database(load_original(original), original).save(target)
                log.info("note: converted the original's database %s to %s (reir convert does this explicitly)",
                         original, target)
                return target
    return resolve_database_path(name, output_dir)

