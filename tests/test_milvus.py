"""The Milvus backend against FAISS and exact search, each test on Milvus Lite (in-process, a file under
tmp_path) and on the Milvus standalone server (tests/milvus_server.py, a database of its own)."""

import contextlib
import re
import subprocess
import sys

import httpx
import pytest
import torch

from conftest import REPO, run_reir, run_script
from reir.retrieval.backends import build_index, open_index
from reir.retrieval.database import Database
from reir.retrieval.index import Index

COUNT, ENSEMBLE, META = 10_000, 16, 12


@pytest.fixture(autouse=True)
def no_server_left():
    """Every Milvus Lite server a test starts is stopped by the time it ends."""
    from milvus_lite.server_manager import server_manager_instance

    yield
    running = list(server_manager_instance._servers)
    assert not running, f"Milvus Lite still running for {running}"


def reir_like(count, seed):
    """Per-branch L2-normalised embeddings, a few of them exact duplicates (ties)."""
    features = torch.nn.functional.normalize(torch.randn(count, ENSEMBLE, META,
                                                         generator=torch.Generator().manual_seed(seed)), dim=-1)
    features[1::997] = features[0]
    return features


def test_flat_collection_gives_faiss_flat_ids_and_scores(milvus_uri):
    features = reir_like(COUNT, 0)
    queries = torch.cat([features[:3], reir_like(97, 1)])
    paths = [f"/images/{i:05d}.jpg" for i in range(COUNT)]
    labels = [str(i % 7) for i in range(COUNT)]
    milvus = build_index(features, paths, labels, backend="milvus", uri=milvus_uri, collection="c")
    try:
        faiss_flat = Index.build(features, paths, labels, "Flat")
        k = 10
        found_scores, found_ids = milvus.search(queries, k)
        exact_scores, exact_ids = faiss_flat.search(queries, k)
        assert found_scores.shape == exact_scores.shape == (len(queries), k)
        torch.testing.assert_close(found_scores, exact_scores, atol=1e-5, rtol=0)
        # each returned score is the true inner product of that id, computed here independently
        vectors = features.reshape(COUNT, -1) / ENSEMBLE ** 0.5
        flat_queries = queries.reshape(len(queries), -1) / ENSEMBLE ** 0.5
        truth = flat_queries @ vectors.T
        torch.testing.assert_close(found_scores, truth.gather(1, found_ids), atol=1e-5, rtol=0)
        # same ids in the same order, except among scores equal within float tolerance
        tied = torch.zeros_like(exact_scores, dtype=torch.bool)
        close = (exact_scores[:, 1:] - exact_scores[:, :-1]).abs() < 1e-5
        tied[:, 1:] |= close
        tied[:, :-1] |= close
        assert torch.equal(found_ids[~tied], exact_ids[~tied])
        assert tied[:3].any() and (~tied).sum() > 0.9 * tied.numel()  # the duplicates tie; most do not
        for row in range(len(queries)):  # tied groups hold the same ids, whatever their order
            kth = exact_scores[row, -1]
            inside = ~tied[row] | (exact_scores[row] > kth + 1e-5)
            assert set(found_ids[row][inside].tolist()) == set(exact_ids[row][inside].tolist())
        assert [milvus.paths[i] for i in found_ids[5].tolist()] == [paths[i] for i in found_ids[5].tolist()]
        assert milvus.labels[1234] == labels[1234] and len(milvus) == COUNT and milvus.exact
    finally:
        milvus.close()


def recall_printed(stdout: str) -> float:
    found = re.search(r"Recall@10 against exact search: ([\d.]+)% on (\d+) queries; ([\d,]+) queries/s "
                      r"\(milvus HNSW\) vs ([\d,]+) \(exact\)", stdout)
    assert found, stdout
    return float(found.group(1))


