"""The one path from images to embeddings, and the one image reader it shares with training and the service."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import reir
from reir.data.images import ImageError, ImageList, build_transform, read_image
from reir.data.splits import load_split_list, split_list_path
from reir.errors import ReirError
from reir.model.embedding import embed
from reir.model.network import ModelConfig, create_model
from reir.training.precision import precision_for
from reir.training.train import embed_split


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return create_model(ModelConfig("resnet18", "layer2", 3, 4, with_random=True), weights="none")


def reference(network, images: torch.Tensor) -> torch.Tensor:
    """Independent of the embedding module: an eval-mode forward pass, each branch normalised."""
    network.eval()
    with torch.no_grad():
        return F.normalize(network(images), dim=-1)


def test_every_entry_point_gives_the_reference_embedding(network):
    images = torch.randn(10, 3, 32, 32)
    expected = reference(network, images)
    network.train()
    loader = DataLoader(TensorDataset(images, torch.zeros(10, dtype=torch.long)), batch_size=4)
    from_loader = embed(network, loader)
    assert network.training, "the caller's mode is kept"
    torch.testing.assert_close(from_loader, expected)
    torch.testing.assert_close(embed(network, images), expected)
    calls = []
    torch.testing.assert_close(embed_split(network, loader, torch.device("cpu"), "Embed test", None,
                                           lambda: calls.append(1)), expected)
    assert len(calls) == 3, "after_batch runs once per batch"


def test_autocast_covers_the_forward_pass_only(network):
    images = torch.randn(6, 3, 32, 32)
    mixed = embed(network, images, precision=precision_for("bf16", torch.device("cpu")))
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed.norm(dim=-1), torch.ones(6, 3))
    assert (mixed - reference(network, images)).abs().max() < 0.1


def test_progress_counts_images(network):
    class Bar:
        seen = 0

        def update(self, count):
            self.seen += count

    bar = Bar()
    embed(network, DataLoader(TensorDataset(torch.randn(7, 3, 32, 32)), batch_size=3), progress=bar)
    assert bar.seen == 7


def test_files_need_the_models_preprocessing(network, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ReirError, match="preprocessing"):
        embed(network, [tmp_path / "a.png"])


def test_unreadable_images_are_skipped_and_listed_when_asked(served_model, tmp_path):
    model = reir.load_model(served_model.model)
    good = sorted(served_model.images.iterdir())[:3]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"no image")
    failures = []
    features = embed(model, [good[0], bad, good[1], tmp_path / "gone.png", good[2]], unreadable=failures,
                     batch_size=2)
    assert [position for position, _ in failures] == [1, 3]
    assert "bad.png cannot be read" in failures[0][1] and "gone.png does not exist" in failures[1][1]
    torch.testing.assert_close(features, embed(model, good))
    with pytest.raises(ReirError, match=r"bad\.png cannot be read"):
        embed(model, [good[0], bad])


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_reader_guards_and_names_each_problem(tmp_path, monkeypatch):
    data = png(300, 200)
    assert read_image(data).size == (300, 200) and read_image(data).mode == "RGB"
    with pytest.raises(ImageError, match="300x200 pixels") as caught:
        read_image(data, max_pixels=50_000)
    assert caught.value.kind == "too_large" and caught.value.size == (300, 200)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # PIL's bomb limit: errors above twice this
    with pytest.raises(ImageError, match="too many pixels") as caught:
        read_image(data)
    assert caught.value.kind == "too_large"
    monkeypatch.undo()
    problems = {"not_image": b"plain text", "unreadable": data[:60]}
    for kind, payload in problems.items():
        with pytest.raises(ImageError) as caught:
            read_image(payload)
        assert caught.value.kind == kind, caught.value
    with pytest.raises(ImageError, match="does not exist") as caught:
        read_image(tmp_path / "missing.png")
    assert caught.value.kind == "missing"


def test_training_images_go_through_the_reader(small_digits_root, monkeypatch):
    split_list = load_split_list(split_list_path(small_digits_root, "digits", "uncropped"))
    images = ImageList(split_list, "train", build_transform(8, [0.5] * 3, [0.5] * 3, False))
    assert images[0][0].shape == (3, 8, 8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 8x8 digits exceed twice this
    with pytest.raises(ReirError, match="too many pixels to decode safely; replace it or prepare with `skip_bad`"):
        images[0]
