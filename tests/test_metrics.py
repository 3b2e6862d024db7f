"""Every metric against pytorch-metric-learning's AccuracyCalculator and against the k-NN lists, and ``reir eval``."""

import numpy as np
import pytest
import torch

from conftest import run_reir
from reir.retrieval import clustering, metrics
from reir.retrieval import ranking as ranking_engine
from reir.retrieval.database import Database
from reir.retrieval.metrics import evaluate_embeddings, retrieval_metrics
from reir.retrieval.ranking import relevant_counts
from reir.retrieval.similarity import flatten, knn

PML_NAMES = {"precision@1": "precision_at_1", "r_precision": "r_precision", "map@r": "mean_average_precision_at_r",
             "nmi": "NMI"}


@pytest.fixture(params=["compiled-bf16", "compiled-fp32", "tensor"])
def ranking(request, monkeypatch):
    """Every way the CPU can rank: compiled, with bf16 or fp32 tiles (which one runs by default depends
    on the CPU), or the tensor operations that other devices use."""
    if request.param == "tensor":
        monkeypatch.setattr(metrics, "COMPILED_SCAN_DEVICES", ())
    else:
        monkeypatch.setattr(ranking_engine, "native_bf16", lambda: request.param == "compiled-bf16")
    return request.param


def embeddings(kind, n, seed):
    """``[n, 4, 6]`` per-branch unit embeddings and labels; some classes have one image (lone queries)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 25, (n,), generator=generator)
    labels[:3] = torch.tensor([100, 101, 102])
    noise = torch.randn(n, 4, 6, generator=generator)
    if kind == "clustered":
        centres = torch.randn(103, 4, 6, generator=generator)
        noise = centres[labels] + 0.6 * noise
    return torch.nn.functional.normalize(noise, dim=-1), labels


def pml(query, query_labels, reference=None, reference_labels=None):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator  # not on the GPU check

    calculator = AccuracyCalculator(include=tuple(PML_NAMES.values()), k="max_bin_count", device=torch.device("cpu"))
    flat = lambda x: None if x is None else x.reshape(len(x), -1) / 2  # noqa: E731 - mean cosine, 4 branches
    return calculator.get_accuracy(flat(query), query_labels, flat(reference), reference_labels)


def brute_recall(query, query_labels, reference, reference_labels, ks, exclude_self):
    sim = torch.einsum("qec,rec->qr", query.double(), reference.double())
    if exclude_self:
        sim.fill_diagonal_(-float("inf"))
    order = sim.argsort(dim=1, descending=True)
    return {k: (reference_labels[order[:, :k]] == query_labels[:, None]).any(1).double().mean().item() for k in ks}


@pytest.mark.parametrize("chunk_size", [64, 2048])
@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_self_retrieval_equals_pytorch_metric_learning(kind, chunk_size, ranking):
    features, labels = embeddings(kind, 400, seed=3)
    ours = evaluate_embeddings(features, labels, (1, 2, 4, 8), chunk_size=chunk_size)
    theirs = pml(features, labels)
    for name, pml_name in PML_NAMES.items():
        assert ours[name] == pytest.approx(theirs[pml_name], abs=1e-6), name
    expected = brute_recall(features, labels, features, labels, (1, 2, 4, 8), exclude_self=True)
    assert [ours[f"recall@{k}"] for k in (1, 2, 4, 8)] == pytest.approx(list(expected.values()), abs=1e-12)
    assert 0 < ours["map@r"] <= ours["r_precision"] <= 1
    if kind == "clustered":  # the metrics must see the structure
        assert ours["map@r"] > 0.5 and ours["nmi"] > 0.8


@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_query_gallery_equals_pytorch_metric_learning(kind, ranking):
    features, labels = embeddings(kind, 500, seed=4)
    query, query_labels, gallery, gallery_labels = features[:180], labels[:180], features[180:], labels[180:]
    ours = evaluate_embeddings(query, query_labels, (1, 10), gallery, gallery_labels, chunk_size=50)
    theirs = pml(query, query_labels, gallery, gallery_labels)
    for name, pml_name in PML_NAMES.items():
        assert ours[name] == pytest.approx(theirs[pml_name], abs=1e-6), name
    expected = brute_recall(query, query_labels, gallery, gallery_labels, (1, 10), exclude_self=False)
    assert [ours["recall@1"], ours["recall@10"]] == pytest.approx(list(expected.values()), abs=1e-12)


def from_neighbour_lists(query, query_labels, recalls, gallery=None, gallery_labels=None, float64=False):
    """The same metrics from the k-NN path's neighbour lists (K = max(largest recall, largest R)) or, with
    ``float64``, from every reference sorted by a float64 score, then by index."""
    self_retrieval = gallery is None
    references, reference_labels = (query, query_labels) if self_retrieval else (gallery, gallery_labels)
    r = relevant_counts(query_labels, reference_labels, self_retrieval)
    if float64:
        scores = flatten(query).double() @ flatten(references).double().T
        if self_retrieval:
            scores.fill_diagonal_(-float("inf"))
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        hits = (reference_labels[order] == query_labels[:, None])[:, :-1 if self_retrieval else None]
    else:
        _, indices = knn(query, references, max(max(recalls), int(r.max())), self_retrieval, backend="torch")
        hits = reference_labels[indices] == query_labels[:, None]
    metrics = {f"recall@{k}": hits[:, :k].any(dim=1).double().mean().item() for k in recalls}
    hits, r = hits[r > 0], r[r > 0].double()
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float64)
    within = hits & (ranks[None] <= r[:, None])
    metrics["precision@1"] = hits[:, 0].double().mean().item()
    metrics["r_precision"] = (within.sum(dim=1) / r).mean().item()
    metrics["map@r"] = ((within.cumsum(dim=1) / ranks * within).sum(dim=1) / r).mean().item()
    return metrics


def tied_embeddings(kind, n, seed):
    """Exactly equal scores: integer-valued vectors (every score exact) or duplicated random ones,
    with labels that are arbitrary ints, lone queries and a class of n - 120 images (several 64-row tiles)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(-6, 9, (n,), generator=generator) * 1009
    labels[:4] = torch.tensor([-1, 7, 123456789, 5])
    labels[120:] = 42
    if kind == "integer":
        features = torch.randint(-2, 3, (n, 4, 3), generator=generator).float()
    else:
        centres = torch.randn(20, 4, 3, generator=generator)
        noise = torch.randn(n, 4, 3, generator=generator)
        features = torch.nn.functional.normalize(centres[labels % 20] + noise, dim=-1)
    features[n // 2:n // 2 + n // 4] = features[:n // 4]  # duplicates, most of them in other classes
    return features, labels


@pytest.mark.parametrize("chunk_size", [64, 2048])  # 64: the large class spans more tiles than are kept
@pytest.mark.parametrize("kind", ["integer", "duplicated"])
def test_equals_the_neighbour_lists_with_ties_in_both_protocols(kind, chunk_size, ranking):
    features, labels = tied_embeddings(kind, 420, seed=len(kind) + chunk_size)
    recalls = (1, 2, 3, 10, 100, 1000)  # 1000: more than there are references
    expected = from_neighbour_lists(features, labels, recalls)
    assert retrieval_metrics(features, labels, recalls, chunk_size=chunk_size) == pytest.approx(expected, abs=1e-12)
    # query -> gallery: the gallery lacks a query class (lone queries) and has classes no query has
    queries = torch.arange(len(labels)) % 3 == 0
    query, query_labels = features[queries], labels[queries]
    gallery_keep = ~queries & (labels != labels[3]) & (labels != labels[6])
    gallery, gallery_labels = features[gallery_keep], labels[gallery_keep]
    expected = from_neighbour_lists(query, query_labels, recalls, gallery, gallery_labels)
    ours = retrieval_metrics(query, query_labels, recalls, gallery, gallery_labels, chunk_size=chunk_size)
    assert ours == pytest.approx(expected, abs=1e-12)


def test_ties_follow_the_reference_index(ranking):
    """Three references score the same; the query's relevant one has the middle index: one ahead of it."""
    gallery = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    values = retrieval_metrics(torch.tensor([[1.0, 0.0]]), torch.tensor([4]), (1, 2), gallery,
                               torch.tensor([3, 4, 3, 4]))
    assert values == pytest.approx({"recall@1": 0, "recall@2": 1, "precision@1": 0, "r_precision": 0.5,
                                    "map@r": 0.25})


def test_only_lone_queries(ranking):
    features = torch.nn.functional.normalize(torch.randn(5, 2, 3), dim=-1)
    values = retrieval_metrics(features, torch.arange(5), (1, 4))
    assert values["recall@1"] == values["recall@4"] == 0
    assert all(values[name] != values[name] for name in ("precision@1", "r_precision", "map@r"))  # NaN


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["integer", "duplicated"])
def test_cuda_equals_cpu(kind, monkeypatch):
    """The tensor ranking on the GPU against the same ranking on the CPU (fp32 scores on both; the CPU's
    default compiled ranking is float64-exact and is checked against this one above)."""
    monkeypatch.setattr(metrics, "COMPILED_SCAN_DEVICES", ())
    features, labels = tied_embeddings(kind, 3000, seed=9)
    recalls = (1, 10, 100)
    cpu = retrieval_metrics(features, labels, recalls, chunk_size=256)
    assert retrieval_metrics(features, labels, recalls, device="cuda", chunk_size=256) == pytest.approx(cpu, abs=1e-12)
    assert retrieval_metrics(features[:1000], labels[:1000], recalls, features[1000:], labels[1000:],
                             device="cuda") == pytest.approx(
        retrieval_metrics(features[:1000], labels[:1000], recalls, features[1000:], labels[1000:]), abs=1e-12)