def test_the_recall_reir_index_prints_is_the_served_collections(milvus_uri, tmp_path):
    """What ``reir index`` measures is the index the collection then serves: built, flushed, indexed and
    loaded, with the recorded ``ef`` applied when reopened. On a server a collection searched before its
    flush was searched exhaustively (100 % printed, ~25 % served by this sparse HNSW); Milvus Lite served
    97 % after reopening what it had measured at 99.97 %. The server's HNSW search itself varies by about a
    point from one search to the next, hence the tolerance."""
    from reir.retrieval.index_quality import recall_against_exact, streamed_queries

    features, count, queries = reir_like(5000, 3), 5000, 300
    database = tmp_path / "random_data_base.safetensors"
    Database({"test": features}, {"test": {"paths": [f"/r/{i}.png" for i in range(count)], "labels": ["x"] * count}},
             {}, {}).save(database)
    result = run_reir("index", "--data_base", str(database), "--backend", "milvus", "--uri", milvus_uri,
                      "--collection", "random", "--index_type", "HNSW", "--index_params", "M=8,efConstruction=16",
                      "--efSearch", "10", "--queries", str(queries))
    assert result.returncode == 0, result.stderr
    assert re.search(rf"Indexed {count} images \(test\) of dimension 192 with milvus HNSW", result.stdout)
    printed = recall_printed(result.stdout)
    sample = streamed_queries(database, ["test"], count, queries)
    _, exact = Index.build(features).search(sample, 10)
    opened = open_index("milvus", uri=milvus_uri, collection="random")
    try:
        assert opened.search_parameters == {"ef": 10}
        assert opened.info["index_parameters"] == {"M": 8, "efConstruction": 16}
        served = 100 * recall_against_exact(opened.search(sample, 10).gallery_ids, exact)
        assert served == pytest.approx(printed, abs=2) and served < 99, (printed, served)
        opened.tune(efSearch=400)
        assert 100 * recall_against_exact(opened.search(sample, 10).gallery_ids, exact) > served + 2
    finally:
        opened.close()


@pytest.mark.parametrize("args, message", [
    (["--backend", "milvus"], "--backend milvus needs --uri"),
    (["--backend", "milvus", "--uri", "somewhere.sqlite"], "neither a Milvus Lite file"),
    (["--backend", "milvus", "--uri", "x.db", "--index_type", "ANNOY"], "is not one of FLAT, HNSW"),
    (["--uri", "x.db"], "are for --backend milvus"),
])
def test_bad_milvus_options_are_one_line(served_model, tmp_path, args, message):
    result = run_reir("index", "--data_base", str(served_model.database), *args, cwd=tmp_path)
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "x.db").exists()


def test_an_unreachable_server_is_one_line(served_model):
    unreachable = run_reir("index", "--data_base", str(served_model.database), "--backend", "milvus",
                           "--uri", "http://127.0.0.1:1", "--collection", "digits")
    assert unreachable.returncode != 0 and unreachable.stderr.count("\n") == 1, unreachable.stderr
    assert "cannot reach Milvus at http://127.0.0.1:1" in unreachable.stderr


def test_a_server_refuses_missing_or_wrong_credentials_in_one_line(served_model, milvus_server, monkeypatch):
    """The session's server requires credentials, as a deployment would; REIR sends MILVUS_TOKEN's."""
    from reir.retrieval.milvus import TOKEN_VARIABLE

    for token, reason in ((None, "missing authorization"), ("root:wrong", "auth check failure")):
        if token is None:
            monkeypatch.delenv(TOKEN_VARIABLE)
        else:
            monkeypatch.setenv(TOKEN_VARIABLE, token)
        refused = run_reir("index", "--data_base", str(served_model.database), "--backend", "milvus",
                           "--uri", milvus_server, "--collection", "digits")
        assert refused.returncode != 0 and refused.stderr.count("\n") == 1, refused.stderr
        assert f"Milvus at {milvus_server} refused the credentials ({reason}" in refused.stderr, refused.stderr
        assert f"set {TOKEN_VARIABLE} to user:password" in refused.stderr


