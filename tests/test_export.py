"""reir export: ONNX (run by onnxruntime) and TorchScript give the embeddings reir.embed gives."""

import json
import re

import pytest
import torch

import reir
from conftest import run_script
from reir.retrieval.database import load_database


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.slow
@pytest.mark.parametrize("export_format", ["onnx", "torchscript"])
def test_export_matches_pytorch(served_model, tmp_path, export_format):
    output = tmp_path / f"model.{export_format}"
    result = run_script("reir", "export", "--model", str(served_model.model), "--format", export_format,
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
    result = run_script("reir", "export", "--model", str(served_model.model), "--format", "onnx",
                        "--output", str(served_model.model))
    assert result.returncode == 2 and "overwrite the model" in result.stderr and result.stderr.count("\n") == 1
