"""How good an approximate index is: its Recall@k against exact search over the same database, and both
engines' queries per second, measured on queries drawn from the database itself."""

from __future__ import annotations

import time

import torch

from reir.retrieval.index_common import database_chunks
from reir.retrieval.similarity import flatten, streamed_knn


def recall_against_exact(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean share of each query's exact top-k that the approximate top-k also found."""
    k = exact.shape[1]
    if k == 0:
        return 1.0
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(found[:, :k], exact))
    return hits / (len(exact) * k)


def timed_search(search, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """Ids found and queries per second (queries searched in one call, as a batch)."""
    start = time.perf_counter()
    _, ids = search(queries, k)
    return ids, len(queries) / max(time.perf_counter() - start, 1e-9)


def streamed_vectors(database, splits: list[str]):
    """The database's flattened vectors in id order, one chunk (a shard of a sharded database) at a time."""
    return (flatten(features.float()) for _, features, _, _ in database_chunks(database, splits)[2])


def streamed_queries(database, splits: list[str], total: int, count: int) -> torch.Tensor:
    """A fixed random sample of the database itself, the queries, gathered in one pass over the chunks."""
    wanted = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:count]
    picked = torch.empty(len(wanted), 0)
    start = 0
    for vectors in streamed_vectors(database, splits):
        if picked.shape[1] != vectors.shape[1]:
            picked = torch.empty(len(wanted), vectors.shape[1])
        inside = (wanted >= start) & (wanted < start + len(vectors))
        picked[inside] = vectors[wanted[inside] - start]
        start += len(vectors)
    return picked


def compare_with_exact(index, database, splits: list[str], queries: torch.Tensor, k: int) -> dict[str, float]:
    """Recall@k of ``index`` against exact search over the database, and both engines' queries per second."""
    exact_ids, exact_qps = timed_search(lambda q, n: streamed_knn(q, streamed_vectors(database, splits), n),
                                        queries, k)
    found_ids, qps = timed_search(index.search, queries, k)
    return {"recall": recall_against_exact(found_ids, exact_ids), "qps": qps, "exact_qps": exact_qps}
