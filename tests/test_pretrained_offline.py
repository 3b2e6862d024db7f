"""The default path from pretrained weights, offline: ``train.py`` with its default ``--weights imagenet``
finds torchvision's ImageNet file in its cache with every network connection refused, trains with the
original's recipe and normalisation, and records where its weights came from; the same from a state-dict
file; and a missing file is one line that says where to put it."""

from __future__ import annotations

import csv
import hashlib
import socket
from pathlib import Path

import pytest
import torch
import torchvision

from conftest import run_reir
from dataset_fixtures import make_car
from reir.data.registry import BENCHMARKS
from reir.fileio import load_tensors
from reir.retrieval.database import load_database

# train.py's defaults (car, --weights imagenet, --recipe auto, share_type layer1, batch 10, the fixed labels)
# made small by flags alone: 2 branches of 2 meta classes for the fixture's 3 training classes, 32 px,
# 3 epochs (the original's rate steps at 50 % and 70 % then fall on epochs 1 and 2).
SMALL = ("--ensemble_size", "2", "--meta_class_size", "2", "--image_size", "32", "--num_epochs", "3",
         "--num_workers", "0", "--device", "cpu", "--seed", "0")
NAME = "car_uncropped_fixed_unrandom_layer1_resnet18_2_2"
IMAGENET_FILE = Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name


@pytest.fixture(scope="module")
def car_root(tmp_path_factory) -> Path:
    """The car benchmark's official layout in miniature (3 + 3 classes), prepared by ``reir prepare``."""
    root = tmp_path_factory.mktemp("car")
    make_car(root)
    prepared = run_reir("prepare", "--data_path", root, "--data_name", "car")
    assert prepared.returncode == 0, prepared.stderr
    return root


@pytest.fixture
def offline(monkeypatch, tmp_path) -> list:
    """No network in this process: every name lookup and connection raises, and is counted; torch's hub
    (``TORCH_HOME``) is an empty folder of the test's."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return attempts


def random_resnet18(path: Path) -> str:
    """A torchvision-format resnet18 state dict (random weights) at ``path``; its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_trained_as_the_original_from(out: Path, result, origin: dict) -> None:
    """Finished, with the original's recipe and car's normalisation, and ``origin`` in every output."""
    assert result.returncode == 0, result.stderr
    assert "original recipe" in result.stdout
    with open(out / "statistics" / f"{NAME}_results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    # Adam at 1e-4, divided by 10 at 50 % and at 70 % of the epochs (the scratch recipe starts at 1e-3)
    assert [float(row["learning_rate"]) for row in rows] == pytest.approx([1e-4, 1e-5, 1e-6])
    assert all(0 <= float(row["test_recall@1"]) <= 1 for row in rows)
    database = load_database(out / "results" / f"{NAME}_data_base.safetensors")
    assert database.features["test"].shape == (9, 2, 2)
    car = BENCHMARKS["car"]
    assert database.info["mean"] == pytest.approx(car.mean) and database.info["std"] == pytest.approx(car.std)
    _, meta = load_tensors(out / "epochs" / f"{NAME}_model.safetensors")
    assert meta["info"]["mean"] == pytest.approx(car.mean)
    for recorded in (database.config["initial_weights"], meta["config"]["initial_weights"]):
        assert recorded == origin


def test_the_default_imagenet_weights_train_offline_from_torchvisions_cache(car_root, tmp_path, offline):
    cached = tmp_path / "torch" / "hub" / "checkpoints" / IMAGENET_FILE
    digest = random_resnet18(cached)
    out = tmp_path / "out"
    result = run_reir("train", "--data_path", car_root, "--output_dir", out, *SMALL)
    assert offline == [], "nothing was to be downloaded"
    assert_trained_as_the_original_from(out, result, {
        "weights": "imagenet", "torchvision": "ResNet18_Weights.IMAGENET1K_V1",
        "url": torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url, "file": str(cached.resolve()),
        "sha256": digest, "published_file": False})
    # random weights under the published name: said, not passed off as ImageNet's
    assert "not torchvision's published file" in result.stderr and digest[:8] in result.stderr


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_a_state_dict_file_train_offline_and_are_recorded(car_root, tmp_path, offline, suffix):
    weights = tmp_path / f"backbone{suffix}"
    random_resnet18(tmp_path / "backbone.pth")
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(torch.load(tmp_path / "backbone.pth", weights_only=True), str(weights))
    out = tmp_path / "out"
    result = run_reir("train", "--data_path", car_root, "--output_dir", out, "--weights", weights, *SMALL)
    assert offline == []
    assert_trained_as_the_original_from(out, result, {
        "weights": str(weights), "file": str(weights.resolve()),
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()})
    assert not (tmp_path / "torch").exists(), "torchvision's cache was not looked at"


def test_missing_imagenet_weights_offline_are_one_line_naming_the_file(car_root, tmp_path, offline):
    out = tmp_path / "out"
    result = run_reir("train", "--data_path", car_root, "--output_dir", out, *SMALL)
    assert offline, "the control: a download was tried, and refused"
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    target = tmp_path / "torch" / "hub" / "checkpoints" / IMAGENET_FILE
    assert len(lines) == 1 and lines[0].startswith("error: cannot download ImageNet weights"), result.stderr
    assert f"put that file at {target} " in lines[0] and "--weights none" in lines[0]
    assert not target.exists() and not (out / "results").exists(), "nothing half-written"
