"""Meta-class assignments: each branch's random grouping of the training classes.

An assignment is an integer array ``[ensemble_size, num_classes]``: entry ``[b, c]``
is the meta class of training class ``c`` in branch ``b``. Column ``c`` is the
class's *code word*.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from reir.errors import ReirError, UsageError
from reir.fileio import read_json, write_json

LABEL_TYPES = ("fixed", "random")
# Pairwise Hamming work (classes^2 * branches) allowed for choosing among candidates.
_CANDIDATE_BUDGET = 4e9
_MAX_CANDIDATES = 32


def balanced_grouping(order: np.ndarray, meta_class_size: int, offset: int = 0) -> np.ndarray:
    """Meta class of each class: position in ``order`` modulo the size, so sizes differ by <= 1."""
    groups = np.empty(len(order), dtype=np.int64)
    groups[order] = (np.arange(len(order)) + offset) % meta_class_size
    return groups


def random_assignment(num_classes: int, ensemble_size: int, meta_class_size: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Independent balanced random grouping per branch; code words may repeat."""
    return np.stack([balanced_grouping(rng.permutation(num_classes), meta_class_size)
                     for _ in range(ensemble_size)])


def distinct_assignment(num_classes: int, ensemble_size: int, meta_class_size: int,
                        rng: np.random.Generator) -> np.ndarray:
    """Balanced groupings that give every class its own code word.

    Each branch lists the classes group by group (classes whose code words so far
    are equal are adjacent, groups and members in random order) and deals meta classes
    round-robin along that list, so every still-colliding group is split as evenly as
    possible. After ``b`` branches no group is larger than ``ceil(n / m**b)``, hence all
    code words are distinct once ``m**ensemble_size >= n``.
    """
    codes = np.zeros((ensemble_size, num_classes), dtype=np.int64)
    for branch in range(ensemble_size):
        prefix = codes[:branch]
        _, group = np.unique(prefix.T, axis=0, return_inverse=True) if branch else (None, np.zeros(num_classes, int))
        group = np.asarray(group).reshape(-1)
        group_rank = rng.permutation(group.max() + 1)[group]
        order = np.lexsort((rng.random(num_classes), group_rank))
        codes[branch] = balanced_grouping(order, meta_class_size, offset=int(rng.integers(meta_class_size)))
    return codes


def min_hamming_distance(codes: np.ndarray, chunk: int = 512) -> int:
    """Smallest number of branches in which two classes' meta classes differ."""
    words = np.ascontiguousarray(codes.T)
    n = len(words)
    if n < 2:
        return codes.shape[0]
    best = codes.shape[0]
    for start in range(0, n, chunk):
        block = words[start:start + chunk]
        dist = (block[:, None, :] != words[None, :, :]).sum(-1)
        rows = np.arange(len(block))
        dist[rows, rows + start] = codes.shape[0] + 1
        best = min(best, int(dist.min()))
    return best


