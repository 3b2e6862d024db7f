"""The Python API: load_model without a database, embed from every input kind, Index, evaluate."""

import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import reir
from reir.errors import ReirError
from reir.retrieval.database import load_database
from reir.retrieval.similarity import knn

from conftest import REPO


@pytest.fixture(scope="module")
def model(served_model):
    return reir.load_model(served_model.model)


@pytest.fixture(scope="module")
def db(served_model):
    return load_database(served_model.database)


def test_import_is_light_and_exports_the_api():
    code = "import sys, reir; print('torch' in sys.modules); print(reir.load_model.__module__, reir.Index.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.split() == ["False", "reir.model.files", "Index"]


def test_embed_reproduces_the_training_database(model, db):
    """Same preprocessing and network as training: the database's own test features come back."""
    paths = db.paths("test")
    features = reir.embed(model, paths, batch_size=7)
    assert features.shape == db.features["test"].shape
    assert torch.allclose(features, db.features["test"], atol=1e-5)


def test_every_input_kind_gives_the_same_embeddings(model, db, served_model):
    paths = sorted(db.paths("test"))[:6]
    by_path = reir.embed(model, paths)
    by_pil = reir.embed(model, [Image.open(p) for p in paths])
    loader = DataLoader([(model.transform(Image.open(p).convert("RGB")), 0) for p in paths], batch_size=4)
    by_loader = reir.embed(model, loader)
    assert torch.allclose(by_path, by_pil, atol=1e-5) and torch.allclose(by_path, by_loader, atol=1e-5)
    folder = reir.embed(model, served_model.images)
    assert len(folder) == sum(len(db.paths(s)) for s in db.splits)
    assert torch.allclose(reir.embed(model, paths[0]), by_path[:1], atol=1e-5)


def test_embed_names_an_unreadable_image(model, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ReirError, match="broken.png cannot be read"):
        reir.embed(model, [bad])


def test_load_model_refuses_other_files(db, served_model, tmp_path):
    with pytest.raises(ReirError, match="not a REIR model"):
        reir.load_model(served_model.database)
    pickle = tmp_path / "model.safetensors"
    pickle.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ReirError, match="not a REIR safetensors file"):
        reir.load_model(pickle)


def test_exact_index_ranks_like_knn_and_survives_save_load(db, tmp_path):
    features = db.features["test"]
    index = reir.Index.build(features, db.paths("test"), db.labels("test"))
    scores, ids = index.search(features[:9], k=5)
    expected_scores, expected_ids = knn(features[:9], features, 5)
    assert torch.equal(ids, expected_ids) and torch.allclose(scores, expected_scores)
    index.save(tmp_path / "test.faiss")
    loaded = reir.Index.load(tmp_path / "test.faiss")
    assert loaded.paths == db.paths("test") and loaded.labels == db.labels("test")
    assert torch.equal(loaded.search(features[:9], k=5).gallery_ids, expected_ids)


def test_add_grows_the_index_and_checks_dimensions(db):
    features = db.features["test"]
    index = reir.Index.build(features[:10])
    index.add(features[10:], labels=db.labels("test")[10:])
    assert len(index) == len(features) and len(index.labels) == len(features)
    assert torch.equal(index.search(features[:3], 4).gallery_ids, knn(features[:3], features, 4).gallery_ids)
    with pytest.raises(ReirError, match="dimension"):
        index.add(torch.randn(2, 5))


def test_approximate_index_is_trained_and_finds_the_neighbours():
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(600, 4, 6), dim=-1)
    index = reir.Index.build(features, factory="IVF4,Flat")
    index.tune(nprobe=4)  # every list searched: exact answers
    assert torch.equal(index.search(features[:20], 5).gallery_ids, knn(features[:20], features, 5).gallery_ids)
    with pytest.raises(ReirError, match="cannot train"):
        reir.Index.build(features[:10], factory="IVF64,Flat")
    with pytest.raises(ReirError, match="not a FAISS factory string"):
        reir.Index.build(features, factory="NoSuchIndex")


def test_evaluate_matches_the_database_metrics(db):
    stored = {k: v for k, v in db.info["metrics"].items() if v is not None}
    from_database = reir.evaluate(db, recalls=[1, 2, 4, 8], with_nmi=False)
    from_features = reir.evaluate(db.features["test"], db.labels("test"), recalls=[1, 2, 4, 8], with_nmi=False)
    for key, value in stored.items():
        if key != "nmi":
            assert from_database[key] == pytest.approx(value) and from_features[key] == pytest.approx(value)
    with pytest.raises(ReirError, match="needs labels"):
        reir.evaluate(db.features["test"])
