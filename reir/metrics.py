"""Retrieval metrics computed from nearest-neighbour lists."""

from __future__ import annotations

import torch

from .search import knn


def recall_at_k(query_labels: torch.Tensor, neighbor_labels: torch.Tensor, ks) -> dict[int, float]:
    """Share of queries with a same-class image among their first K neighbours."""
    hits = neighbor_labels == query_labels[:, None]
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def retrieval_recalls(query_features: torch.Tensor, query_labels: torch.Tensor, ks,
                      gallery_features: torch.Tensor | None = None,
                      gallery_labels: torch.Tensor | None = None) -> dict[int, float]:
    """Recall@K for self-retrieval (no gallery: the query excluded) or query -> gallery."""
    self_retrieval = gallery_features is None
    if self_retrieval:
        gallery_features, gallery_labels = query_features, query_labels
    _, indices = knn(query_features, gallery_features, max(ks), exclude_self=self_retrieval)
    return recall_at_k(query_labels, gallery_labels[indices], ks)
