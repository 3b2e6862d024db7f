"""Checkpoints and resuming: a killed run continues exactly where the last checkpoint left it.

A checkpoint is one safetensors file (``<output_dir>/checkpoints/<save name>_checkpoint.safetensors``)
written atomically after every epoch, and mid-epoch when SIGINT/SIGTERM stops a run. Its
tensors are the model, the optimizer's tensors and torch's RNG state; its JSON metadata
holds everything else (epoch, step, statistics rows, best recall, meta labels, scheduler,
python/numpy RNG states). Nothing is unpickled, so a checkpoint from someone else cannot
run code.

Determinism: each training image's augmentation is seeded by ``(seed, epoch, image)``
(:class:`ReplayableSampler` + :class:`SeededItems`), so an epoch gives the same batches
whatever ``--num_workers`` is and can be continued from any batch; the global RNG
(``--with_random``) is saved and restored.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from . import killpoints
from .errors import ReirError
from .fileio import load_tensors, save_tensors

FORMAT = "reir-checkpoint/1"
SUFFIX = "_checkpoint.safetensors"
# Flags that must equal the checkpoint's for a resumed run to continue the same run.
MUST_MATCH = ("data_name", "crop_type", "label_type", "recalls", "model_type", "share_type", "with_random",
              "batch_size", "num_epochs", "ensemble_size", "meta_class_size", "image_size", "seed")


def checkpoint_path(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / "checkpoints" / f"{name}{SUFFIX}"


# --- JSON + tensors: state dicts without pickle ------------------------------------------

def pack(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """A JSON-able copy of ``obj``; tensors move to ``tensors`` under dotted keys."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().clone()
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


def rng_state() -> dict:
    version, words, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss],
             "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


# --- the training state ------------------------------------------------------------------

@dataclass
class EpochProgress:
    """Where the current epoch is: batches done and the running sums of ``train_one_epoch``."""

    step: int = 0
    total_loss: float = 0.0
    total_correct: int = 0
    total_seen: int = 0
    stop: "StopRequest | None" = None

    def totals(self) -> tuple[float, int, int]:
        return self.total_loss, self.total_correct, self.total_seen

    def after_step(self, total_loss: float, total_correct: int, total_seen: int) -> None:
        """Record a finished step; stop here if a signal asked to."""
        self.step += 1
        self.total_loss, self.total_correct, self.total_seen = total_loss, total_correct, total_seen
        killpoints.reached("train_step")
        if self.stop is not None and self.stop.signum is not None:
            raise TrainingStopped()


class TrainingStopped(Exception):
    """Raised after the step during which SIGINT/SIGTERM arrived."""


@dataclass
class TrainingState:
    """What a run needs besides its flags to continue: saved after each epoch."""

    epoch: int = 0  # epochs completed
    rows: list[dict] = field(default_factory=list)
    best_recall: float = -1.0
    progress: EpochProgress = field(default_factory=EpochProgress)  # inside epoch ``epoch + 1``

    def epoch_done(self, epoch: int, best_recall: float) -> None:
        self.epoch, self.best_recall = epoch, best_recall
        self.progress = EpochProgress(stop=self.progress.stop)


def save_checkpoint(path: Path, model, optimizer, scheduler, state: TrainingState, meta_labels: torch.Tensor,
                    classes: list[str], run_config: dict) -> Path:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    p = state.progress
    metadata = {
        "format": FORMAT, "config": {k: run_config[k] for k in MUST_MATCH}, "save_name": run_config["save_name"],
        "epoch": state.epoch, "rows": state.rows, "best_recall": state.best_recall,
        "progress": {"step": p.step, "total_loss": p.total_loss, "total_correct": p.total_correct,
                     "total_seen": p.total_seen},
        "classes": list(classes), "meta_labels": meta_labels.cpu().tolist(),
        "optimizer": pack(optimizer.state_dict(), tensors, "optimizer"),
        "scheduler": pack(scheduler.state_dict(), tensors, "scheduler"),
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
            raise ReirError(f"checkpoint {self.path} was trained on other classes than {len(classes)} of this "
                            "dataset; resume with the dataset it was trained on, or start without --resume")
        return np.asarray(self.meta["meta_labels"], dtype=np.int64)

    def restore(self, model, optimizer, scheduler) -> TrainingState:
        """Load every state into the freshly built objects; the RNG last, as it was saved."""
        state = {k[len("model."):]: v for k, v in self.tensors.items() if k.startswith("model.")}
        try:
            model.load_state_dict(state)
            optimizer.load_state_dict(unpack(self.meta["optimizer"], self.tensors))
            scheduler.load_state_dict(unpack(self.meta["scheduler"], self.tensors))
            set_rng_state(unpack(self.meta["rng"], self.tensors))
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
                        "written by train.py, or --resume auto")
    return Checkpoint(Path(path), tensors, meta)


