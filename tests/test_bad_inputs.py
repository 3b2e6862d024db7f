"""Bad input to every command: exit 2 (usage) or 1 (runtime), one line naming problem and fix,
no traceback, and every file that existed before left byte-for-byte unchanged."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import run_script, tiny_args
from reir import cli
from reir.cli.common import reports_errors
from reir.cli.train import main as train_main
from reir.data.splits import load_split_list, split_list_path
from reir.fileio import save_tensors
from reir.model.meta_labels import ids_path
from reir.retrieval.database import load_database, resolve_database_path
from reir.training.checkpoint import checkpoint_path

NAME = "digits_uncropped_fixed_unrandom_layer4_resnet18_3_2"


@pytest.fixture(scope="module")
def trained(small_digits_root, tmp_path_factory) -> Path:
    """An output folder holding a good run's files: every case must leave them as they are."""
    out = tmp_path_factory.mktemp("good_run")
    assert train_main(tiny_args(small_digits_root, out, "--share_type", "layer4")) == 0
    return out


@dataclass
class Ctx:
    data: Path
    out: Path
    tmp: Path

    def train(self, *extra: str, out: Path | None = None, data: Path | None = None) -> list[str]:
        return tiny_args(data or self.data, out or self.out, "--share_type", "layer4", *extra)

    def copy_data(self) -> Path:
        """A private copy of the small dataset, to damage."""
        target = self.tmp / "data"
        shutil.copytree(self.data, target)
        return target

    def file(self, name: str, content: bytes = b"") -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path


def damaged_split_list(ctx: Ctx, change: Callable[[dict], None]) -> Path:
    data = ctx.copy_data()
    path = split_list_path(data, "digits", "uncropped")
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))
    return data


def corrupt_image(ctx: Ctx) -> Path:
    data = ctx.copy_data()
    first = load_split_list(split_list_path(data, "digits", "uncropped")).absolute("train")[0]
    Path(first).write_bytes(b"\x89PNG\r\n\x1a\n truncated download")
    return data


def ids_for_other_classes(ctx: Ctx) -> Path:
    out = ctx.tmp / "other_ids"
    path = ids_path(out, "digits", "uncropped", 3, 2)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": "reir-ids/1", "classes": ["0", "1", "2", "3"],
                                "fixed": {"min_hamming_distance": 1, "ids": [[0, 1, 0, 1]] * 3}}))
    return out


def planted_ids(ctx: Ctx, text: str) -> Path:
    out = ctx.tmp / "planted_ids"
    path = ids_path(out, "digits", "uncropped", 3, 2)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return out


def ckpt(ctx: Ctx) -> str:
    return str(checkpoint_path(ctx.out, NAME))


def database(ctx: Ctx) -> Path:
    return ctx.out / "results" / f"{NAME}_data_base.safetensors"


