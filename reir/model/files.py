"""The model file format in one place: what training, conversion, the commands and the service read and write.

A model file is a safetensors file whose metadata holds ``format`` (:data:`MODEL_FORMAT`), the
training run's configuration, the network's :class:`~reir.model.network.ModelConfig` and the
preprocessing (image size, mean, std), so it embeds images with nothing else beside it.
Nothing is unpickled.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from reir.data.images import build_transform
from reir.errors import ReirError
from reir.fileio import load_tensors, save_tensors
from reir.model.network import ModelConfig, REIRNet, create_model
from reir.validation import check_device, check_recorded_fields, file_structure

MODEL_FORMAT = "reir-model/1"


@dataclass
class Model:
    """A trained network and the preprocessing its training used (resize, normalisation)."""

    network: REIRNet
    image_size: int
    mean: list[float]
    std: list[float]
    run_config: dict = field(default_factory=dict)  # the training run's settings (the network's own: network.config)
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
        return build_transform(self.image_size, self.mean, self.std, False)

    def to(self, device: torch.device | str) -> Model:
        self.network.to(device)
        return self

    def file(self) -> Path:
        """The file the model was loaded from, which databases and exports record; a model built in memory has none."""
        if self.path is None:
            raise ReirError("this model was not loaded from a file; save it and load it with reir.load_model")
        return self.path


def save_model(path: str | os.PathLike, state: dict[str, torch.Tensor], model: ModelConfig, run_config: dict,
               info: dict) -> Path:
    """Write a model file atomically: the weights, the network's configuration, the run's and ``info``
    (``image_size``, ``mean``, ``std`` and whatever the writer records of where the weights came from)."""
    return save_tensors(path, state, {"format": MODEL_FORMAT, "config": run_config, "model": asdict(model),
                                      "info": info})


def model_candidates(recorded: str, database_path: str | os.PathLike) -> list[Path]:
    """Where a database's recorded model file may be: as recorded, or in ``epochs/`` beside the database's
    folder when the whole output folder was moved."""
    return [Path(recorded), Path(database_path).resolve().parent.parent / "epochs" / Path(recorded).name]


def find_model(recorded: str, database_path: str | os.PathLike) -> Path | None:
    """The first of :func:`model_candidates` that exists, or ``None``."""
    return next((candidate for candidate in model_candidates(recorded, database_path) if candidate.is_file()), None)


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
        check_shapes_before_building(config, state, path)
        network = create_model(config, weights="none")
    try:
        network.load_state_dict(state)
    except RuntimeError:
        raise ReirError(f"model file {path} does not match its recorded configuration; retrain with train.py") from None
    network.eval().to(device)
    return Model(network, image_size, mean, std, meta.get("config", {}), Path(path))


def check_shapes_before_building(config: ModelConfig, state: dict[str, torch.Tensor], path) -> None:
    """The network the recorded configuration describes, built on the meta device (no memory), against the
    tensors the file holds: a configuration claiming more than the file carries (``meta_class_size`` 2**20,
    ``projection`` 10**12) is refused before a single parameter is allocated."""
    with torch.device("meta"):
        skeleton = create_model(config, weights="none")
    expected = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    held = {name: tuple(tensor.shape) for name, tensor in state.items()}
    if expected != held:
        differing = sorted(set(expected) ^ set(held)) or sorted(n for n in expected if expected[n] != held[n])
        name = differing[0]
        raise ReirError(f"model file {path} does not match its recorded configuration ({name}: recorded "
                        f"{expected.get(name, 'absent')}, stored {held.get(name, 'absent')}); retrain with train.py")


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
