"""``reir export``: the embedding network as ONNX or TorchScript, checked against PyTorch.

The exported graph takes a batch of images already resized to the model's square size and
normalised with its mean and std (both written to ``<output>.json``) and returns the
embeddings ``[batch, ensemble, meta]``, every branch L2-normalised, exactly what
:func:`reir.embed` returns; the batch size is free. After writing, the file is loaded back
(onnxruntime for ONNX, after linking or copying the files to another folder, so an ONNX file whose
weights lie in ``<output>.data`` beside it is checked as it will be deployed) and run on a batch of a
different size than the export used; the largest absolute difference from PyTorch is printed and
must stay under ``--tolerance``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from reir.model.files import Model
from reir.errors import ReirError
from reir.fileio import atomic_files, atomic_write, atomic_write_with
from reir.model.network import embedding_from_logits

FORMATS = ("onnx", "torchscript")
# One protobuf file holds at most 2 GiB; larger weights go to a companion file, the graph stays small.
EXTERNAL_DATA_ABOVE = 1.75 * 2**30
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}


class EmbeddingNetwork(nn.Module):
    """Normalised images -> per-branch L2-normalised embeddings, the whole inference in one graph."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return embedding_from_logits(self.network(images))


def parameter_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def example_images(model: Model, batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, model.image_size, model.image_size, generator=generator)


@contextlib.contextmanager
def quiet():
    """The exporters' progress lines and deprecation warnings are not the user's business."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def export_onnx(wrapper: EmbeddingNetwork, example: torch.Tensor, output: Path, external_data: bool) -> list[Path]:
    """``output``, and with ``external_data`` its weights in ``<output>.data`` beside it; returns both."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    companion = Path(f"{output}.data")
    with quiet(), atomic_files(output) as staged:
        torch.onnx.export(wrapper, (example,), str(staged), input_names=["images"], output_names=["embeddings"],
                          dynamic_shapes={"images": {0: batch}}, dynamo=True, external_data=external_data)
        written = Path(f"{staged}.data").is_file()
    if not written:
        companion.unlink(missing_ok=True)  # an earlier export's weights, which this .onnx does not use
    return [output, companion] if written else [output]


def run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    try:
        import onnxruntime
    except ImportError:
        raise ReirError("the ONNX parity check needs onnxruntime; pip install onnxruntime") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["embeddings"], {"images": images.numpy()})[0])


def run_moved_onnx(files: list[Path], images: torch.Tensor) -> torch.Tensor:
    """Run the written files from another folder, as whoever deploys them will."""
    with tempfile.TemporaryDirectory(prefix="reir-export-check-") as other:
        for file in files:
            try:
                os.link(file, Path(other) / file.name)
            except OSError:  # another file system
                shutil.copyfile(file, Path(other) / file.name)
        return run_onnx(Path(other) / files[0].name, images)


def export_torchscript(wrapper: EmbeddingNetwork, example: torch.Tensor, output: Path) -> None:
    with quiet():
        traced = torch.jit.trace(wrapper, example)
        atomic_write_with(output, lambda path: torch.jit.save(traced, path))


def run_torchscript(path: Path, images: torch.Tensor) -> torch.Tensor:
    with quiet():
        return torch.jit.load(str(path), map_location="cpu")(images)


def export(model: Model, export_format: str, output: Path, external_data: bool | None = None) -> float:
    """Write ``output`` and its preprocessing JSON; returns the parity check's max absolute difference.

    ONNX weights go to ``<output>.data`` when ``external_data`` is true, or by default when the
    model is too large for one protobuf file.
    """
    if export_format not in FORMATS:
        raise ReirError(f"--format {export_format!r} is unknown; choose {' or '.join(FORMATS)}", 2)
    wrapper = EmbeddingNetwork(model.network.cpu()).eval()
    example, check = example_images(model, 2, 0), example_images(model, 5, 1)
    with torch.no_grad():
        try:
            if export_format == "onnx":
                if external_data is None:
                    external_data = parameter_bytes(wrapper) > EXTERNAL_DATA_ABOVE
                files = export_onnx(wrapper, example, output, external_data)
                exported = run_moved_onnx(files, check)
            else:
                export_torchscript(wrapper, example, output)
                files = [output]
                exported = run_torchscript(output, check)
        except ReirError:
            raise
        except Exception as exc:  # noqa: BLE001 - exporter failures are many kinds; name the first line
            raise ReirError(f"{export_format} export failed ({type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
        reference = wrapper(check)
    ensemble, meta = model.embedding_shape
    atomic_write(Path(f"{output}.json"), json.dumps({
        "format": export_format, "model_file": str(Path(model.path).resolve()),
        "files": [file.name for file in files], "external_data": files[1].name if len(files) > 1 else None,
        "input": "images",
        "input_shape": ["batch", 3, model.image_size, model.image_size], "output": "embeddings",
        "output_shape": ["batch", ensemble, meta], "image_size": model.image_size, "mean": model.mean,
        "std": model.std, "preprocessing": "RGB, resize to image_size x image_size, scale to [0, 1], "
                                           "subtract mean and divide by std per channel",
        "similarity": "sum over branches of the dot products, divided by the ensemble size"}, indent=1) + "\n")
    return (exported - reference).abs().max().item()
