"""Exact k-NN: both engines against a full similarity matrix, ties, chunking, errors."""

import pytest
import torch

from reir.errors import ReirError
from reir.retrieval.similarity import choose_backend, flatten, iter_knn, knn


def brute(queries, references, k, exclude_self):
    """Full matrix, then a sort on (score desc, index asc): the documented order."""
    sim = flatten(queries) @ flatten(references).T
    if exclude_self:
        sim.fill_diagonal_(-float("inf"))
    order = [sorted(range(len(row)), key=lambda j: (-row[j].item(), j))[:k] for row in sim]
    indices = torch.tensor(order)
    return sim.gather(1, indices), indices


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_matches_full_matrix_with_deterministic_ties(backend, exclude_self):
    torch.manual_seed(0)
    # Integer-valued embeddings: many exactly equal scores, plus exact duplicates.
    features = torch.randint(-2, 3, (120, 4, 3)).float()  # scale 1/2: every score exact
    features[60:90] = features[:30]
    scores, indices = knn(features, features, 25, exclude_self=exclude_self, backend=backend, chunk_size=17)
    expected_scores, expected_indices = brute(features, features, 25, exclude_self)
    assert torch.equal(indices, expected_indices)
    assert torch.allclose(scores, expected_scores, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_query_gallery_and_mean_cosine_scores(backend):
    torch.manual_seed(1)
    queries = torch.nn.functional.normalize(torch.randn(40, 4, 6), dim=-1)
    gallery = torch.nn.functional.normalize(torch.randn(70, 4, 6), dim=-1)
    scores, indices = knn(queries, gallery, 9, backend=backend)
    mean_cosine = torch.einsum("qec,rec->qr", queries, gallery) / 4
    assert torch.equal(indices, mean_cosine.argsort(dim=1, descending=True)[:, :9])
    assert torch.allclose(scores, mean_cosine.gather(1, indices), atol=1e-6)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_engines_and_chunkings_agree_and_stream():
    torch.manual_seed(2)
    features = torch.nn.functional.normalize(torch.randn(300, 12), dim=-1)
    reference = knn(features, features, 30, exclude_self=True, backend="torch", chunk_size=300)
    for backend, chunk in (("faiss", 7), ("torch", 64), ("auto", None)):
        assert torch.equal(knn(features, features, 30, True, chunk, backend).gallery_ids, reference.gallery_ids)
    starts = [(start, len(i)) for start, _, i in iter_knn(features, features, 5, True, chunk_size=128)]
    assert starts == [(0, 128), (128, 128), (256, 44)]


def test_k_is_clipped_and_self_never_returned():
    features = torch.nn.functional.normalize(torch.randn(6, 2, 3), dim=-1)
    for backend in ("torch", "faiss"):
        _scores, indices = knn(features, features, 50, exclude_self=True, backend=backend)
        assert indices.shape == (6, 5)
        assert not (indices == torch.arange(6)[:, None]).any()
        assert knn(features, features, 0, backend=backend).gallery_ids.shape == (6, 0)


def test_backend_choice_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    assert choose_backend("auto", 10, 10, cpu) == "torch"
    assert choose_backend("auto", 60_000, 60_000, cpu) == "faiss"
    assert choose_backend("auto", 60_000, 60_000, torch.device("cuda")) == "torch"
    with pytest.raises(ReirError, match="unknown"):
        choose_backend("annoy", 1, 1, cpu)
    with pytest.raises(ReirError, match="same model"):
        knn(torch.randn(3, 4), torch.randn(3, 5), 1)
    monkeypatch.setattr("reir.retrieval.similarity.faiss_available", lambda: False)
    assert choose_backend("auto", 60_000, 60_000, cpu) == "torch"
    with pytest.raises(ReirError, match="pip install faiss-cpu"):
        choose_backend("faiss", 1, 1, cpu)
