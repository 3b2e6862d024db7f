"""The original's files: its three network layouts and its database, converted and checked against it.

Each test builds the original's network from torchvision modules in one of its layouts, saves its
state dict and a database as the original did (``torch.save`` of dicts), converts both with
``reir convert`` and checks REIR's network and ``reir eval`` against the original's network and an
independent Recall@K written here with plain torch.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from reir.cli import main as reir
from reir.data.images import build_transform
from reir.model.files import load_model
from reir.retrieval.database import load_database

STAGES = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
SHARED = {"none": 0, "maxpool": 4, "layer1": 5, "layer2": 6, "layer3": 7, "layer4": 8}
META = 3
CLASSES = (0, 1, 2, 3)


class OriginalNet(nn.Module):
    """The original's network, with its parameter names, in one of its three layouts.

    ``layers``: ``common_extractor`` (up to layer1) + ``layer2..layer4`` lists, each branch's stage kept
    in one more Sequential; ``head``: ``common_extractor`` + ``head`` (the stem, when nothing is shared) +
    one list per unshared stage; ``individual_extractor``: one Sequential of unshared children per branch.
    """

    def __init__(self, layout: str, model_type: str, share_type: str, ensemble: int):
        super().__init__()
        backbone = getattr(torchvision.models, model_type)(weights=None)
        children = [getattr(backbone, name) for name in STAGES]
        self.layout, self.cut, self.ensemble = layout, SHARED[share_type], ensemble
        self.common_extractor = nn.Sequential(*children[:self.cut])
        self.unshared = [name for name in STAGES[4:] if STAGES.index(name) >= self.cut]
        if layout == "individual_extractor":
            self.individual_extractor = nn.ModuleList(
                nn.Sequential(*copy.deepcopy(children[self.cut:])) for _ in range(ensemble))
        else:
            if self.cut == 0:
                self.head = nn.ModuleList(nn.Sequential(*copy.deepcopy(children[:4])) for _ in range(ensemble))
            for name in self.unshared:
                stage = getattr(backbone, name)
                setattr(self, name, nn.ModuleList(
                    (nn.Sequential(copy.deepcopy(stage)) if layout == "layers" else copy.deepcopy(stage))
                    for _ in range(ensemble)))
        self.classifiers = nn.ModuleList(nn.Linear(backbone.fc.in_features, META) for _ in range(ensemble))

    def branch(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "individual_extractor":
            x = self.individual_extractor[index](x)
        else:
            if self.cut == 0:
                x = self.head[index](x)
            for name in self.unshared:
                x = getattr(self, name)[index](x)
        return self.classifiers[index](F.adaptive_avg_pool2d(x, (1, 1)).view(x.shape[0], -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.common_extractor(x)
        return torch.stack([self.branch(i, shared) for i in range(self.ensemble)], dim=1)


def original_network(layout, model_type, share_type, ensemble, seed=0) -> OriginalNet:
    """A trained-looking network: every tensor (each branch's copy too) moved off its initial value."""
    torch.manual_seed(seed)
    net = OriginalNet(layout, model_type, share_type, ensemble)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            else:
                tensor.copy_(tensor * (1 + 0.2 * torch.randn_like(tensor)) + 0.05 * torch.randn_like(tensor))
    return net.eval()


def save_original_run(root, name, net, images, splits) -> tuple[dict, dict]:
    """The original's ``epochs/<name>_model.pth`` and ``results/<name>_data_base.pth`` under ``root``.

    ``splits`` maps the original's split names to ``(first image, count)``; the images are files under
    ``root/data/`` and the database stores them relative to ``root``, as the original did.
    """
    (root / "epochs").mkdir(parents=True, exist_ok=True)
    (root / "results").mkdir(exist_ok=True)
    torch.save(net.state_dict(), root / "epochs" / f"{name}_model.pth")
    with torch.no_grad():
        features = F.normalize(net(images), dim=-1)
    content, labels = {}, {}
    for split, (start, count) in splits.items():
        labels[split] = [CLASSES[i % len(CLASSES)] for i in range(count)]
        content[f"{split}_images"] = [f"data/{split}/{i:03d}.png" for i in range(count)]
        content[f"{split}_labels"] = labels[split]
        content[f"{split}_features"] = features[start:start + count]
    torch.save(content, root / "results" / f"{name}_data_base.pth")
    return content, labels


def independent_recalls(query, query_labels, gallery, gallery_labels, ks, self_retrieval):
    """Recall@K from the full matrix of mean per-branch cosines, ties to the lower index."""
    scores = torch.einsum("qec,gec->qg", query.double(), gallery.double()) / query.shape[1]
    if self_retrieval:
        scores.fill_diagonal_(float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    hits = torch.tensor(gallery_labels)[order] == torch.tensor(query_labels)[:, None]
    return {k: hits[:, :k].any(dim=1).double().mean().item() for k in ks}


def printed_recalls(text: str) -> dict[int, float]:
    return {int(k): float(v) / 100 for k, v in re.findall(r"recall@(\d+)\s+([\d.]+)%", text)}


CASES = [  # layout, backbone, share type, branches, dataset (isc: query -> gallery)
    ("layers", "resnet18", "layer1", 3, "car"),
    ("head", "resnet18", "none", 2, "cub"),
    ("individual_extractor", "resnet18", "maxpool", 2, "car"),
    ("head", "resnet34", "layer2", 2, "sop"),
    ("individual_extractor", "resnet50", "layer3", 2, "isc"),
    ("individual_extractor", "resnext50_32x4d", "layer4", 3, "car"),
]


@pytest.mark.parametrize("layout, model_type, share_type, ensemble, data_name", CASES)
def test_converted_model_and_database_match_the_original(tmp_path, capsys, layout, model_type, share_type,
                                                         ensemble, data_name):
    name = f"{data_name}_uncropped_fixed_unrandom_{share_type}_{model_type}_{ensemble}_{META}"
    net = original_network(layout, model_type, share_type, ensemble)
    images = torch.randn(24, 3, 32, 32)
    splits = ({"train": (0, 8), "test": (8, 8), "gallery": (16, 8)} if data_name == "isc"
              else {"train": (0, 8), "test": (8, 16)})
    content, labels = save_original_run(tmp_path, name, net, images, splits)

    assert reir(["convert", str(tmp_path / "epochs" / f"{name}_model.pth")]) == 0
    assert reir(["convert", str(tmp_path / "results" / f"{name}_data_base.pth")]) == 0
    model = load_model(tmp_path / "epochs" / f"{name}_model.safetensors")
    assert model.image_size == 256 and model.network.config.share_type == share_type
    with torch.no_grad():
        torch.testing.assert_close(model.network(images), net(images), atol=1e-5, rtol=0)

    database_path = tmp_path / "results" / f"{name}_data_base.safetensors"
    database = load_database(database_path)
    renamed = {"test": "query"} if "gallery" in splits else {}
    for split in splits:
        reir_split = renamed.get(split, split)
        assert torch.equal(database.features[reir_split], content[f"{split}_features"])
        assert database.paths(reir_split) == [str(tmp_path / p) for p in content[f"{split}_images"]]
        assert database.labels(reir_split) == [str(label) for label in labels[split]]

    capsys.readouterr()
    assert reir(["eval", "--data_base", str(database_path), "--no_nmi"]) == 0
    printed = printed_recalls(capsys.readouterr().out)
    gallery = "gallery" if "gallery" in splits else "test"
    expected = independent_recalls(content["test_features"], labels["test"], content[f"{gallery}_features"],
                                   labels[gallery], printed, self_retrieval=gallery == "test")
    assert printed and all(abs(printed[k] - expected[k]) <= 0.00005 for k in printed), (printed, expected)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One small original run (resnet18, layer4 shared, 2 branches) with images on disk."""
    root = tmp_path_factory.mktemp("original_run")
    name = f"car_uncropped_fixed_random_layer4_resnet18_2_{META}"
    net = original_network("individual_extractor", "resnet18", "layer4", 2)
    splits = {"train": (0, 6), "test": (6, 10)}
    generator = torch.Generator().manual_seed(1)
    for split, (_, count) in splits.items():
        (root / "data" / split).mkdir(parents=True)
        for i in range(count):
            pixels = torch.randint(0, 256, (40, 40, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "data" / split / f"{i:03d}.png")
    transform = build_transform(256, (0.4853, 0.4965, 0.4295), (0.2237, 0.2193, 0.2568), False)
    images = torch.stack([transform(Image.open(root / "data" / split / f"{i:03d}.png").convert("RGB"))
                          for split, (_, count) in splits.items() for i in range(count)])
    content, labels = save_original_run(root, name, net, images, splits)
    return root, name, net, content, labels


def test_inference_defaults_convert_the_originals_files_on_the_fly(small_run, tmp_path, capsys, monkeypatch):
    """``inference.py --data_base <name>.pth`` finds the original's database and, for an outside query, its model."""
    from reir.cli.search import main as search

    root, name, _net, _content, _labels = small_run
    work = tmp_path / "run"
    (work / "results").mkdir(parents=True)
    (work / "epochs").mkdir()
    for folder, suffix in (("results", "_data_base.pth"), ("epochs", "_model.pth")):
        (work / folder / f"{name}{suffix}").write_bytes((root / folder / f"{name}{suffix}").read_bytes())
    (work / "data").symlink_to(root / "data")
    monkeypatch.chdir(work)
    outside = root / "data" / "test" / "003.png"  # a file the database holds under another path
    query = tmp_path / "query.png"
    query.write_bytes(outside.read_bytes())

    assert search(["--query_img_name", str(query), "--data_base", f"{name}_data_base.pth", "--json",
                   "--retrieval_num", "3"]) == 0
    out = capsys.readouterr()
    assert "converted the original's database" in out.out and "converted the original's model" in out.out
    assert (work / "results" / f"{name}_data_base.safetensors").is_file()
    assert (work / "epochs" / f"{name}_model.safetensors").is_file()
    report = __import__("json").loads(out.out[out.out.index("{"):])
    # Embedded by the converted model, the copy of test image 3 finds test image 3 first, at similarity 1.
    assert report["results"][0]["path"] == str(work / "data" / "test" / "003.png")
    assert abs(report["results"][0]["score"] - 1) < 1e-5

    assert search(["--query_img_name", str(query), "--data_base", f"{name}_data_base.pth", "--json"]) == 0
    assert "converted" not in capsys.readouterr().out  # the second run reads the converted files


def test_ablation_defaults_convert_both_originals(small_run, tmp_path, capsys, monkeypatch):
    from reir.cli.ablation import main as ablation

    _root, name, _, content, labels = small_run
    (tmp_path / "results").mkdir()
    worse = {**content, "test_features": F.normalize(torch.randn_like(content["test_features"]), dim=-1)}
    better_name, worse_name = f"{name}_data_base.pth", name.replace("fixed", "random") + "_data_base.pth"
    torch.save(content, tmp_path / "results" / better_name)
    torch.save(worse, tmp_path / "results" / worse_name)
    monkeypatch.chdir(tmp_path)
    assert ablation(["--better_data_base", better_name, "--worse_data_base", worse_name, "--retrieval_num", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("converted the original's database") == 2
    counts = {}
    for side, features in (("better", content["test_features"]), ("worse", worse["test_features"])):
        scores = torch.einsum("qec,gec->qg", features.double(), features.double())
        scores.fill_diagonal_(float("-inf"))
        top = scores.argsort(dim=1, descending=True, stable=True)[:, :2]
        counts[side] = (torch.tensor(labels["test"])[top] == torch.tensor(labels["test"])[:, None]).sum(1)
    ge_rate = (counts["better"] >= counts["worse"]).double().mean().item()
    assert f"GE rate: {100 * ge_rate:.2f}%" in out


def _convert(capsys, path, *flags):
    code = reir(["convert", str(path), *flags])
    return code, capsys.readouterr().err.strip()


class RunsCode:
    """A pickle that creates ``marker`` when it is unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path, capsys, zip_format):
    marker = tmp_path / "ran"
    evil = tmp_path / f"car_uncropped_fixed_unrandom_layer4_resnet18_2_{META}_model.pth"
    torch.save({"classifiers.0.weight": RunsCode(marker)}, evil, _use_new_zipfile_serialization=zip_format)
    code, err = _convert(capsys, evil)
    assert code == 1 and re.search(r"holds (io|builtins)\.open\b", err) and "refused" in err
    assert len(err.splitlines()) == 1
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [evil.name]
    torch.load(evil, weights_only=False)  # the file does run code when unpickled: the refusal mattered
    assert marker.exists()


def test_a_module_object_is_refused_by_name(tmp_path, capsys):
    path = tmp_path / "whole_model.pth"
    torch.save(nn.Linear(2, 3), path)
    code, err = _convert(capsys, path)
    assert code == 1 and "torch.nn.modules.linear.Linear" in err and not (tmp_path / "whole_model.safetensors").exists()


def test_extra_keys_wrong_backbone_and_bad_databases_are_refused(small_run, tmp_path, capsys):
    _root, name, net, content, _ = small_run
    state = net.state_dict()
    cases = {
        "extra key": ({**state, "projector.weight": torch.zeros(2)}, name + "_model.pth", (), "'projector.weight'"),
        "wrong backbone": (state, name.replace("resnet18", "resnet34") + "_model.pth", (), "resnet34"),
        "name disagrees": (state, name + "_model.pth", ("--ensemble_size", "5"), "ensemble_size 2"),
        "not a tensor": ({**state, "classifiers.0.bias": [1.0, 2.0, 3.0]}, name + "_model.pth", (),
                         "'classifiers.0.bias'"),
        "database extra key": ({**content, "test_names": ["a"]}, name + "_data_base.pth", (), "'test_names'"),
        "database short list": ({**content, "test_labels": content["test_labels"][:-1]}, name + "_data_base.pth",
                                (), "9 labels"),
        "unnormalised": ({**content, "train_features": 2 * content["train_features"]}, name + "_data_base.pth", (),
                         "not L2-normalised"),
        "neither": ({"weights": torch.zeros(2)}, "other.pth", (), "neither"),
    }
    for case, (payload, file_name, flags, named) in cases.items():
        expected_code = 2 if flags else 1  # a flag that contradicts the file is a usage error
        folder = tmp_path / case.replace(" ", "_")
        folder.mkdir()
        torch.save(payload, folder / file_name)
        code, err = _convert(capsys, folder / file_name, *flags)
        assert code == expected_code and named in err and len(err.splitlines()) == 1, (case, err)
        assert [p.name for p in folder.iterdir()] == [file_name], case


def test_convert_keeps_an_existing_output(small_run, tmp_path, capsys):
    root, name, _, _, _ = small_run
    source = tmp_path / f"{name}_model.pth"
    source.write_bytes((root / "epochs" / f"{name}_model.pth").read_bytes())
    existing = tmp_path / f"{name}_model.safetensors"
    existing.write_bytes(b"earlier")
    code, err = _convert(capsys, source)
    assert code == 2 and "--overwrite" in err and existing.read_bytes() == b"earlier"
    assert _convert(capsys, source, "--overwrite")[0] == 0 and load_model(existing).network.config.with_random


def test_a_state_dict_without_batch_counters_converts(small_run, tmp_path):
    """Files from PyTorch before 0.4.1 lack ``num_batches_tracked``, which evaluation never reads."""
    _, name, net, _, _ = small_run
    path = tmp_path / f"{name}_model.pth"
    torch.save({k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    assert reir(["convert", str(path)]) == 0
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / f"{name}_model.safetensors").network(images), net(images),
                                   atol=1e-5, rtol=0)