def test_a_collection_by_uri_answers_like_faiss_flat_and_reir_serve_serves_every_image(served_model, milvus_uri,
                                                                                       tmp_path):
    """``reir index`` writes only at the URI; the collection answers like FAISS Flat; ``reir serve`` serves the
    collection's rows (a server's statistics count none until a flush) and a search for all finds each one."""
    from reir.retrieval.database import load_database

    here = tmp_path / "here"
    here.mkdir()
    indexed = run_reir("index", "--data_base", str(served_model.database), "--backend", "milvus",
                       "--uri", milvus_uri, "--collection", "digits", cwd=here)
    assert indexed.returncode == 0, indexed.stderr
    assert f"collection digits at {milvus_uri}" in indexed.stdout and not list(here.iterdir())  # all at the URI
    database = load_database(served_model.database)
    count = len(database.paths("test"))
    flat = Index.from_database(database, factory="Flat")
    opened = open_index("milvus", uri=milvus_uri, collection="digits")
    try:
        scores, ids = opened.search(database.features["test"][:7], 5)
        exact_scores, exact_ids = flat.search(database.features["test"][:7], 5)
        torch.testing.assert_close(scores, exact_scores, atol=1e-5, rtol=0)
        assert torch.equal(ids[:, 0], exact_ids[:, 0])
        assert opened.root == flat.root == str(served_model.images) and len(opened) == len(flat) == count
    finally:
        opened.close()
    server = subprocess.Popen([sys.executable, "-m", "reir", "serve", "--backend", "milvus", "--uri", milvus_uri,
                               "--collection", "digits", "--port", "0"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()
        found = re.search(r"Serving (\d+) images \(milvus FLAT\) at (http://127\.0\.0\.1:\d+)/", line)
        assert found and int(found.group(1)) == count, line + (server.stdout.read() if server.poll() else "")
        info = httpx.get(f"{found.group(2)}/info", timeout=60).json()
        assert info["images"] == count and info["labelled"] is True
        with open(served_model.images / sorted(p.name for p in served_model.images.iterdir())[0], "rb") as image:
            response = httpx.post(f"{found.group(2)}/search", files={"image": ("q.png", image, "image/png")},
                                  data={"k": str(count)}, timeout=60)
        assert response.status_code == 200, response.text
        assert sorted(r["id"] for r in response.json()["results"]) == list(range(count))
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_reir_serve_refuses_an_empty_collection(served_model, milvus_uri):
    from reir.retrieval.milvus import MilvusIndex

    empty = MilvusIndex.create(milvus_uri, "empty", 12, info={"model_file": str(served_model.model)})
    empty.publish()
    empty.close()
    result = run_script("reir", "serve", "--backend", "milvus", "--uri", milvus_uri, "--collection", "empty",
                        "--port", "0", timeout=60)
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stdout + result.stderr
    assert f"collection empty at {milvus_uri} holds no images" in result.stderr and "Serving" not in result.stdout


@contextlib.contextmanager
def milvus_client(uri):
    """A pymilvus client of ``uri`` (with the session's credentials on the server), stopped after."""
    from reir.retrieval.milvus import connect, release

    client = connect(uri)
    try:
        yield client
    finally:
        client.close()
        release(uri)


def foreign_collection(uri, name):
    """A user's collection, made with pymilvus directly: one row."""
    with milvus_client(uri) as client:
        client.create_collection(name, dimension=4, consistency_level="Strong")
        client.insert(name, [{"id": 7, "vector": [0.5, 0.5, 0.5, 0.5]}])
        client.flush(name)


def collections_and_rows(uri):
    """``{collection: rows}`` of every collection at ``uri``."""
    with milvus_client(uri) as client:
        names = client.list_collections()
        for name in names:
            client.load_collection(name)
        return {name: client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"] for name in names}


def random_database(path, count, seed):
    features = reir_like(count, seed)
    Database({"test": features}, {"test": {"paths": [f"/r/{seed}/{i}.png" for i in range(count)],
                                           "labels": ["x"] * count}}, {}, {}).save(path)
    return features


def assert_serves(uri, collection, features):
    """The collection holds ``features`` and no more: each of a few finds itself first."""
    opened = open_index("milvus", uri=uri, collection=collection)
    try:
        assert len(opened) == len(features)
        scores, ids = opened.search(features[[2, 5, len(features) - 1]], 1)
        assert ids[:, 0].tolist() == [2, 5, len(features) - 1]
        torch.testing.assert_close(scores[:, 0], torch.ones(3), atol=1e-5, rtol=0)
    finally:
        opened.close()


def test_reir_index_keeps_a_collection_it_did_not_write_unless_overwrite(milvus_uri, tmp_path):
    """A user's collection of the name asked for, or of its staging name, is refused in one line and left as it
    was; with --overwrite it is replaced."""
    database = tmp_path / "random_data_base.safetensors"
    features = random_database(database, 300, 4)
    for name, refused in (("photos", "photos"), ("notes", "notes_reir_staging")):
        foreign_collection(milvus_uri, refused)
        result = run_reir("index", "--data_base", str(database), "--backend", "milvus", "--uri", milvus_uri,
                          "--collection", name)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"collection {refused} at {milvus_uri} already exists and was not written by reir index; set " \
               "--overwrite to replace it or choose another --collection" in result.stderr, result.stderr
    assert collections_and_rows(milvus_uri) == {"photos": 1, "notes_reir_staging": 1}
    for name in ("photos", "notes"):
        replaced = run_reir("index", "--data_base", str(database), "--backend", "milvus", "--uri", milvus_uri,
                            "--collection", name, "--overwrite")
        assert replaced.returncode == 0, replaced.stderr
        assert_serves(milvus_uri, name, features)
    assert collections_and_rows(milvus_uri) == {"photos": 300, "notes": 300}


def test_reir_index_replaces_its_own_collection_without_asking(milvus_uri, tmp_path):
    old = build_index(reir_like(200, 5), backend="milvus", uri=milvus_uri, collection="photos")
    old.close()
    database = tmp_path / "random_data_base.safetensors"
    features = random_database(database, 300, 6)
    result = run_reir("index", "--data_base", str(database), "--backend", "milvus", "--uri", milvus_uri,
                      "--collection", "photos", "--efSearch", "20")
    assert result.returncode == 0, result.stderr
    assert_serves(milvus_uri, "photos", features)
    opened = open_index("milvus", uri=milvus_uri, collection="photos")
    try:  # the info reir index saved is on the collection under its final name
        assert opened.info["database"] == str(database) and opened.search_parameters == {"ef": 20}
    finally:
        opened.close()
    assert collections_and_rows(milvus_uri) == {"photos": 300}


def test_a_build_that_fails_midway_leaves_the_old_collection_serving(milvus_uri, monkeypatch):
    """A build fails on its second insert: the collection it was to replace still serves its old rows. Its
    staging collection is dropped; one left by a build killed midway (not dropped) is REIR's, so the next
    build replaces it without asking."""
    import pymilvus

    from reir.errors import ReirError
    from reir.retrieval import milvus
    from reir.retrieval.milvus import MilvusIndex

    old_features, new_features = reir_like(200, 7), reir_like(500, 8)
    build_index(old_features, backend="milvus", uri=milvus_uri, collection="photos").close()
    monkeypatch.setattr(milvus, "INSERT_BATCH", 100)
    insert = pymilvus.MilvusClient.insert
    inserts = []

    def fails_after_one_batch(self, *args, **kwargs):
        inserts.append(1)
        if len(inserts) % 2 == 0:
            raise RuntimeError("connection lost")
        return insert(self, *args, **kwargs)

    monkeypatch.setattr(pymilvus.MilvusClient, "insert", fails_after_one_batch)
    with pytest.raises(ReirError, match="Milvus refused an insert into photos"):
        build_index(new_features, backend="milvus", uri=milvus_uri, collection="photos")
    assert_serves(milvus_uri, "photos", old_features)
    assert collections_and_rows(milvus_uri) == {"photos": 200}
    with monkeypatch.context() as killed:  # killed midway: nothing drops its staging collection
        killed.setattr(MilvusIndex, "discard", MilvusIndex.close)
        with pytest.raises(ReirError, match="Milvus refused an insert"):
            build_index(new_features, backend="milvus", uri=milvus_uri, collection="photos")
    assert_serves(milvus_uri, "photos", old_features)
    assert collections_and_rows(milvus_uri) == {"photos": 200, "photos_reir_staging": 100}
    from reir.retrieval.milvus import reir_info

    with milvus_client(milvus_uri) as client:
        assert reir_info(client, "photos_reir_staging") is not None
    monkeypatch.setattr(pymilvus.MilvusClient, "insert", insert)
    build_index(new_features, backend="milvus", uri=milvus_uri, collection="photos").close()
    assert_serves(milvus_uri, "photos", new_features)
    assert collections_and_rows(milvus_uri) == {"photos": 500}
