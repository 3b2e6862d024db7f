"""The one result type: checked on construction, produced by the exact k-NN and Index.search."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reir.retrieval.index import Index
from reir.retrieval.results import PAD, Results
from reir.retrieval.similarity import flatten, knn


def features(n: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, 3, 4, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("fields,problem", [
    (dict(scores=torch.tensor([[0.1, 0.9]]), gallery_ids=torch.tensor([[0, 1]]), gallery_size=2), "sorted"),
    (dict(scores=torch.tensor([[0.9, 0.1]]), gallery_ids=torch.tensor([[0, 2]]), gallery_size=2), "outside"),
    (dict(scores=torch.tensor([[0.9, 0.1]]), gallery_ids=torch.tensor([[0, -2]]), gallery_size=2), "outside"),
    (dict(scores=torch.tensor([[0.9, 0.1]]), gallery_ids=torch.tensor([[PAD, 1]]), gallery_size=2), "empty place"),
    (dict(scores=torch.tensor([[0.9, 0.1]]), gallery_ids=torch.tensor([[0, 1, 1]]), gallery_size=2), "shape"),
    (dict(scores=torch.tensor([[0.9, 0.1]]), gallery_ids=torch.tensor([[0.0, 1.0]]), gallery_size=2), "integers"),
    (dict(scores=torch.tensor([[0.9, 0.1]]), gallery_ids=torch.tensor([[0, 1]]), gallery_size=2,
          query_ids=torch.tensor([0, 1])), "query ids"),
    (dict(scores=torch.tensor([[0.9, 0.1]]), gallery_ids=torch.tensor([[0, 1]]), gallery_size=2,
          gallery_labels=["a"]), "gallery labels"),
    (dict(scores=torch.tensor([[0.9, 0.1]]), gallery_ids=torch.tensor([[0, 1]]), gallery_size=2,
          query_labels=["a", "b"]), "query labels"),
    (dict(scores=torch.tensor([[float("nan"), 0.1]]), gallery_ids=torch.tensor([[0, 1]]), gallery_size=2), "sorted"),
])
def test_construction_refuses_inconsistent_results(fields, problem):
    with pytest.raises(ValueError, match=problem):
        Results(**fields)


def test_padding_after_the_results_and_ties_are_accepted():
    results = Results(torch.tensor([[0.5, 0.5, -3e38]]), torch.tensor([[1, 0, PAD]]), gallery_size=2)
    assert results.row(0) == [(1, 0.5), (0, 0.5)]
    assert results.query_ids.tolist() == [0] and results.k == 3 and len(results) == 1


def test_knn_results_match_a_full_similarity_matrix():
    queries, gallery = features(7, 1), features(40, 2)
    results = knn(queries, gallery, 5)
    full = flatten(queries) @ flatten(gallery).T  # independent: every score, then a sort
    expected = full.sort(dim=1, descending=True)
    torch.testing.assert_close(results.scores, expected.values[:, :5])
    assert torch.equal(results.gallery_ids, expected.indices[:, :5])
    assert results.gallery_size == 40 and results.query_ids.tolist() == list(range(7))
    scores, ids = results  # the pair knn always returned
    assert scores is results.scores and ids is results.gallery_ids


def test_same_label_and_top_against_a_python_loop():
    gallery = features(30, 3)
    labels = [f"class{i % 4}" for i in range(30)]
    results = knn(gallery, gallery, 6).with_labels(labels, labels)
    same = results.same_label()
    for q in range(30):
        assert same[q].tolist() == [labels[i] == labels[q] for i in results.gallery_ids[q].tolist()]
    own = torch.arange(30)
    trimmed = results.top(4, excluding=own)
    for q in range(30):
        expected = [(i, s) for i, s in results.row(q) if i != q][:4]
        assert trimmed.row(q) == expected
    assert trimmed.query_labels == labels


def test_top_pads_rows_that_run_short():
    results = knn(features(1, 4), features(3, 5), 5)  # three gallery images only
    own = results.gallery_ids[0, 1].item()
    trimmed = results.top(5, excluding=[own])
    assert trimmed.k == 2 and [i for i, _ in trimmed.row(0)] == [i for i in results.gallery_ids[0].tolist() if i != own]


def test_index_search_gives_labelled_results():
    gallery = features(50, 6)
    labels = [str(i % 5) for i in range(50)]
    index = Index.build(gallery, paths=[f"{i}.png" for i in range(50)], labels=labels)
    results = index.search(gallery[:4], k=3)
    assert isinstance(results, Results) and results.gallery_labels == labels
    assert torch.equal(results.gallery_ids, knn(gallery[:4], gallery, 3).gallery_ids)
    approximate = Index.build(gallery, labels=labels, factory="HNSW8")
    found = approximate.search(gallery[:4], k=60)  # more than the index holds
    assert found.k == 50 and all(len(found.row(q)) <= 50 for q in range(4))
