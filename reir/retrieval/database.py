"""The feature database: what inference, ablation and evaluation need, in one safe file.

A single safetensors file holds the embeddings of every split (``<split>_features``,
``[N, ensemble, meta]``); its JSON metadata holds the image paths and labels per
split, the dataset's normalisation, the training configuration (to rebuild the
model) and the metrics of the epoch it was written at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from reir.errors import ReirError
from reir.fileio import load_tensors, save_tensors
from reir.validation import check_text_list, file_structure

FORMAT = "reir-database/1"
SUFFIX = "_data_base.safetensors"
UNLABELLED = ""  # the label of an image whose class is unknown


def shared_label_ids(*label_lists: list[str]) -> list[torch.Tensor]:
    """Class names of several splits as integers on one vocabulary, so equal names get equal ids."""
    vocabulary = {name: i for i, name in enumerate(sorted({l for labels in label_lists for l in labels}))}
    return [torch.tensor([vocabulary[l] for l in labels]) for labels in label_lists]


@dataclass
class Database:
    features: dict[str, torch.Tensor]
    splits: dict[str, dict[str, list[str]]]  # split -> {"paths": [...], "labels": [...]}
    config: dict
    info: dict = field(default_factory=dict)  # data_name, crop_type, mean, std, metrics, epoch, ...

    def paths(self, split: str) -> list[str]:
        return self.splits[split]["paths"]

    def labels(self, split: str) -> list[str]:
        return self.splits[split]["labels"]

    def label_ids(self, *splits: str) -> list[torch.Tensor]:
        """Labels of several splits as integers on one shared vocabulary."""
        return shared_label_ids(*(self.labels(s) for s in splits))

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return ("query", "gallery") if "query" in self.splits else ("test",)

    def save(self, path: str | Path) -> Path:
        return save_tensors(path, {f"{name}_features": t for name, t in self.features.items()},
                            {"format": FORMAT, "splits": self.splits, "config": self.config, "info": self.info})


def load_database(path: str | Path) -> Database:
    with file_structure(path, "database", f"pass a *{SUFFIX} file written by train.py or reir embed"):
        tensors, meta = load_tensors(path, "database")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ReirError(f"database {path} is not a REIR database; pass a *{SUFFIX} file written by train.py")
        features = {name[: -len("_features")]: t for name, t in tensors.items() if name.endswith("_features")}
        splits = meta["splits"]
        for name, tensor in features.items():
            if name not in splits or len(splits[name]["paths"]) != len(tensor):
                raise ReirError(f"database {path} is inconsistent in split {name!r}; regenerate it with train.py")
        for name, split in splits.items():
            check_text_list(split["labels"], f"split {name} labels", len(check_text_list(split["paths"], name)))
        if not isinstance(meta["config"], dict) or not isinstance(meta.get("info", {}), dict):
            raise TypeError("config or info is not an object")
        return Database(features, splits, meta["config"], meta.get("info", {}))


def resolve_database_path(name: str, output_dir: str | Path = ".") -> Path:
    """A database given as in the original (a name under ``results/``) or as any path."""
    candidate = Path(name)
    if candidate.is_file():
        return candidate
    under_results = Path(output_dir) / "results" / name
    for option in (under_results, under_results.with_name(under_results.name + SUFFIX)):
        if option.is_file():
            return option
    if name.endswith(".pth"):  # the original's names: look for our safe equivalent
        stem = Path(name).name[: -len(".pth")]
        if stem.endswith("_data_base"):
            stem = stem[: -len("_data_base")]
        option = Path(output_dir) / "results" / f"{stem}{SUFFIX}"
        if option.is_file():
            return option
    raise ReirError(f"database {name} not found (also looked in {Path(output_dir) / 'results'}); "
                    "train a model first or pass the path of a *_data_base.safetensors file")
