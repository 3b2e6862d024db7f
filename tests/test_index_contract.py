"""One contract, every index backend: FAISS Flat and HNSW, Milvus Lite and the Milvus standalone server
(tests/milvus_server.py), FLAT and HNSW on each. Every case runs against every backend; exact indexes
must give knn's ids and scores, approximate ones a Recall@10 above their stated floor."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

from conftest import milvus_database
from reir.errors import ReirError
from reir.retrieval.backends import build_index, open_index
from reir.retrieval.index_common import SearchIndex
from reir.retrieval.index_quality import recall_against_exact
from reir.retrieval.similarity import flatten, knn

COUNT, ENSEMBLE, META, K = 2000, 16, 12, 10


@dataclass(frozen=True)
class Backend:
    name: str
    engine: str  # faiss, or where Milvus runs: lite or server
    factory: str
    exact: bool
    recall_floor: float = 1.0  # Recall@10 against exact search, on COUNT random 192-dimensional vectors
    tuning: tuple = ()


# Floors sit well under what each measured (FAISS HNSW32 efSearch 64: 0.99; Milvus Lite HNSW: 0.99;
# the server's HNSW M=16 efConstruction=64 ef=64: ~0.93), above what a broken index could reach.
BACKENDS = [
    Backend("faiss Flat", "faiss", "Flat", exact=True),
    Backend("faiss HNSW32", "faiss", "HNSW32", exact=False, recall_floor=0.9, tuning=(("efSearch", 64),)),
    Backend("milvus lite FLAT", "lite", "FLAT", exact=True),
    Backend("milvus lite HNSW", "lite", "HNSW", exact=False, recall_floor=0.9, tuning=(("efSearch", 64),)),
    Backend("milvus server FLAT", "server", "FLAT", exact=True),
    Backend("milvus server HNSW", "server", "HNSW", exact=False, recall_floor=0.8, tuning=(("efSearch", 64),)),
]
HNSW_PARAMETERS = {"M": 16, "efConstruction": 64}


class Store:
    """Where one backend's indexes live for a test: a folder for FAISS files, or a Milvus URI."""

    def __init__(self, backend: Backend, folder, uri: str | None):
        self.backend, self.folder, self.uri, self.count = backend, folder, uri, 0

    def build(self, features, paths=None, labels=None, info=None) -> SearchIndex:
        self.count += 1
        if self.backend.engine == "faiss":
            index = build_index(features, paths, labels, self.backend.factory, info)
        else:
            index = build_index(features, paths, labels, self.backend.factory, info, backend="milvus", uri=self.uri,
                                collection=f"c{self.count}",
                                parameters=HNSW_PARAMETERS if self.backend.factory == "HNSW" else None)
        index.tune(**dict(self.backend.tuning))
        return index

    def reopen(self, index: SearchIndex) -> SearchIndex:
        """Saved (FAISS) or closed (Milvus) and opened again, as another process would."""
        if self.backend.engine == "faiss":
            path = self.folder / f"i{self.count}.faiss"
            index.save(path)
            return open_index("faiss", path)
        index.save_info()
        index.close()
        return open_index("milvus", uri=self.uri, collection=index.collection)


def backend_params():
    return [pytest.param(b, id=b.name, marks=[pytest.mark.milvus_server] if b.engine == "server" else [])
            for b in BACKENDS]


@contextlib.contextmanager
def store_for(backend: Backend, request, folder):
    if backend.engine == "server":
        with milvus_database(request.getfixturevalue("milvus_server")) as uri:
            yield Store(backend, folder, uri)
    else:
        yield Store(backend, folder, str(folder / "contract.milvus.db") if backend.engine == "lite" else None)


def reir_like(count, seed):
    return torch.nn.functional.normalize(torch.randn(count, ENSEMBLE, META,
                                                     generator=torch.Generator().manual_seed(seed)), dim=-1)


FEATURES = reir_like(COUNT, 0)
PATHS = [f"/photos/{'a' if i % 2 else 'b'}/{i:05d}.jpg" for i in range(COUNT)]
LABELS = [str(i % 5) if i % 3 else "" for i in range(COUNT)]
QUERIES = torch.cat([FEATURES[:40], reir_like(60, 1)])


