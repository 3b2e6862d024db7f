"""Retrieval and clustering metrics: Recall@K, precision@1, R-precision, MAP@R, NMI.

Two protocols: self-retrieval (every test image queries all the others; the query
itself is excluded) and query -> gallery. R for a query is the number of other
images of its class among the references. Definitions follow "A Metric Learning
Reality Check" (Musgrave et al., 2020) and agree with pytorch-metric-learning's
AccuracyCalculator: queries whose class has no other reference image ("lone"
queries) are left out of precision@1, R-precision and MAP@R, while Recall@K, as
in the original REIR, averages over every query (a lone query is a miss).

Every query's ranking comes from ``reir.retrieval.ranking`` (exact, in one pass of tile GEMMs,
without a K-nearest-neighbour list); here are the formulas over it, NMI (``reir.retrieval.clustering``)
beside them, and their one-line format.
"""

from __future__ import annotations

import torch

from reir.errors import ReirError
from reir.retrieval.clustering import nmi
from reir.retrieval.ranking import TILE, CompiledRanking, Ranks, TensorRanking
from reir.retrieval.similarity import flatten
from reir.validation import as_features, check_labels

# Devices ranked by ``CompiledRanking`` (compiled scan, exact float64 rescoring); others by ``TensorRanking``.
COMPILED_SCAN_DEVICES = ("cpu",)


def retrieval_metrics(query_features: torch.Tensor, query_labels: torch.Tensor, recalls=(1,),
                      gallery_features: torch.Tensor | None = None, gallery_labels: torch.Tensor | None = None,
                      device: torch.device | str | None = None, chunk_size: int | None = None) -> dict[str, float]:
    """``recall@K`` for each K, ``precision@1``, ``r_precision`` and ``map@r``, exactly, in one pass of GEMMs.

    Without a gallery the queries retrieve among themselves, each query excluded.
    ``chunk_size`` is the tile side (default ``TILE``, at least ``MIN_TILE``); it changes the speed,
    never the result.
    """
    self_retrieval = gallery_features is None
    queries = flatten(as_features(query_features, "query_features"))
    references = queries if self_retrieval else flatten(as_features(gallery_features, "gallery_features"))
    if queries.shape[1] != references.shape[1]:
        raise ReirError(f"queries have dimension {queries.shape[1]} but references {references.shape[1]}; "
                        "use embeddings from the same model")
    check_labels(query_labels, len(queries), "query_labels", "the queries")
    if self_retrieval:
        if gallery_labels is not None:
            raise ReirError("gallery_labels were given without gallery_features; pass both or neither")
        gallery_labels = query_labels
    elif gallery_labels is None:
        raise ReirError("gallery_features were given without gallery_labels; pass the gallery's labels too")
    check_labels(gallery_labels, len(references), "gallery_labels", "the gallery")
    query_labels, gallery_labels = query_labels.cpu().long(), gallery_labels.cpu().long()
    recalls = sorted(set(recalls))
    device = torch.device(device) if device is not None else queries.device
    ranking = (CompiledRanking if device.type in COMPILED_SCAN_DEVICES else TensorRanking)(
        queries, query_labels, references, gallery_labels, self_retrieval, max(recalls), device, chunk_size or TILE)
    return ranked_metrics(ranking.rank(), recalls)


def ranked_metrics(ranks: Ranks, recalls: list[int]) -> dict[str, float]:
    """The metrics of one ranking. Recall@K: the best relevant reference has fewer than K others before it
    (every query counts; a lone one misses). Precision@1, R-precision, MAP@R: over the top R of the queries
    with R > 0, a hit being a reference of the query's class."""
    relevant, before = ranks.relevant[ranks.valid], ranks.before[ranks.valid]
    queries = len(relevant)
    metrics = {f"recall@{k}": ((relevant > 0) & (before < k)).double().mean().item() if queries else float("nan")
               for k in recalls}
    scored = torch.nonzero(ranks.valid & (ranks.relevant > 0)).flatten()
    if not len(scored):
        return {**metrics, "precision@1": float("nan"), "r_precision": float("nan"), "map@r": float("nan")}
    device, k = ranks.top_index.device, ranks.top_index.shape[1]
    positions = torch.arange(1, k + 1, dtype=torch.float64, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for rows in scored.split(8192):  # in chunks: [queries, R] temporaries would add to the peak memory
        relevant = ranks.relevant[rows].double()
        top = ranks.top_index[rows].clamp(max=len(ranks.reference_class) - 1)
        hits = ranks.reference_class[top] == ranks.query_class[rows][:, None]
        # the top list is exact only while the best relevant reference is within the top R
        hits &= (positions[None] <= relevant[:, None]) & (ranks.before[rows] < ranks.relevant[rows])[:, None]
        sums += torch.stack([hits[:, 0].double().sum(), (hits.sum(dim=1) / relevant).sum(),
                             ((hits.cumsum(dim=1) / positions * hits).sum(dim=1) / relevant).sum()])
    metrics["precision@1"], metrics["r_precision"], metrics["map@r"] = (sums / len(scored)).tolist()
    return metrics



def evaluate_embeddings(query_features: torch.Tensor, query_labels: torch.Tensor, recalls=(1,),
                        gallery_features: torch.Tensor | None = None, gallery_labels: torch.Tensor | None = None,
                        with_nmi: bool = True, **search) -> dict[str, float | None]:
    """Every metric; ``nmi`` (clustering of the queries) is ``None`` when skipped."""
    metrics: dict[str, float | None] = dict(
        retrieval_metrics(query_features, query_labels, recalls, gallery_features, gallery_labels, **search))
    metrics["nmi"] = nmi(query_features, query_labels) if with_nmi else None
    return metrics


def format_metrics(metrics: dict[str, float | None]) -> str:
    """``R@1 93.40% ... P@1 .. RP .. MAP@R .. NMI ..`` on one line, skipped ones left out."""
    names = {"precision@1": "P@1", "r_precision": "RP", "map@r": "MAP@R", "nmi": "NMI"}
    parts = []
    for key, value in metrics.items():
        if value is None:
            continue
        label = f"R@{key.split('@')[1]}" if key.startswith("recall@") else names.get(key, key)
        parts.append(f"{label} {100 * value:.2f}%")
    return " ".join(parts)
