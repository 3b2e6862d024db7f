"""Retrieval and clustering metrics: Recall@K, precision@1, R-precision, MAP@R, NMI.

Two protocols: self-retrieval (every test image queries all the others; the query
itself is excluded) and query -> gallery. R for a query is the number of other
images of its class among the references. Definitions follow "A Metric Learning
Reality Check" (Musgrave et al., 2020) and agree with pytorch-metric-learning's
AccuracyCalculator: queries whose class has no other reference image ("lone"
queries) are left out of precision@1, R-precision and MAP@R, while Recall@K, as
in the original REIR, averages over every query (a lone query is a miss).

The neighbour lists are reduced block by block as the search yields them, so the
peak memory is that of the search, O(N * (D + K)), with K = max(largest recall, largest R).
"""

from __future__ import annotations

import numpy as np
import torch

from .knn import faiss_available, flatten, iter_knn

KMEANS_ITERATIONS = 20
KMEANS_SEED = 1234


def recall_at_k(query_labels: torch.Tensor, neighbor_labels: torch.Tensor, ks) -> dict[int, float]:
    """Share of queries with a same-class image among their first K neighbours."""
    hits = neighbor_labels == query_labels[:, None]
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def relevant_counts(query_labels: torch.Tensor, reference_labels: torch.Tensor, self_retrieval: bool) -> torch.Tensor:
    """R per query: reference images of its class, not counting the query itself."""
    classes, counts = torch.unique(reference_labels, return_counts=True)
    position = torch.searchsorted(classes, query_labels).clamp(max=len(classes) - 1)
    r = torch.where(classes[position] == query_labels, counts[position], 0)
    return r - 1 if self_retrieval else r


def retrieval_metrics(query_features: torch.Tensor, query_labels: torch.Tensor, recalls=(1,),
                      gallery_features: torch.Tensor | None = None, gallery_labels: torch.Tensor | None = None,
                      backend: str = "auto", device: torch.device | str | None = None,
                      chunk_size: int | None = None) -> dict[str, float]:
    """``recall@K`` for each K, ``precision@1``, ``r_precision`` and ``map@r`` in one exact search.

    Without a gallery the queries retrieve among themselves, each query excluded.
    """
    self_retrieval = gallery_features is None
    if self_retrieval:
        gallery_features, gallery_labels = query_features, query_labels
    query_labels, gallery_labels = query_labels.cpu().long(), gallery_labels.cpu().long()
    r = relevant_counts(query_labels, gallery_labels, self_retrieval)
    recalls = sorted(set(recalls))
    k = max(max(recalls), int(r.max()) if len(r) else 0)
    found = {key: 0.0 for key in recalls}
    precision, r_precision, map_r = 0.0, 0.0, 0.0
    for start, _, indices in iter_knn(query_features, gallery_features, k, self_retrieval, chunk_size, backend, device):
        labels, rows_r = query_labels[start:start + len(indices)], r[start:start + len(indices)]
        hits = gallery_labels[indices] == labels[:, None]
        for key in recalls:
            found[key] += hits[:, :key].any(dim=1).sum().item()
        valid = rows_r > 0
        hits, rows_r = hits[valid], rows_r[valid].double()
        if not len(hits):
            continue
        hits = hits[:, :int(rows_r.max())]  # MAP@R and R-precision look no further than R
        ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float64)
        relevant = hits & (ranks[None] <= rows_r[:, None])  # a hit within the first R
        precision += hits[:, 0].sum().item()
        r_precision += (relevant.sum(dim=1) / rows_r).sum().item()
        map_r += ((hits.cumsum(dim=1) / ranks * relevant).sum(dim=1) / rows_r).sum().item()
    queries, scored = len(query_labels), int((r > 0).sum())
    metrics = {f"recall@{key}": found[key] / queries if queries else float("nan") for key in recalls}
    for name, total in (("precision@1", precision), ("r_precision", r_precision), ("map@r", map_r)):
        metrics[name] = total / scored if scored else float("nan")
    return metrics


def cluster(features: torch.Tensor, clusters: int, seed: int = KMEANS_SEED) -> np.ndarray:
    """k-means cluster of every embedding: FAISS when installed (as the field's tools do), else scikit-learn."""
    data = np.ascontiguousarray(flatten(features).detach().float().cpu().numpy())
    if faiss_available():
        import faiss

        kmeans = faiss.Kmeans(data.shape[1], clusters, niter=KMEANS_ITERATIONS, seed=seed)
        kmeans.cp.min_points_per_centroid = 1  # small classes are normal here; no warning
        kmeans.train(data)
        return kmeans.index.search(data, 1)[1][:, 0]
    from sklearn.cluster import KMeans

    return KMeans(clusters, init="random", n_init=1, max_iter=KMEANS_ITERATIONS, random_state=seed).fit_predict(data)


def nmi(features: torch.Tensor, labels: torch.Tensor, seed: int = KMEANS_SEED) -> float:
    """NMI between the classes and a k-means clustering into as many clusters as classes."""
    from sklearn.metrics import normalized_mutual_info_score

    labels = labels.cpu().numpy()
    assignment = cluster(features, len(np.unique(labels)), seed)
    return float(normalized_mutual_info_score(labels, assignment))


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


def retrieval_recalls(query_features: torch.Tensor, query_labels: torch.Tensor, ks,
                      gallery_features: torch.Tensor | None = None,
                      gallery_labels: torch.Tensor | None = None) -> dict[int, float]:
    """Recall@K for self-retrieval (no gallery: the query excluded) or query -> gallery."""
    values = retrieval_metrics(query_features, query_labels, ks, gallery_features, gallery_labels)
    return {k: values[f"recall@{k}"] for k in ks}