@pytest.fixture(scope="module", params=backend_params())
def built(request, tmp_path_factory):
    """One index per backend over the same images, shared by the read-only cases."""
    backend = request.param
    with store_for(backend, request, tmp_path_factory.mktemp("contract")) as store:
        index = store.build(FEATURES, PATHS, LABELS, {"model_file": "/models/m.safetensors"})
        try:
            yield backend, index
        finally:
            index.close()


@pytest.fixture(params=backend_params())
def store(request, tmp_path):
    with store_for(request.param, request, tmp_path) as found:
        yield found


def test_it_is_a_search_index_of_what_it_was_given(built):
    backend, index = built
    assert isinstance(index, SearchIndex)
    assert len(index) == COUNT and index.dim == ENSEMBLE * META and index.exact == backend.exact
    assert backend.factory.lower() in index.factory.lower()
    assert index.info["model_file"] == "/models/m.safetensors" and index.labelled
    assert index.root == "/photos"
    assert [index.paths[i] for i in (0, 1, 1999)] == [PATHS[0], PATHS[1], PATHS[1999]]
    assert [index.labels[i] for i in (0, 1, 1999)] == [LABELS[0], LABELS[1], LABELS[1999]]
    assert len(index.paths) == len(index.labels) == COUNT


def test_exact_indexes_rank_like_knn_and_approximate_ones_recall_above_their_floor(built):
    backend, index = built
    scores, ids = index.search(QUERIES, K)
    exact_scores, exact_ids = knn(flatten(QUERIES), flatten(FEATURES), K)
    assert scores.shape == ids.shape == (len(QUERIES), K)
    found = ids >= 0
    truth = flatten(QUERIES) @ flatten(FEATURES).T  # every score is the true similarity of its id
    torch.testing.assert_close(scores[found], truth.gather(1, ids.clamp_min(0))[found], atol=1e-5, rtol=0)
    finds_itself = int((ids[:40, 0] == torch.arange(40)).sum())  # database images as queries
    assert finds_itself == 40 if backend.exact else finds_itself >= 36
    if backend.exact:
        torch.testing.assert_close(scores, exact_scores, atol=1e-5, rtol=0)
        assert torch.equal(ids, exact_ids)  # random vectors: no two scores tie within float error
    else:
        assert recall_against_exact(ids, exact_ids) >= backend.recall_floor


def test_k_is_bounded_by_the_index_and_must_be_positive(built):
    _, index = built
    assert index.search(QUERIES[:3], 1).gallery_ids.shape == (3, 1)
    for bad in (0, -1, 2.5):
        with pytest.raises(ReirError, match="k must be a positive integer"):
            index.search(QUERIES[:3], bad)


def test_queries_of_another_dimension_are_refused(built):
    _, index = built
    with pytest.raises(ReirError, match="queries have dimension 12 but the index 192"):
        index.search(torch.randn(2, 12), K)


def test_images_added_later_continue_the_ids_and_labelled_is_recorded_and_kept(store):
    """Unlabelled as built and when reopened (nothing is found by reading every label), labelled once a
    labelled image is added; ids go on from the last; info and the flag survive reopening; more images than
    exist ask for all of them."""
    first = reir_like(30, 2)
    index = store.reopen(store.build(first, [f"/x/{i}.png" for i in range(30)], info={"splits": ["test"]}))
    try:
        assert not index.labelled and len(index) == 30 and list(index.labels) == [""] * 30
        more = reir_like(12, 3)
        index.add(more, [f"/y/{i}.png" for i in range(12)], ["cat"] * 12)
        assert len(index) == 42 and index.labelled
        assert index.search(more, 1).gallery_ids[:, 0].tolist() == list(range(30, 42))
        assert index.paths[41] == "/y/11.png" and index.labels[41] == "cat" and index.labels[0] == ""
        index = store.reopen(index)
        assert len(index) == 42 and index.labelled and index.info["splits"] == ["test"] and index.root == "/"
        assert index.search(first[:5], 100).gallery_ids.shape == (5, 42)
        assert index.search(first[:5], 1).gallery_ids[:, 0].tolist() == list(range(5))
    finally:
        index.close()
