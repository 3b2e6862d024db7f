"""train.py end to end on digits, its flags, and Recall@K against brute force."""

import csv

import pytest
import torch

from reir.database import load_database
from reir.fileio import load_tensors
from reir.metrics import retrieval_recalls
from reir.train import get_args_parser, resolve_device
from conftest import run_script, tiny_args

ORIGINAL_DEFAULTS = {
    "data_name": "car", "crop_type": "uncropped", "label_type": "fixed", "recalls": [1, 2, 4, 8],
    "model_type": "resnet18", "share_type": "layer1", "with_random": False, "load_ids": False,
    "batch_size": 10, "num_epochs": 20, "ensemble_size": 48, "meta_class_size": 12, "gpu_ids": [0, 1],
}


def test_every_original_flag_has_the_original_default():
    args = get_args_parser().parse_args([])
    for flag, default in ORIGINAL_DEFAULTS.items():
        assert getattr(args, flag) == default, flag
    assert (args.weights, args.image_size, args.data_path, args.output_dir) == ("imagenet", 256, "data", ".")
    choices = {a.dest: a.choices for a in get_args_parser()._actions}
    assert set(choices["data_name"]) >= {"car", "cub", "sop", "isc", "digits"}
    assert choices["model_type"] == ("resnet18", "resnet34", "resnet50", "resnext50_32x4d")
    assert choices["share_type"] == ("none", "maxpool", "layer1", "layer2", "layer3", "layer4")


def test_help_lists_every_original_flag():
    result = run_script("train.py", "--help")
    assert result.returncode == 0
    for flag in ORIGINAL_DEFAULTS:
        assert f"--{flag}" in result.stdout


def test_bad_flag_value_is_one_line_usage_error():
    result = run_script("train.py", "--model_type", "vgg")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "invalid choice" in result.stderr


def test_absent_gpu_ids_do_not_crash(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    device = resolve_device(None, [0, 3])
    assert device == torch.device("cuda", 0)
    assert "[3] do not exist" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None, [0, 1]) == torch.device("cpu")


def brute_recall(features, labels, ks, gallery=None, gallery_labels=None):
    """Full similarity matrix: mean over branches of per-branch cosine, argsort."""
    ref, ref_labels = (features, labels) if gallery is None else (gallery, gallery_labels)
    sim = torch.einsum("qec,rec->qr", features, ref) / features.shape[1]
    if gallery is None:
        sim.fill_diagonal_(-float("inf"))
    order = sim.argsort(dim=1, descending=True)
    return {k: (ref_labels[order[:, :k]] == labels[:, None]).any(1).float().mean().item() for k in ks}


@pytest.mark.parametrize("protocol", ["self", "query_gallery"])
def test_recall_matches_brute_force(protocol):
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(300, 4, 5), dim=-1)
    labels = torch.randint(0, 20, (300,))
    ks = [1, 2, 4, 8, 16]
    if protocol == "self":
        ours = retrieval_recalls(features, labels, ks)
        expected = brute_recall(features, labels, ks)
    else:
        gallery = torch.nn.functional.normalize(torch.randn(200, 4, 5), dim=-1)
        gallery_labels = torch.randint(0, 20, (200,))
        ours = retrieval_recalls(features, labels, ks, gallery, gallery_labels)
        expected = brute_recall(features, labels, ks, gallery, gallery_labels)
    assert ours == pytest.approx(expected, abs=1e-6)  # brute force averages in float32
    assert 0 < ours[1] < ours[16] <= 1


def test_params_command_prints_the_table_cell():
    result = run_script("reir", "params", "--model_type", "resnet50", "--meta_class_size", "512")
    assert result.returncode == 0 and result.stdout.strip() == "1,168,150,592"


def test_training_on_digits_writes_every_output(digits_root, tmp_path):
    out = tmp_path / "out"
    result = run_script("train.py", *tiny_args(digits_root, out, "--num_epochs", "2", "--with_random",
                                                      "--nmi_every", "2"))
    assert result.returncode == 0, result.stderr
    name = "digits_uncropped_fixed_random_layer1_resnet18_3_2"
    with open(out / "statistics" / f"{name}_results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "train_accuracy", "test_recall@1", "test_recall@8"} <= set(rows[0])
    assert all(0 <= float(r["test_recall@1"]) <= 1 for r in rows)
    for column in ("test_precision@1", "test_r_precision", "test_map@r"):
        assert all(0 <= float(r[column]) <= 1 for r in rows), column
    assert rows[0]["test_nmi"] == "" and 0 <= float(rows[1]["test_nmi"]) <= 1  # NMI every 2nd epoch
    database = load_database(out / "results" / f"{name}_data_base.safetensors")
    assert database.features["test"].shape == (len(database.paths("test")), 3, 2)
    assert database.features["train"].shape[1:] == (3, 2)
    assert set(database.labels("train")) == {"0", "1", "2", "3", "4"}
    assert database.config["with_random"] is True and database.config["seed"] == 0
    best = max(float(r["test_recall@1"]) for r in rows)
    assert database.info["metrics"]["recall@1"] == pytest.approx(best)
    state, meta = load_tensors(out / "epochs" / f"{name}_model.safetensors")
    assert meta["model"]["ensemble_size"] == 3 and any(k.startswith("branches.2.") for k in state)
    assert (out / "results" / "digits_uncropped_3_2_ids.json").is_file()
    assert "Best R@1" in result.stdout


def test_load_ids_reuses_saved_assignment(digits_root, tmp_path):
    out = tmp_path / "out"
    first = run_script("train.py", *tiny_args(digits_root, out, "--label_type", "random"))
    assert first.returncode == 0, first.stderr
    ids_file = out / "results" / "digits_uncropped_3_2_ids.json"
    before = ids_file.read_bytes()
    again = run_script("train.py", *tiny_args(digits_root, out, "--label_type", "random", "--load_ids", "--seed", "5"))
    assert again.returncode == 0, again.stderr
    assert "Loaded random meta-class ids" in again.stdout and ids_file.read_bytes() == before
    missing = run_script("train.py", *tiny_args(digits_root, tmp_path / "other", "--load_ids"))
    assert missing.returncode == 1 and "no saved ids" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_meta_class_size_too_large_is_refused(digits_root, tmp_path):
    result = run_script("train.py", *tiny_args(digits_root, tmp_path, "--meta_class_size", "5"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "smaller than the 5 training classes" in result.stderr
