"""Argument checks at the door of the public functions: a wrong call is a ReirError naming the argument.

Without them a careless call either answers something wrong (a gallery scored with the query labels,
float labels truncated to integers) or fails deep inside with an index error that names nothing
the caller wrote.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch

from reir.errors import ReirError


def as_features(value, name: str) -> torch.Tensor:
    """``value`` as a float tensor ``[N, ensemble, meta]`` or ``[N, D]`` with at least one row."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise ReirError(f"{name} must be a tensor of embeddings [N, ensemble, meta] or [N, D], "
                            f"not {type(value).__name__}") from None
    if value.dim() not in (2, 3):
        raise ReirError(f"{name} must be embeddings [N, ensemble, meta] or [N, D], not shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ReirError(f"{name} must hold floating-point embeddings, not {value.dtype}")
    if len(value) == 0 or value[0].numel() == 0:
        raise ReirError(f"{name} is empty (shape {tuple(value.shape)}); embed at least one image")
    return value


def check_finite(vectors: torch.Tensor, what: str, fix: str) -> torch.Tensor:
    """``vectors`` (rows of embeddings), refused with the number of rows holding NaN or an infinity: one such
    row would make every search over it fail or rank at random."""
    if vectors.is_floating_point() and vectors.dim() and vectors.numel():
        rows = vectors.reshape(len(vectors), -1)
        bad = sum(int((~torch.isfinite(rows[start:start + 65536])).any(dim=1).sum())  # bounded scratch memory
                  for start in range(0, len(rows), 65536))
        if bad:
            raise ReirError(f"{what} holds {bad} of {len(vectors)} vectors with NaN or infinite values; {fix}")
    return vectors


def check_labels(labels, count: int, name: str, of: str) -> list | torch.Tensor:
    """Class labels for ``count`` items: class names (str), integers, or a 1-D integer tensor."""
    if isinstance(labels, torch.Tensor):
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ReirError(f"{name} must be a 1-D integer tensor or a list of class names, "
                            f"not a {labels.dtype} tensor of shape {tuple(labels.shape)}")
    elif isinstance(labels, (str, bytes)) or not isinstance(labels, (Sequence, np.ndarray)):
        raise ReirError(f"{name} must be a list of class names or integers (one per image of {of}), "
                        f"not {type(labels).__name__}")
    else:
        labels = list(labels)
        unknown = [label for label in labels if not _known_label(label)][:1]
        names = sum(isinstance(label, str) for label in labels)
        if unknown or 0 < names < len(labels):
            shown = f"{type(unknown[0]).__name__} {unknown[0]!r:.40}" if unknown else "a mix of names and numbers"
            raise ReirError(f"{name} holds {shown}; labels are class names (str) or integers, one kind throughout")
    if len(labels) != count:
        raise ReirError(f"{name} has {len(labels)} labels but {of} has {count} images; give one label per image")
    return labels


def _known_label(label) -> bool:
    if isinstance(label, bool):
        return False
    if isinstance(label, (str, numbers.Integral)):
        return True
    return isinstance(label, torch.Tensor) and label.dim() == 0 and not label.dtype.is_floating_point


def check_positive_ints(values, name: str) -> list[int]:
    """``values`` (e.g. the K of Recall@K) as positive integers."""
    values = list(values) if not isinstance(values, (int, str)) else [values]
    if not values or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in values):
        raise ReirError(f"{name} must be positive integers, not {values!r:.60}")
    return [int(v) for v in values]


def check_k(k, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ReirError(f"{name} must be a positive integer, not {k!r:.40}")
    return int(k)


def check_device(device) -> torch.device:
    """A torch device that exists here; an unknown name or an absent GPU is a ReirError."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ReirError(f"device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ReirError(f"device {device} was asked for but no CUDA GPU is available; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ReirError(f"device {device} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    return device


@contextmanager
def file_structure(path, what: str, fix: str):
    """Reading a file's recorded structure: a missing key or a value of the wrong kind is a ReirError naming the file.

    The files were written by REIR, so any such mismatch means a damaged or foreign file, never a bug to trace.
    """
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:120]
        raise ReirError(f"{what} {path} is damaged or not written by REIR ({reason}); {fix}") from None


def check_text_list(value, name: str, count: int | None = None) -> list[str]:
    """A JSON list of strings (of ``count`` entries when given)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} is not a list of strings")
    if count is not None and len(value) != count:
        raise ValueError(f"{name} has {len(value)} entries, not {count}")
    return value


def check_recorded_fields(recorded, defaults, name: str) -> dict:
    """A recorded dataclass (e.g. a model configuration): known fields only, each of its default's type."""
    if not isinstance(recorded, dict):
        raise TypeError(f"{name} is not an object")
    fields = {f.name: f.default for f in dataclasses.fields(defaults)}
    for key, value in recorded.items():
        if key not in fields:
            raise KeyError(f"{name} has an unknown field {key!r:.40}")
        if type(value) is not type(fields[key]):
            raise TypeError(f"{name}.{key} is a {type(value).__name__}, not a {type(fields[key]).__name__}")
    return recorded
