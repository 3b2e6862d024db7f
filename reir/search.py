"""Exact cosine k-nearest-neighbour search on REIR embeddings.

The similarity of two images is the mean over branches of the per-branch cosine,
i.e. the dot product of their flattened, per-branch-normalised embeddings divided
by the ensemble size. Search runs in query chunks with ``topk``, so memory stays
O(N * (D + k)) and no N x N matrix is ever built.
"""

from __future__ import annotations

import torch


def flatten(features: torch.Tensor) -> torch.Tensor:
    """``[N, ensemble, meta]`` -> ``[N, ensemble * meta]`` scaled so dot products are mean cosines."""
    if features.dim() == 2:
        return features
    return features.reshape(len(features), -1) / features.shape[1] ** 0.5


def knn(queries: torch.Tensor, references: torch.Tensor, k: int, exclude_self: bool = False,
        chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` references for every query: ``(scores, indices)``, each ``[Q, k]``, best first.

    With ``exclude_self`` the queries are the references and each query's own row is
    never returned. ``k`` is clipped to the number of candidates.
    """
    queries, references = flatten(queries).float(), flatten(references).float()
    candidates = len(references) - (1 if exclude_self else 0)
    k = max(0, min(k, candidates))
    scores = torch.empty(len(queries), k)
    indices = torch.empty(len(queries), k, dtype=torch.long)
    for start in range(0, len(queries), chunk_size):
        block = queries[start:start + chunk_size] @ references.T
        if exclude_self:
            rows = torch.arange(len(block))
            block[rows, rows + start] = float("-inf")
        top = block.topk(k, dim=1) if k else (block[:, :0], block[:, :0].long())
        scores[start:start + len(block)] = top[0].cpu()
        indices[start:start + len(block)] = top[1].cpu()
    return scores, indices