def test_hand_computed_ranking(ranking):
    """One query whose two relevant images sit at ranks 1 and 3: AP@R = (1/1 + 0) / 2, RP = 1/2."""
    gallery = torch.tensor([[1.0, 0.0], [0.9, 0.44], [0.8, 0.6], [0.0, 1.0]])
    gallery = torch.nn.functional.normalize(gallery, dim=-1)
    values = retrieval_metrics(torch.tensor([[1.0, 0.0]]), torch.tensor([7]), (1, 2, 3), gallery,
                               torch.tensor([7, 1, 7, 2]))
    assert values == pytest.approx({"recall@1": 1, "recall@2": 1, "recall@3": 1, "precision@1": 1,
                                    "r_precision": 0.5, "map@r": 0.5})


@pytest.mark.parametrize("ranking", ["compiled-bf16", "compiled-fp32"], indirect=True)
@pytest.mark.parametrize("protocol", ["self", "gallery"])
def test_scores_closer_than_any_tile_rounding_rank_exactly(ranking, protocol):
    """Six clusters of nearly equal embeddings (spread 1e-3 down to 1e-9, far below bf16's and even fp32's
    resolution) with labels mixed inside each: only the exact rescoring orders them right."""
    generator = torch.Generator().manual_seed(11)
    centres = torch.nn.functional.normalize(torch.randn(6, 40, generator=generator), dim=-1)
    spread = 10.0 ** -torch.randint(3, 10, (300, 1), generator=generator).float()
    features = centres.repeat_interleave(50, dim=0) + spread * torch.randn(300, 40, generator=generator)
    labels = torch.randint(0, 30, (300,), generator=generator)
    recalls = (1, 2, 4, 8, 16)
    if protocol == "self":
        assert retrieval_metrics(features, labels, recalls, chunk_size=64) == pytest.approx(
            from_neighbour_lists(features, labels, recalls, float64=True), abs=1e-12)
    else:
        query, gallery = features[::3], features[1::3]
        expected = from_neighbour_lists(query, labels[::3], recalls, gallery, labels[1::3], float64=True)
        ours = retrieval_metrics(query, labels[::3], recalls, gallery, labels[1::3], chunk_size=64)
        assert ours == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("bf16", [True, False])
