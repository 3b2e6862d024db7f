"""The Python API: a trained model file to embeddings, an index, search results and metrics.

Four names are exported from the package, so a library user needs no CLI and no database::

    import reir
    model = reir.load_model("epochs/<name>_model.safetensors")
    features = reir.embed(model, "my_photos/")          # [N, ensemble, meta]
    index = reir.Index.build(features, paths=...)        # exact inner product ("Flat")
    scores, ids = index.search(reir.embed(model, ["query.jpg"]), k=10)
    reir.evaluate(features, labels)                      # Recall@K, MAP@R, ...

Every ``reir`` command that embeds, indexes or searches calls these, so the CLI and the
library share one code path; ``embed`` is :func:`reir.model.embedding.embed`, the one path from
images to embeddings that training's evaluation takes too. Exact search ranks through :func:`reir.retrieval.similarity.knn`, the same
ranking evaluation uses; other FAISS factory strings give approximate indexes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from reir.errors import ReirError
from reir.fileio import load_tensors
from reir.model.embedding import Model, embed  # noqa: F401 - re-exported: reir.embed, reir.Model
from reir.retrieval.evaluation import evaluate  # noqa: F401 - re-exported: reir.evaluate
from reir.model.network import ModelConfig, create_model
from reir.validation import check_device, check_recorded_fields, file_structure

MODEL_FORMAT = "reir-model/1"


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