def truncated(ctx: Ctx, source: Path, name: str) -> str:
    return str(ctx.file(name, source.read_bytes()[: source.stat().st_size // 2]))


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def disk_full(monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", fsync)


def other_backbone_weights(ctx: Ctx) -> str:
    path = ctx.tmp / "vgg.safetensors"
    from safetensors.torch import save_file
    save_file({"features.0.weight": torch.zeros(2, 3, 3, 3)}, str(path))
    return str(path)


def inconsistent_database(ctx: Ctx) -> Path:
    path = ctx.tmp / "bad_data_base.safetensors"
    save_tensors(path, {"test_features": torch.zeros(3, 2, 2)},
                 {"format": "reir-database/1", "splits": {"test": {"paths": ["a"], "labels": ["0"]}},
                  "config": {}, "info": {}})
    return path


def train_case(build: Callable[[Ctx], list[str]], code: int, words: str, patch=None):
    return ("train", build, code, words, patch)


def fn_case(call: Callable[[Ctx], object], code: int, words: str):
    return ("function", call, code, words, None)


CASES = {
    # usage errors: flags
    "unknown backbone": train_case(lambda c: c.train("--model_type", "vgg"), 2, "invalid choice"),
    "zero batch size": train_case(lambda c: c.train("--batch_size", "0"), 2, "must be >= 1"),
    "epochs not a number": train_case(lambda c: c.train("--num_epochs", "ten"), 2, "not an integer"),
    "recalls not integers": train_case(lambda c: c.train("--recalls", "1,x"), 2, "comma-separated"),
    "recall of zero": train_case(lambda c: c.train("--recalls", "0,1"), 2, "positive integers"),
    "gpu ids not integers": train_case(lambda c: c.train("--gpu_ids", "a,b"), 2, "GPU ids"),
    "negative gpu id": train_case(lambda c: c.train("--gpu_ids", "-1"), 2, ">= 0"),
    "unknown flag": train_case(lambda c: c.train("--no_such_flag"), 2, "unrecognized arguments"),
    "unknown dataset": train_case(lambda c: c.train("--data_name", "imagenet"), 2, "invalid choice"),
    "unknown label type": train_case(lambda c: c.train("--label_type", "learned"), 2, "invalid choice"),
    "negative seed": train_case(lambda c: c.train("--seed", "-3"), 2, ">= 0"),
    "not a device": train_case(lambda c: c.train("--device", "tpu"), 2, "not a device"),
    "cuda without a GPU": train_case(lambda c: c.train("--device", "cuda"), 2, "no CUDA GPU", no_cuda),
    "crop of an uncroppable dataset": train_case(lambda c: c.train("--crop_type", "cropped"), 2, "only applies"),
    # usage errors: sizes and files that do not fit the flags
    "meta_class_size too large": train_case(lambda c: c.train("--meta_class_size", "5"), 2, "must be smaller"),
    "impossible fixed labels": train_case(lambda c: c.train("--ensemble_size", "1"), 2, "raise --ensemble_size"),
    "weights file missing": train_case(lambda c: c.train("--weights", str(c.tmp / "no.pth")), 2, "does not exist"),
    "weights not a state dict": train_case(lambda c: c.train("--weights", str(c.file("w.pth", b"hello"))), 2,
                                           "cannot be loaded safely"),
    "weights of another backbone": train_case(lambda c: c.train("--weights", other_backbone_weights(c)), 2,
                                              "not a resnet18 state dict"),
    "checkpoint of another ensemble size": train_case(
        lambda c: c.train("--resume", ckpt(c), "--ensemble_size", "4"), 2, "--ensemble_size 3"),
    "checkpoint of another backbone": train_case(
        lambda c: c.train("--resume", ckpt(c), "--model_type", "resnet34"), 2, "--model_type 'resnet18'"),
    "checkpoint of another seed": train_case(lambda c: c.train("--resume", ckpt(c), "--seed", "5"), 2,
                                             "--seed 0"),
    # runtime errors: files and folders
    "resume path missing": train_case(lambda c: c.train("--resume", str(c.tmp / "none.safetensors")), 1,
                                      "does not exist"),
    "resume from a database": train_case(lambda c: c.train("--resume", str(database(c))), 1,
                                         "not a REIR training checkpoint"),
    "resume from a truncated checkpoint": train_case(
        lambda c: c.train("--resume", truncated(c, Path(ckpt(c)), "half.safetensors")), 1,
        "not a REIR safetensors file"),
    "load_ids with nothing saved": train_case(lambda c: c.train("--load_ids", out=c.tmp / "fresh"), 1,
                                              "no saved ids"),
    "load_ids for other classes": train_case(lambda c: c.train("--load_ids", out=ids_for_other_classes(c)), 1,
                                             "other classes"),
    "load_ids file not JSON": train_case(lambda c: c.train("--load_ids", out=planted_ids(c, "{oops")), 1,
                                         "not valid JSON"),
    "benchmark not prepared": train_case(lambda c: c.train("--data_name", "car", "--data_path", str(c.tmp)), 1,
                                         "prepare the dataset first"),
    "empty dataset folder": train_case(
        lambda c: c.train("--data_name", "cub", "--data_path", str(c.file("cub/.keep").parent.parent)), 1,
        "prepare the dataset first"),
    "split list malformed": train_case(lambda c: c.train(data=damaged_split_list(c, lambda d: d.clear())), 1,
                                       "malformed"),
    "split list without train split": train_case(
        lambda c: c.train(data=damaged_split_list(c, lambda d: d["splits"].pop("train"))), 1, "needs a train split"),
    "image missing": train_case(
        lambda c: c.train(data=damaged_split_list(c, lambda d: d["splits"]["train"]["paths"].__setitem__(
            0, "images/gone.png"))), 1, "does not exist"),
    "corrupt image": train_case(lambda c: c.train(data=corrupt_image(c)), 1, "cannot be read"),
    "corrupt image read by a worker": train_case(lambda c: c.train("--num_workers", "2", data=corrupt_image(c)), 1,
                                                 "cannot be read"),
    "output folder unwritable": train_case(lambda c: c.train(out=c.file("a_file") / "out"), 1,
                                           "cannot create folder"),
    "disk full": train_case(lambda c: c.train(), 1, "No space left on device", disk_full),
    # the reir command
    "reir: unknown command": ("reir", lambda c: ["frobnicate"], 2, "unknown command", None),
    "reir params: zero branches": ("reir", lambda c: ["params", "--ensemble_size", "0"], 2, "must be >= 1", None),
    "reir params: unknown share type": ("reir", lambda c: ["params", "--share_type", "layer9"], 2, "invalid choice",
                                        None),
    # reir eval and reir prepare
    "eval: database missing": ("reir", lambda c: ["eval", "--data_base", "nope", "--output_dir", str(c.out)], 1,
                               "not found", None),
    "eval: no database given": ("reir", lambda c: ["eval"], 2, "required: --data_base", None),
    "eval: recall of zero": ("reir", lambda c: ["eval", "--data_base", str(database(c)), "--recalls", "0,5"], 2,
                             "must list positive integers", None),
    "eval: a checkpoint as database": ("reir", lambda c: ["eval", "--data_base", ckpt(c)], 1,
                                       "not a REIR database", None),
    "prepare: benchmark not downloaded": ("reir", lambda c: ["prepare", "--data_name", "car", "--data_path",
                                                             str(c.tmp)], 1, "download the dataset", None),
    "prepare: empty custom folder": ("reir", lambda c: ["prepare", "--data_name", "custom", "--data_path",
                                                        str(c.tmp)], 1, "not a custom dataset folder", None),
    "prepare: resize not a number": ("reir", lambda c: ["prepare", "--resize", "abc"], 2, "not an integer", None),
    # loading databases
    "database that is a checkpoint": fn_case(lambda c: load_database(ckpt(c)), 1, "not a REIR database"),
    "database truncated": fn_case(lambda c: load_database(truncated(c, database(c), "db.safetensors")), 1,
                                  "not a REIR safetensors file"),
    "database inconsistent": fn_case(lambda c: load_database(inconsistent_database(c)), 1, "inconsistent"),
    "database not found": fn_case(lambda c: resolve_database_path("nothing", c.out), 1, "not found"),
}
# A few run as real processes: the exit code and stderr a user sees.
SUBPROCESS = {"unknown backbone", "reir: unknown command", "output folder unwritable"}


def snapshot(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots if root.exists() for p in sorted(root.rglob("*")) if p.is_file()}


def test_there_are_at_least_thirty_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, trained, small_digits_root, tmp_path, capsys, monkeypatch):
    kind, build, code, words, patch = CASES[case]
    ctx = Ctx(small_digits_root, trained, tmp_path)
    argv = build(ctx) if kind != "function" else None
    before = snapshot(trained, small_digits_root, tmp_path)
    if case in SUBPROCESS:
        result = run_script("reir" if kind == "reir" else "train.py", *argv)
        returned, err = result.returncode, result.stderr
    else:
        if patch:
            patch(monkeypatch)
        try:
            if kind == "train":
                returned = train_main(argv)
            elif kind == "reir":
                returned = cli.main(argv)
            else:
                returned = reports_errors(lambda: build(ctx))()
        except SystemExit as exc:
            returned = exc.code
        monkeypatch.undo()
        err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert returned == code, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert words in lines[0]
    after = snapshot(trained, small_digits_root, tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that existed was changed"
    assert not [k for k in after if k not in before and Path(k).name.startswith(".")], "temporary file left"
