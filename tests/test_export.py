"""reir export: ONNX (run by onnxruntime) and TorchScript give the embeddings reir.embed gives."""

import hashlib
import json
import re

import pytest
import torch

import reir
from conftest import run_reir
from reir.retrieval.database import load_database


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.slow
@pytest.mark.parametrize("export_format", ["onnx", "torchscript"])
def test_export_matches_pytorch(served_model, tmp_path, export_format):
    output = tmp_path / f"model.{export_format}"
    result = run_reir("export", "--model", str(served_model.model), "--format", export_format,
                        "--output", str(output))
    assert result.returncode == 0, result.stderr
    difference = float(re.search(r"max abs diff ([\d.e+-]+)", result.stdout).group(1))
    assert difference <= 1e-4
    meta = json.loads((tmp_path / f"model.{export_format}.json").read_text())
    model = reir.load_model(served_model.model)
    assert meta["image_size"] == model.image_size and meta["mean"] == model.mean

    paths = load_database(served_model.database).paths("test")[:7]
    from PIL import Image

    images = torch.stack([model.transform(Image.open(p).convert("RGB")) for p in paths])
    if export_format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        exported = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    else:
        exported = torch.jit.load(str(output))(images)
    assert torch.allclose(exported, reir.embed(model, paths), atol=1e-4)


def test_export_refuses_to_overwrite_the_model(served_model):
    result = run_reir("export", "--model", str(served_model.model), "--format", "onnx",
                        "--output", str(served_model.model))
    assert result.returncode == 2 and "is the input" in result.stderr and result.stderr.count("\n") == 1


def test_onnx_weights_in_a_companion_file_travel_with_the_graph(served_model, tmp_path):
    """External weights (forced here; automatic above 2 GiB) are written under their final name, listed in
    the JSON, and a copy of the three files in another folder gives the embeddings of the model."""
    import shutil

    import onnxruntime

    from reir.model.export import example_images, export
    from reir.model.network import embedding_from_logits

    model = reir.load_model(served_model.model)
    output = tmp_path / "exported" / "model.onnx"
    difference, files = export(model, "onnx", output, external_data=True)
    assert difference <= 1e-4
    data = files[1]
    assert re.fullmatch(r"model\.onnx\.[0-9a-f]{16}\.data", data.name) and files == [output, data]
    assert sorted(p.name for p in output.parent.iterdir()) == sorted(["model.onnx", data.name, "model.onnx.json"])
    meta = json.loads((tmp_path / "exported" / "model.onnx.json").read_text())
    assert meta["files"] == ["model.onnx", data.name] and meta["external_data"] == data.name
    assert meta["sha256"] == hashlib.sha256(output.read_bytes()).hexdigest()
    # The graph holds no weights: they are in the companion.
    weights = sum(v.numel() * v.element_size() for v in model.network.state_dict().values())
    assert output.stat().st_size < weights / 4 < data.stat().st_size
    moved = shutil.copytree(output.parent, tmp_path / "elsewhere")
    shutil.rmtree(output.parent)
    images = example_images(model, 3, 7)
    session = onnxruntime.InferenceSession(str(moved / "model.onnx"), providers=["CPUExecutionProvider"])
    exported = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    with torch.no_grad():
        expected = embedding_from_logits(model.network.eval()(images))
    assert torch.allclose(exported, expected, atol=1e-4)
    # Exported again without external weights, the stale companion goes.
    export(model, "onnx", moved / "model.onnx", external_data=False)
    assert not (moved / data.name).exists()
    assert not any(p.name.startswith(".") for p in moved.iterdir())
