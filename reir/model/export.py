"""``reir export``: the embedding network as ONNX or TorchScript, checked against PyTorch.

The exported graph takes a batch of images already resized to the model's square size and
normalised with its mean and std (both written to ``<output>.json``) and returns the
embeddings ``[batch, ensemble, meta]``, every branch L2-normalised, exactly what
:func:`reir.embed` returns; the batch size is free. After writing, the file is loaded back
(onnxruntime for ONNX, after linking or copying the files to another folder, so an ONNX file whose
weights lie in ``<output>.data`` beside it is checked as it will be deployed) and run on a batch of a
different size than the export used; the largest absolute difference from PyTorch is printed and
must stay under the command's tolerance.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from reir.errors import ReirError, UsageError
from reir.fileio import atomic_files, file_sha256
from reir.model.files import Model
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
    """``output``, and with ``external_data`` its weights beside it; returns the files written.

    The weights file is named by its content (``<output>.<sha256 prefix>.data``) and the graph is
    pointed at that name, so a new export never writes over the weights an earlier graph still uses.
    """
    batch = torch.export.Dim("batch", min=1, max=65536)
    with quiet():
        torch.onnx.export(wrapper, (example,), str(output), input_names=["images"], output_names=["embeddings"],
                          dynamic_shapes={"images": {0: batch}}, dynamo=True, external_data=external_data)
    exported_weights = Path(f"{output}.data")
    if not exported_weights.is_file():
        return [output]
    weights = output.with_name(f"{output.name}.{file_sha256(exported_weights)[:16]}.data")
    exported_weights.rename(weights)
    _point_graph_at(output, exported_weights.name, weights.name)
    return [output, weights]


def _point_graph_at(graph_file: Path, old_name: str, new_name: str) -> None:
    """Rename the external data file the graph's initializers name (the weights themselves stay put)."""
    import onnx

    graph = onnx.load(str(graph_file), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old_name:
                entry.value = new_name
    onnx.save(graph, str(graph_file))


def stale_weights(output: Path, kept: list[Path]) -> list[Path]:
    """Weights files of earlier exports to ``output`` that the new graph does not use."""
    names = {file.name for file in kept}
    candidates = [Path(f"{output}.data"), *output.parent.glob(f"{glob.escape(output.name)}.*.data")]
    return [file for file in candidates if file.is_file() and file.name not in names]


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
        torch.jit.save(torch.jit.trace(wrapper, example), str(output))


def run_torchscript(path: Path, images: torch.Tensor) -> torch.Tensor:
    with quiet():
        return torch.jit.load(str(path), map_location="cpu")(images)


def export(model: Model, export_format: str, output: Path,
           external_data: bool | None = None) -> tuple[float, list[Path]]:
    """Write ``output`` and its preprocessing JSON; returns the parity check's max absolute difference and
    the files of the exported network.

    ONNX weights go to a file beside ``output`` when ``external_data`` is true, or by default when the
    model is too large for one protobuf file. Everything is written and checked in a hidden folder,
    then published weights first, the network next and ``<output>.json`` last; the JSON names the
    files and the SHA-256 of the network it describes, so a crash between the last two renames is
    seen as a JSON that does not describe the network beside it.
    """
    if export_format not in FORMATS:
        raise UsageError(f"`export_format` {export_format!r} is unknown; choose {' or '.join(FORMATS)}")
    wrapper = EmbeddingNetwork(model.network.cpu()).eval()
    example, check = example_images(model, 2, 0), example_images(model, 5, 1)
    record = Path(f"{output}.json")
    with torch.no_grad(), atomic_files(output, record=record.name) as staged:
        try:
            if export_format == "onnx":
                if external_data is None:
                    external_data = parameter_bytes(wrapper) > EXTERNAL_DATA_ABOVE
                files = export_onnx(wrapper, example, staged, external_data)
                exported = run_moved_onnx(files, check)
            else:
                export_torchscript(wrapper, example, staged)
                files = [staged]
                exported = run_torchscript(staged, check)
        except ReirError:
            raise
        except Exception as exc:  # noqa: BLE001 - exporter failures are many kinds; name the first line
            raise ReirError(f"{export_format} export failed ({type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
        reference = wrapper(check)
        ensemble, meta = model.embedding_shape
        staged.with_name(record.name).write_text(json.dumps({
            "format": export_format, "model_file": str(model.file().resolve()),
            "files": [file.name for file in files], "external_data": files[1].name if len(files) > 1 else None,
            "sha256": file_sha256(staged),
            "input": "images",
            "input_shape": ["batch", 3, model.image_size, model.image_size], "output": "embeddings",
            "output_shape": ["batch", ensemble, meta], "image_size": model.image_size, "mean": model.mean,
            "std": model.std, "preprocessing": "RGB, resize to image_size x image_size, scale to [0, 1], "
                                               "subtract mean and divide by std per channel",
            "similarity": "sum over branches of the dot products, divided by the ensemble size"}, indent=1) + "\n",
            encoding="utf-8")
    published = [output.with_name(file.name) for file in files]
    for stale in stale_weights(output, published):
        stale.unlink()
    return (exported - reference).abs().max().item(), published