def checkpoint_for_resume(args, name: str) -> Checkpoint | None:
    """The checkpoint ``--resume`` names, checked against the flags; ``None`` starts afresh.

    ``--resume auto`` resumes this save name's checkpoint under ``--output_dir`` if there
    is one, so the same command line can be relaunched after every interruption.
    """
    if args.resume is None:
        return None
    if args.resume == "auto":
        path = checkpoint_path(args.output_dir, name)
        if not path.is_file():
            print(f"No checkpoint at {path}; starting from epoch 1")
            return None
    else:
        path = Path(args.resume)
        if not path.is_file():
            raise ReirError(f"--resume {path} does not exist; pass a *{SUFFIX} file or --resume auto")
    checkpoint = load_checkpoint(path)
    if args.seed is None:
        args.seed = checkpoint.seed
    saved = checkpoint.meta["config"]
    different = [k for k in MUST_MATCH if saved.get(k) != getattr(args, k)]
    if different:
        flags = ", ".join(f"--{k} {saved.get(k)!r} (not {getattr(args, k)!r})" for k in different)
        raise ReirError(f"checkpoint {path} was written with {flags}; resume with the same flags "
                        "or start without --resume", 2)
    remove_stale_temporaries(Path(args.output_dir), name)
    print(f"Resuming from {path}: {checkpoint.meta['epoch']} epochs done"
          + (f", {checkpoint.meta['progress']['step']} steps into the next" if checkpoint.meta["progress"]["step"]
             else ""))
    return checkpoint


def remove_stale_temporaries(output: Path, name: str) -> None:
    """Temporary files a killed run left behind (never under a final name)."""
    for folder in ("statistics", "epochs", "results", "checkpoints"):
        for leftover in (output / folder).glob(f".{name}_*"):
            leftover.unlink(missing_ok=True)


# --- signals -------------------------------------------------------------------------------

class StopRequest:
    """SIGINT/SIGTERM set ``signum``; training stops after the current step and saves.

    Before training starts (:meth:`arm`), and on a second signal, it stops at once:
    the last checkpoint on disk is still good.
    """

    def __init__(self):
        self.signum: int | None = None
        self.armed = False

    def arm(self, progress: EpochProgress) -> None:
        progress.stop, self.armed = self, True

    def _handle(self, signum, frame):
        if not self.armed or self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
              "(send it again to stop at once)", file=sys.stderr)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def error(self, path: Path, where: str) -> ReirError:
        name = signal.Signals(self.signum).name
        return ReirError(f"stopped by {name} {where}; checkpoint saved to {path}; "
                         "resume with the same command plus --resume auto", 128 + self.signum)


def ignore_sigint_in_worker(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group; only the main process decides how to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def loader_options() -> dict:
    """DataLoader options that keep the global RNG untouched and workers quiet on Ctrl-C."""
    return {"generator": torch.Generator().manual_seed(0), "worker_init_fn": ignore_sigint_in_worker}


# --- replayable epochs -----------------------------------------------------------------------

class ReplayableSampler(Sampler):
    """Yields ``(sample_seed, index)``: the wrapped sampler's order, each image with its own seed.

    ``resume_at(epoch, batch)`` makes that epoch start after its first ``batch`` batches.
    """

    def __init__(self, sampler, seed: int, batch_size: int):
        self.sampler, self.seed, self.batch_size = sampler, seed, batch_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def resume_at(self, epoch: int, batch: int) -> None:
        self._resume = (epoch, batch)

    def _skip(self) -> int:
        return self._resume[1] * self.batch_size if self._resume and self._resume[0] == self.epoch else 0

    def __iter__(self):
        skip = self._skip()
        self._resume = None
        seeds = np.random.SeedSequence([self.seed, self.epoch]).generate_state(len(self.sampler), np.uint64)
        pairs = zip((int(s) >> 1 for s in seeds), self.sampler)
        return itertools.islice(pairs, skip, None)

    def indices(self) -> list:
        """The epoch's ``(seed, index)`` pairs, for samplers that split them (DDP ranks)."""
        return list(iter(self))

    def __len__(self) -> int:
        return len(self.sampler) - self._skip()


class SeededItems(Dataset):
    """``dataset[index]`` with torch's RNG seeded per item, so augmentation is replayable anywhere."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        sample_seed, index = item
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed)  # CPU only: CUDA's RNG stays the run's
            return self.dataset[index]