def test_tile_scores_stay_within_their_error_bound(bf16):
    """The bound that lets a tile score settle a decision, on unit rows, rows scaled by 1e3 and 1e-3,
    rows whose entries span twelve orders of magnitude, and entries exactly halfway between two bf16
    numbers; the tile rows are rounded exactly as torch rounds."""
    from reir.retrieval import tilescan  # numba: imported here so that the GPU check can collect this file without it
    generator = torch.Generator().manual_seed(5)
    dim = 96
    sign, exponent, mantissa = (torch.randint(low, high, (50, dim), generator=generator, dtype=torch.int64)
                                for low, high in ((0, 2), (118, 131), (0, 128)))
    halfway = ((sign << 31) | (exponent << 23) | (mantissa << 16) | 0x8000).to(torch.int32)  # low half 0x8000
    features = torch.cat([
        torch.nn.functional.normalize(torch.randn(150, dim, generator=generator), dim=-1),
        torch.randn(50, dim, generator=generator) * 1e3,
        torch.randn(50, dim, generator=generator) * 1e-3,
        torch.randn(50, dim, generator=generator) * torch.logspace(-6, 6, dim),
        halfway.view(torch.float32),
    ]).contiguous()
    shift, tile_dtype = (16, torch.bfloat16) if bf16 else (0, torch.float32)
    bits = features.numpy().view(np.uint32)
    rounded = torch.zeros(len(features), dim, dtype=tile_dtype)
    exact_rows = np.zeros((len(features), dim), np.uint32)
    tilescan.gather_tile(bits, np.arange(len(features)), len(features), exact_rows,
                         rounded.view(torch.int16 if bf16 else torch.int32).numpy().view(
                             np.uint16 if bf16 else np.uint32), shift)
    assert torch.equal(rounded, features.to(tile_dtype)) and np.array_equal(exact_rows, bits)
    tile = torch.mm(rounded, rounded.T).double()
    exact = features.double() @ features.double().T
    accumulation, output = ranking_engine.tile_error(dim, bf16)
    norm, error, rounded_norm = torch.from_numpy(tilescan.error_bounds(bits, shift)).T
    bound = (error[:, None] * norm[None] + norm[:, None] * error[None] + error[:, None] * error[None]
             + accumulation * rounded_norm[:, None] * rounded_norm[None] + output * tile.abs())
    actual = (tile - exact).abs()
    assert (actual <= bound).all()
    unit = slice(0, 150)
    assert actual[unit, unit].max() > bound[unit, unit].max() / 100  # a bound, but not a vacuous one


