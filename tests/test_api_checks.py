"""The public functions refuse what they cannot answer: a ReirError naming the argument, never a wrong number."""

import pytest
import torch

import reir
from reir.errors import ReirError
from reir.retrieval.metrics import retrieval_metrics


def unit(rows: int, seed: int, shape=(3, 4)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, *shape, generator=generator), dim=-1)


QUERIES, GALLERY = unit(10, 0), unit(8, 1)
QUERY_LABELS = [str(i % 3) for i in range(10)]
GALLERY_LABELS = [str(i % 4) for i in range(8)]


def brute_force_recall_at_1(queries, query_labels, gallery, gallery_labels) -> float:
    """Recall@1 from the full score matrix: the best gallery image (ties to the lower index) has the query's class."""
    scores = torch.einsum("qec,gec->qg", queries.double(), gallery.double())
    best = [max(range(len(gallery)), key=lambda g: (scores[q, g].item(), -g)) for q in range(len(queries))]
    return sum(gallery_labels[b] == query_labels[q] for q, b in enumerate(best)) / len(queries)


def test_evaluate_with_a_gallery_scores_the_gallery_labels():
    metrics = reir.evaluate(QUERIES, QUERY_LABELS, gallery=GALLERY, gallery_labels=GALLERY_LABELS, with_nmi=False)
    assert metrics["recall@1"] == pytest.approx(brute_force_recall_at_1(QUERIES, QUERY_LABELS, GALLERY, GALLERY_LABELS))


@pytest.mark.parametrize("gallery", [GALLERY, QUERIES.clone()], ids=["other size", "same size"])
def test_evaluate_refuses_a_gallery_without_gallery_labels(gallery):
    with pytest.raises(ReirError, match="gallery_labels"):
        reir.evaluate(QUERIES, QUERY_LABELS, gallery=gallery, with_nmi=False)


def test_retrieval_metrics_refuses_a_gallery_without_its_labels():
    labels = torch.tensor([i % 3 for i in range(10)])
    with pytest.raises(ReirError, match="gallery_labels"):
        retrieval_metrics(QUERIES, labels, (1,), QUERIES.clone())
    with pytest.raises(ReirError, match="gallery_labels"):
        retrieval_metrics(QUERIES, labels, (1,), None, labels)
    with pytest.raises(ReirError, match="query_labels has 5 labels"):
        retrieval_metrics(QUERIES, labels[:5], (1,))


CALLS = {
    "labels shorter than the features": (lambda: reir.evaluate(QUERIES, QUERY_LABELS[:5]), "labels has 5 labels"),
    "gallery labels shorter than the gallery": (
        lambda: reir.evaluate(QUERIES, QUERY_LABELS, gallery=GALLERY, gallery_labels=GALLERY_LABELS[:3]),
        "gallery_labels has 3 labels"),
    "gallery labels without a gallery": (lambda: reir.evaluate(QUERIES, QUERY_LABELS, gallery_labels=GALLERY_LABELS),
                                         "no gallery"),
    "gallery of another dimension": (lambda: reir.evaluate(QUERIES, QUERY_LABELS, gallery=unit(8, 1, (5,)),
                                                           gallery_labels=GALLERY_LABELS), "dimension"),
    "float labels": (lambda: reir.evaluate(QUERIES, torch.rand(10)), "integer tensor"),
    "missing labels inside the list": (lambda: reir.evaluate(QUERIES, [None] * 10), "NoneType"),
    "names mixed with numbers": (lambda: reir.evaluate(QUERIES, ["a", 1] * 5), "one kind"),
    "features of one dimension": (lambda: reir.evaluate(torch.rand(10), QUERY_LABELS), "features must be"),
    "no labels": (lambda: reir.evaluate(QUERIES), "needs labels"),
    "recall at zero": (lambda: reir.evaluate(QUERIES, QUERY_LABELS, recalls=(0,)), "recalls"),
    "index with fewer paths": (lambda: reir.Index.build(QUERIES, paths=["a.png"]), "1 paths"),
    "index with fewer labels": (lambda: reir.Index.build(QUERIES, labels=["a"] * 3), "3 labels"),
    "index search of another dimension": (lambda: reir.Index.build(QUERIES).search(unit(2, 3, (5,))), "dimension"),
    "index search with k as text": (lambda: reir.Index.build(QUERIES).search(QUERIES, k="3"), "k must be"),
    "index search with k zero": (lambda: reir.Index.build(QUERIES).search(QUERIES, k=0), "k must be"),
    "load_model on an unknown device": (lambda: reir.load_model("model.safetensors", device="gpu"), "not a device"),
    "embed without a model": (lambda: reir.embed("model.safetensors", ["a.png"]), "reir.Model"),
}


@pytest.mark.parametrize("case", CALLS)
def test_public_functions_refuse_a_careless_call_naming_the_argument(case):
    call, words = CALLS[case]
    with pytest.raises(ReirError, match=words):
        call()


def test_embed_refuses_items_that_are_not_images(served_model):
    model = reir.load_model(served_model.model)
    with pytest.raises(ReirError, match="holds a int"):
        reir.embed(model, [3, 4])
    with pytest.raises(ReirError, match="batch_size"):
        reir.embed(model, served_model.images, batch_size=0)
    features = reir.embed(model, sorted(served_model.images.iterdir())[:3])
    assert features.shape == (3, *model.embedding_shape)


@pytest.mark.parametrize("images, batches", [(11, [10]), (12, [10, 2]), (10, [10])])
def test_a_training_epoch_never_ends_in_a_batch_of_one(images, batches):
    from reir.data.sampling import CappedClassSampler, make_loader

    sampler = CappedClassSampler(torch.zeros(images, dtype=torch.long))
    loader = make_loader(torch.arange(images), 10, 0, torch.device("cpu"), sampler)
    assert [len(batch) for batch in loader] == batches