def assign_meta_labels(num_classes: int, ensemble_size: int, meta_class_size: int, label_type: str,
                       seed: int | None = None) -> tuple[np.ndarray, int]:
    """Draw an assignment; return it and its minimum Hamming distance between code words.

    ``fixed`` draws several distinct-code-word candidates and keeps the one whose
    closest pair of classes is farthest apart.
    """
    check_sizes(num_classes, ensemble_size, meta_class_size, label_type)
    rng = np.random.default_rng(seed)
    if label_type == "random":
        codes = random_assignment(num_classes, ensemble_size, meta_class_size, rng)
        return codes, min_hamming_distance(codes)
    work = float(num_classes) ** 2 * ensemble_size
    candidates = int(max(1, min(_MAX_CANDIDATES, _CANDIDATE_BUDGET // max(work, 1))))
    best_codes = distinct_assignment(num_classes, ensemble_size, meta_class_size, rng)
    best_distance = min_hamming_distance(best_codes)
    for _ in range(candidates - 1):
        codes = distinct_assignment(num_classes, ensemble_size, meta_class_size, rng)
        distance = min_hamming_distance(codes)
        if distance > best_distance:
            best_codes, best_distance = codes, distance
    return best_codes, best_distance


def check_sizes(num_classes: int, ensemble_size: int, meta_class_size: int, label_type: str) -> None:
    if label_type not in LABEL_TYPES:
        raise UsageError(f"unknown label_type {label_type!r}; choose fixed or random")
    if meta_class_size >= num_classes:
        raise UsageError(f"meta_class_size {meta_class_size} must be smaller than the {num_classes} training "
                         f"classes; use `meta_class_size` {max(2, num_classes // 2)} or less")
    if meta_class_size < 2:
        raise UsageError("meta_class_size must be at least 2; raise `meta_class_size`")
    if label_type == "fixed" and float(meta_class_size) ** ensemble_size < num_classes:
        raise UsageError(f"fixed labels need meta_class_size ** ensemble_size >= {num_classes} classes, "
                         f"but {meta_class_size} ** {ensemble_size} is smaller; raise `ensemble_size` or "
                         "`meta_class_size`, or use `label_type` random")


def balanced_groupings(num_classes: int, meta_class_size: int) -> int:
    """How many different balanced groupings of the classes into meta classes exist (groups unlabelled)."""
    small, larger = divmod(num_classes, meta_class_size)  # `larger` groups of small + 1, the rest of small
    sizes = [small + 1] * larger + [small] * (meta_class_size - larger)
    count = math.factorial(num_classes)
    for size in sizes:
        count //= math.factorial(size)
    return count // (math.factorial(larger) * math.factorial(meta_class_size - larger))


def grouping_room(num_classes: int, ensemble_size: int, meta_class_size: int) -> str | None:
    """A warning when meta classes have no room to differ between branches, else None."""
    distinct = balanced_groupings(num_classes, meta_class_size)
    if distinct < ensemble_size:
        return (f"meta classes have no room: {num_classes} classes in {meta_class_size} meta classes allow only "
                f"{distinct} different groupings, so {ensemble_size - distinct} of the {ensemble_size} branches "
                "repeat another's task; REIR's ensemble adds little with so few training classes (docs/ACCURACY.md: "
                "few classes); prefer more classes, or add `pair_loss` multisimilarity `samples_per_class` 4")
    if num_classes < 2 * meta_class_size:
        return (f"meta classes have no room: {num_classes} classes in {meta_class_size} meta classes leave "
                f"{2 * meta_class_size - num_classes} meta classes with a single class, so every branch is close to "
                f"a plain classifier; use `meta_class_size` {max(2, num_classes // 4)} or less")
    return None


def ids_path(output_dir: str | Path, data_name: str, crop_type: str, ensemble_size: int,
             meta_class_size: int) -> Path:
    return Path(output_dir) / "results" / f"{data_name}_{crop_type}_{ensemble_size}_{meta_class_size}_ids.json"


def save_ids(path: Path, codes: np.ndarray, classes: list[str], label_type: str, distance: int) -> Path:
    """One file per setting holds a ``fixed`` and a ``random`` entry, as the original's did;
    saving one keeps the other when it is for the same classes."""
    data: dict[str, Any] = {"format": "reir-ids/1", "classes": list(classes)}
    if Path(path).is_file():
        try:
            old = read_json(path, "ids file")
            if old.get("classes") == list(classes):
                data.update({k: v for k, v in old.items() if k in LABEL_TYPES})
        except (ReirError, AttributeError):
            pass
    data[label_type] = {"min_hamming_distance": distance, "ids": codes.tolist()}
    return write_json(path, data)


def load_ids(path: Path, classes: list[str], ensemble_size: int, meta_class_size: int,
             label_type: str) -> tuple[np.ndarray, int]:
    if not Path(path).is_file():
        raise ReirError(f"`load_ids`: no saved ids at {path}; run once without `load_ids` to create them")
    data = read_json(path, "ids file")
    if not isinstance(data, dict) or label_type not in data:
        raise ReirError(f"`load_ids`: {path} holds no {label_type} ids; run once without `load_ids`")
    try:
        codes = np.asarray(data[label_type]["ids"], dtype=np.int64)
        saved_classes = data["classes"]
        distance = int(data[label_type]["min_hamming_distance"])
    except (KeyError, TypeError, ValueError):
        raise ReirError(f"ids file {path} is malformed; delete it and run without `load_ids`") from None
    if codes.ndim != 2 or codes.shape != (ensemble_size, len(classes)) or list(saved_classes) != list(classes):
        raise ReirError(f"ids file {path} is for {len(saved_classes)} other classes or another ensemble; "
                        "run without `load_ids` to draw new ids")
    if codes.min() < 0 or codes.max() >= meta_class_size:
        raise ReirError(f"ids file {path} has meta classes outside 0..{meta_class_size - 1}; "
                        "run without `load_ids`")
    return codes, distance
