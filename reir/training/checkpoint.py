"""Checkpoints: what a run needs to continue exactly where it stopped, in one pickle-free file.

A checkpoint is one safetensors file (``<output_dir>/checkpoints/<save name>_checkpoint.safetensors``)
written atomically after every epoch, and mid-epoch when SIGINT/SIGTERM stops a run. Its
tensors are the model, the optimizer's tensors and torch's RNG state; its JSON metadata
holds everything else (epoch, step, statistics rows, best recall, meta labels, scheduler,
fp16 loss scale, python/numpy RNG states). Nothing is unpickled, so a checkpoint from someone
else cannot run code. Replaying the interrupted epoch is the data's job (:mod:`reir.data.sampling`).
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reir.errors import ReirError, UsageError
from reir.fileio import load_tensors, save_tensors
from reir.settings import MUST_MATCH, default_of
from reir.training.config import TrainConfig, resume_rule
from reir.training.rng import rng_state, set_rng_state

log = logging.getLogger(__name__)

FORMAT = "reir-checkpoint/1"
SUFFIX = "_checkpoint.safetensors"

def checkpoint_path(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / "checkpoints" / f"{name}{SUFFIX}"


# --- JSON + tensors: state dicts without pickle ------------------------------------------

def pack(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """A JSON-able copy of ``obj``; its tensors go to ``tensors`` under dotted keys, not copied.

    The file writer streams them from their own storage, so a checkpoint costs no second
    optimizer state.
    """
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach()
        return {"$tensor": key}
    if isinstance(obj, dict):
        kind = "$counter" if isinstance(obj, Counter) else "$dict"
        return {kind: [[pack(k, tensors, f"{key}.k{i}"), pack(v, tensors, f"{key}.{i}")]
                       for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"$tuple": [pack(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        ((kind, value),) = obj.items()
        if kind == "$tensor":
            return tensors[value]
        if kind == "$tuple":
            return tuple(unpack(v, tensors) for v in value)
        pairs = ((unpack(k, tensors), unpack(v, tensors)) for k, v in value)
        return Counter(dict(pairs)) if kind == "$counter" else dict(pairs)
    return obj


# --- the training state ------------------------------------------------------------------

@dataclass
class EpochProgress:
    """Where the current epoch is: batches done and the running sums of ``train_one_epoch``."""

    step: int = 0
    total_loss: float = 0.0
    total_correct: int = 0
    total_seen: int = 0

    def totals(self) -> tuple[float, int, int]:
        return self.total_loss, self.total_correct, self.total_seen

    def after_step(self, total_loss: float, total_correct: int, total_seen: int) -> None:
        self.step += 1
        self.total_loss, self.total_correct, self.total_seen = total_loss, total_correct, total_seen


@dataclass
class TrainingState:
    """What a run needs besides its flags to continue: saved after each epoch."""

    epoch: int = 0  # epochs completed
    rows: list[dict] = field(default_factory=list)
    best_recall: float = -1.0
    progress: EpochProgress = field(default_factory=EpochProgress)  # inside epoch ``epoch + 1``

    def epoch_done(self, epoch: int, best_recall: float) -> None:
        self.epoch, self.best_recall = epoch, best_recall
        self.progress = EpochProgress()


def save_checkpoint(path: Path, model, optimizer, scheduler, scaler, state: TrainingState,
                    meta_labels: torch.Tensor, classes: list[str], run_config: dict) -> Path:
    """``scaler`` is the fp16 ``GradScaler``: its loss scale is part of the run."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    p = state.progress
    metadata = {
        "format": FORMAT, "config": dict(run_config), "save_name": run_config["save_name"],
        "epoch": state.epoch, "rows": state.rows, "best_recall": state.best_recall,
        "progress": {"step": p.step, "total_loss": p.total_loss, "total_correct": p.total_correct,
                     "total_seen": p.total_seen},
        "classes": list(classes), "meta_labels": meta_labels.cpu().tolist(),
        "optimizer": pack(optimizer.state_dict(), tensors, "optimizer"),
        "scheduler": pack(scheduler.state_dict(), tensors, "scheduler"),
        "scaler": pack(scaler.state_dict(), tensors, "scaler"),
        "rng": pack(rng_state(), tensors, "rng"),
    }
    return save_tensors(path, tensors, metadata)


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict

    @property
    def seed(self) -> int:
        return self.meta["config"]["seed"]

    def meta_labels(self, classes: list[str]) -> np.ndarray:
        if self.meta["classes"] != list(classes):
            raise ReirError(f"checkpoint {self.path} was trained on other classes than {len(classes)} of this dataset; "
                            f"resume with the dataset it was trained on, or start without `resume`")
        return np.asarray(self.meta["meta_labels"], dtype=np.int64)

    def restore(self, model, optimizer, scheduler, scaler) -> TrainingState:
        """Load every state into the freshly built objects; the RNG last, as it was saved.

        The optimizer keeps the loaded tensors as its state; the rest are released, so a resumed
        run holds no second copy of the model.
        """
        state = {k[len("model."):]: v for k, v in self.tensors.items() if k.startswith("model.")}
        tensors = {k: v for k, v in self.tensors.items() if not k.startswith("model.")}
        self.tensors = {}
        try:
            model.load_state_dict(state)
            del state
            optimizer.load_state_dict(unpack(self.meta["optimizer"], tensors))
            scheduler.load_state_dict(unpack(self.meta["scheduler"], tensors))
            scaler_state = unpack(self.meta.get("scaler", {}), tensors)
            if scaler_state:  # empty when the run was not fp16 (the same --amp is enforced)
                scaler.load_state_dict(scaler_state)
            set_rng_state(unpack(self.meta["rng"], tensors))
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise ReirError(f"checkpoint {self.path} does not fit this model "
                            f"({str(exc).splitlines()[0][:120]}); resume with the flags it was written with") from None
        p = self.meta["progress"]
        return TrainingState(self.meta["epoch"], self.meta["rows"], self.meta["best_recall"],
                             EpochProgress(p["step"], p["total_loss"], p["total_correct"], p["total_seen"]))