def test_relevant_counts_exclude_the_query_and_unknown_classes():
    labels = torch.tensor([3, 3, 5, 9])
    assert relevant_counts(labels, labels, True).tolist() == [1, 1, 0, 0]
    assert relevant_counts(torch.tensor([3, 4, 10]), labels, False).tolist() == [2, 0, 0]


def write_database(path, query_gallery):
    features, labels = embeddings("clustered", 120, seed=5)
    names = [f"c{int(label)}" for label in labels]
    paths = [f"img{i}.png" for i in range(len(labels))]
    if query_gallery:
        split_features = {"query": features[:50], "gallery": features[50:]}
        splits = {"query": {"paths": paths[:50], "labels": names[:50]},
                  "gallery": {"paths": paths[50:], "labels": names[50:]}}
    else:
        split_features, splits = {"test": features}, {"test": {"paths": paths, "labels": names}}
    Database(split_features, splits, {"recalls": [1, 2]}, {"data_name": "digits"}).save(path)
    return features, labels


@pytest.mark.parametrize("query_gallery", [False, True])
def test_eval_command_prints_every_metric(tmp_path, query_gallery):
    path = tmp_path / "x_data_base.safetensors"
    features, labels = write_database(path, query_gallery)
    result = run_reir("eval", "--data_base", str(path))
    assert result.returncode == 0, result.stderr
    printed = {line.split()[0]: float(line.split()[1].rstrip("%")) / 100
               for line in result.stdout.splitlines()[1:]}
    # labels are renumbered by name in the database; the metrics do not depend on it
    args = (features[:50], labels[:50], (1, 2), features[50:], labels[50:]) if query_gallery else (
        features, labels, (1, 2))
    expected = evaluate_embeddings(*args)
    assert set(printed) == set(expected)
    for name, value in expected.items():
        assert printed[name] == pytest.approx(value, abs=6e-5), name


@pytest.mark.slow
def test_eval_command_errors_are_one_line(tmp_path):
    missing = run_reir("eval", "--data_base", str(tmp_path / "none_data_base.safetensors"))
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    assert "not found" in missing.stderr
    no_flag = run_reir("eval")
    assert no_flag.returncode == 2 and len(no_flag.stderr.strip().splitlines()) == 1
    path = tmp_path / "x_data_base.safetensors"
    write_database(path, False)
    before = path.read_bytes()
    bad = run_reir("eval", "--data_base", str(path), "--recalls", "0,5")
    assert bad.returncode == 2 and "positive integers" in bad.stderr and path.read_bytes() == before


@pytest.mark.parametrize("size,first_classes,second_classes", [(500, 7, 7), (300, 2, 9), (50, 1, 4), (40, 1, 1),
                                                                (200, 30, 3)])
def test_nmi_equals_scikit_learns(size, first_classes, second_classes):
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(size + first_classes)
    first = rng.integers(0, first_classes, size)
    second = (first * 3 + rng.integers(0, 2, size)) % second_classes  # related, not equal
    for a, b in ((first, second), (first, rng.integers(0, second_classes, size)), (first, first)):
        labels = np.array([f"class {x}" for x in a])  # names, not ids, for one side
        assert clustering.normalized_mutual_information(labels, b) == pytest.approx(
            normalized_mutual_info_score(a, b), abs=1e-12)
