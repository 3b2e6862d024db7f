"""The Python API: its exports, load_model without a database, embed from every input kind, Index,
evaluate and evaluate_database."""

import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import reir
from conftest import REPO
from reir.errors import ReirError
from reir.retrieval.database import load_database
from reir.retrieval.similarity import knn


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
    with pytest.raises(ReirError, match=r"broken\.png cannot be read"):
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


def test_evaluate_matches_the_database_metrics(db, served_model):
    stored = {k: v for k, v in db.info["metrics"].items() if v is not None}
    from_database = reir.evaluate_database(db, recalls=[1, 2, 4, 8], with_nmi=False)
    from_path = reir.evaluate_database(served_model.database, recalls=[1, 2, 4, 8], with_nmi=False)
    from_features = reir.evaluate(db.features["test"], db.labels("test"), recalls=[1, 2, 4, 8], with_nmi=False)
    for key, value in stored.items():
        if key != "nmi":
            assert from_database[key] == pytest.approx(value) and from_features[key] == pytest.approx(value)
    assert from_path == from_database
    with pytest.raises(ReirError, match="needs labels"):
        reir.evaluate(db.features["test"])
    for database in (db, served_model.database, str(served_model.database)):
        with pytest.raises(ReirError, match="for a database use evaluate_database"):
            reir.evaluate(database)


def test_the_public_api_is_every_name_a_user_reaches_for():
    """Each exported name is the object its module defines (not a copy), and ``dir``-less access works."""
    import importlib

    from reir.model.files import Model
    from reir.retrieval.database import load_database as library_load_database
    from reir.retrieval.results import Results
    from reir.training.config import TrainConfig
    from reir.training.train import train

    expected = {"train", "TrainConfig", "Results", "load_database", "evaluate", "evaluate_database",
                "load_model", "embed", "Index"}
    assert expected <= set(reir.__all__)
    for name in reir.__all__:
        module = importlib.import_module(reir._API[name])
        assert getattr(reir, name) is getattr(module, name)
        assert getattr(reir, name).__module__ == reir._API[name], name
    assert (reir.train, reir.TrainConfig, reir.Results, reir.load_database, reir.Model) == (
        train, TrainConfig, Results, library_load_database, Model)
    with pytest.raises(AttributeError, match="no_such_name"):
        reir.no_such_name  # noqa: B018 - the attribute access is what must raise


def test_a_model_keeps_its_run_settings_apart_from_its_network_configuration(model, db):
    """``run_config``: the training run's settings (a dict, as the database records them);
    ``network.config``: the network's own ``ModelConfig``."""
    from reir.model.network import ModelConfig

    assert isinstance(model.network.config, ModelConfig) and isinstance(model.run_config, dict)
    assert model.run_config["data_name"] == db.config["data_name"]
    assert model.run_config["ensemble_size"] == model.network.config.ensemble_size
    assert not hasattr(model, "config")


def test_search_results_unpack_as_scores_and_ids(db):
    """Documented API: ``scores, ids = index.search(...)`` (README) is the pair the ``Results`` holds."""
    features = db.features["test"]
    results = reir.Index.build(features).search(features[:4], k=3)
    assert isinstance(results, reir.Results)
    scores, ids = results
    assert scores is results.scores and ids is results.gallery_ids