def load_checkpoint(path: str | Path) -> Checkpoint:
    tensors, meta = load_tensors(path, "checkpoint")
    keys = ("config", "epoch", "rows", "best_recall", "progress", "classes", "meta_labels", "optimizer",
            "scheduler", "rng")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or any(k not in meta for k in keys):
        raise ReirError(f"checkpoint {path} is not a REIR training checkpoint; pass a *{SUFFIX} file "
                        f"written by train.py, or `resume` auto")
    return Checkpoint(Path(path), tensors, meta)


def resume_conflicts(recorded: dict, config: TrainConfig) -> list[tuple[str, Any, Any]]:
    """``(setting, recorded value, value now)`` for every must-match setting (:func:`resume_rule`) that differs.

    A setting a checkpoint does not record was added after it was written and is taken at its default,
    which reproduces what the run did before the setting existed. A ``seed`` of ``None`` accepts the
    checkpoint's.
    """
    conflicts = []
    for declared in fields(TrainConfig):
        if resume_rule(declared) != MUST_MATCH:
            continue
        name, now = declared.name, getattr(config, declared.name)
        was = recorded[name] if name in recorded else default_of(declared)
        if was != now and not (name == "seed" and now is None):
            conflicts.append((name, was, now))
    return conflicts


def find_checkpoint(resume: str | None, output_dir: str | Path, name: str, config: TrainConfig,
                    remove_temporaries: bool = True) -> Checkpoint | None:
    """The checkpoint ``resume`` names, checked against ``config``; ``None`` starts afresh.

    ``auto`` resumes this save name's checkpoint under ``output_dir`` if there is one, so the
    same command line can be relaunched after every interruption. Every must-match setting of
    ``config`` must equal the checkpoint's (:func:`resume_conflicts`), so a resumed run is the run
    that was interrupted. Temporary files a killed run left are removed by one process only
    (``remove_temporaries``), never while another may be writing them.
    """
    if resume is None:
        return None
    if resume == "auto":
        path = checkpoint_path(output_dir, name)
        if not path.is_file():
            log.info("No checkpoint at %s; starting from epoch 1", path)
            return None
    else:
        path = Path(resume)
        if not path.is_file():
            raise ReirError(f"`resume` {path} does not exist; pass a *{SUFFIX} file or "
                            f"`resume` auto")
    checkpoint = load_checkpoint(path)
    conflicts = resume_conflicts(checkpoint.meta["config"], config)
    if conflicts:
        written = ", ".join(f"`{setting}` {was!r} (not {now!r})" for setting, was, now in conflicts)
        raise UsageError(f"checkpoint {path} was written with {written}; resume with the same settings "
                         f"or start without `resume`")
    if remove_temporaries:
        remove_stale_temporaries(Path(output_dir), name)
    log.info("Resuming from %s: %d epochs done%s", path, checkpoint.meta["epoch"],
             f", {checkpoint.meta['progress']['step']} steps into the next" if checkpoint.meta["progress"]["step"]
             else "")
    return checkpoint


def remove_stale_temporaries(output: Path, name: str) -> None:
    """Temporary files a killed run left behind (never under a final name)."""
    for folder in ("statistics", "epochs", "results", "checkpoints"):
        for leftover in (output / folder).glob(f".{name}_*"):
            if leftover.is_dir():  # an export's staging folder
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
