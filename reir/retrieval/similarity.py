"""Exact cosine k-nearest-neighbour search on REIR embeddings.

The similarity of two images is the mean over branches of the per-branch cosine,
i.e. the dot product of their flattened, per-branch-normalised embeddings divided
by the ensemble size. Search runs over blocks of queries, so memory stays
O(N * (D + k)) and no N x N matrix is ever built. Two engines compute the same
answer: chunked matmul + ``topk`` in torch (CPU or GPU) and FAISS ``IndexFlatIP``
(CPU, when installed). Ties are broken the same way by both: higher score first,
then lower reference index, so results do not depend on the engine or chunking.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from reir.errors import ReirError, UsageError
from reir.retrieval.results import Results

BACKENDS = ("auto", "torch", "faiss")
# Below this many query x reference pairs the engines cost the same; torch avoids an index copy.
FAISS_MIN_PAIRS = 50_000_000
# Similarity block kept in memory at once (floats): 64M floats = 256 MB.
BLOCK_FLOATS = 1 << 26


def flatten(features: torch.Tensor) -> torch.Tensor:
    """``[N, ensemble, meta]`` -> ``[N, ensemble * meta]`` scaled so dot products are mean cosines."""
    if features.dim() == 2:
        return features
    return features.reshape(len(features), -1) / features.shape[1] ** 0.5


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401 - imported only to learn whether it can be
    except ImportError:
        return False
    return True


def choose_backend(backend: str, num_queries: int, num_references: int, device: torch.device) -> str:
    """FAISS for large CPU searches when it is installed, torch otherwise (always on GPU)."""
    if backend not in BACKENDS:
        raise UsageError(f"search backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if backend == "faiss":
        if not faiss_available():
            raise UsageError("the faiss backend needs faiss-cpu; pip install faiss-cpu or use backend torch")
        return "faiss"
    if backend == "torch" or device.type != "cpu" or not faiss_available():
        return "torch"
    return "faiss" if num_queries * num_references >= FAISS_MIN_PAIRS else "torch"


def default_chunk_size(num_references: int, k: int) -> int:
    return max(1, min(4096, BLOCK_FLOATS // max(num_references + k, 1)))


def iter_knn(queries: torch.Tensor, references: torch.Tensor, k: int, exclude_self: bool = False,
             chunk_size: int | None = None, backend: str = "auto",
             device: torch.device | str | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, scores, indices)`` for consecutive blocks of queries, best first.

    Callers that only reduce the neighbours (metrics) never hold all of them at once.
    With ``exclude_self`` the queries are the references and each query's own row is
    never returned. ``k`` is clipped to the number of candidates.
    """
    queries, references = flatten(queries), flatten(references)
    if queries.shape[1] != references.shape[1]:
        raise ReirError(f"queries have dimension {queries.shape[1]} but references {references.shape[1]}; "
                        "use embeddings from the same model")
    if exclude_self and len(queries) != len(references):
        raise ReirError("exclude_self needs the queries to be the references")
    device = torch.device(device) if device is not None else references.device
    engine = choose_backend(backend, len(queries), len(references), device)
    k = max(0, min(k, len(references) - (1 if exclude_self else 0)))
    chunk_size = chunk_size or default_chunk_size(len(references), k)
    if engine == "faiss":
        yield from _faiss_blocks(queries, references, k, exclude_self, chunk_size)
    else:
        yield from _torch_blocks(queries, references, k, exclude_self, chunk_size, device)


def knn(queries: torch.Tensor, references: torch.Tensor, k: int, exclude_self: bool = False,
        chunk_size: int | None = None, backend: str = "auto",
        device: torch.device | str | None = None) -> Results:
    """Top-``k`` references for every query, best first, on CPU (unpacks as ``scores, indices``, each ``[Q, k]``)."""
    k = max(0, min(k, len(references) - (1 if exclude_self else 0)))
    scores = torch.empty(len(queries), k)
    indices = torch.empty(len(queries), k, dtype=torch.long)
    for start, s, i in iter_knn(queries, references, k, exclude_self, chunk_size, backend, device):
        scores[start:start + len(s)] = s
        indices[start:start + len(s)] = i
    return Results(scores, indices, len(references))


def _torch_blocks(queries, references, k, exclude_self, chunk_size, device):
    references = references.to(device, torch.float32)
    extra = min(k + 1, len(references))  # one more than needed reveals a tie at the boundary
    for start in range(0, len(queries), chunk_size):
        block = queries[start:start + chunk_size].to(device, torch.float32) @ references.T
        if exclude_self:
            rows = torch.arange(len(block), device=device)
            block[rows, rows + start] = float("-inf")
        scores, indices = block.topk(extra, dim=1) if extra else (block[:, :0], block[:, :0].long())
        scores, indices = _resolve_ties(scores, indices, k, lambda rows, block=block: block[rows])
        yield start, scores.cpu(), indices.cpu()


def _faiss_blocks(queries, references, k, exclude_self, chunk_size):
    import faiss

    cpu_refs = references.detach().to("cpu", torch.float32).contiguous()
    index = faiss.IndexFlatIP(cpu_refs.shape[1])
    index.add(cpu_refs.numpy())
    extra = min(k + 1 + (1 if exclude_self else 0), len(references))
    for start in range(0, len(queries), chunk_size):
        chunk = queries[start:start + chunk_size].detach().to("cpu", torch.float32).contiguous()
        found_scores, found = index.search(chunk.numpy(), extra)
        scores, indices = torch.from_numpy(found_scores), torch.from_numpy(found)
        if exclude_self:
            scores, indices = _drop_self(scores, indices, start, min(k + 1, len(references) - 1))

        def rows_of(rows, chunk=chunk, start=start):
            block = chunk[rows] @ cpu_refs.T
            if exclude_self:
                block[torch.arange(len(rows)), rows + start] = float("-inf")
            return block

        scores, indices = _resolve_ties(scores, indices, k, rows_of)
        yield start, scores, indices


def _drop_self(scores, indices, start, keep):
    """Remove each query's own index (or the last column where it was not found)."""
    own = indices == torch.arange(start, start + len(indices))[:, None]
    missing = ~own.any(dim=1)
    own[missing, -1] = True
    shape = (len(indices), indices.shape[1] - 1)
    scores, indices = scores[~own].reshape(shape), indices[~own].reshape(shape)
    return scores[:, :keep], indices[:, :keep]


def _order(scores, indices):
    """Sort each row by score descending, then index ascending."""
    by_index = indices.argsort(dim=1)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    by_score = scores.argsort(dim=1, descending=True, stable=True)
    return scores.gather(1, by_score), indices.gather(1, by_score)


def _resolve_ties(scores, indices, k, full_rows):
    """Keep the best ``k`` of ``k + 1`` candidates, breaking ties by lower index.

    Where the k-th and (k+1)-th candidates tie, which tied references made the cut is
    arbitrary in both engines, so those rows are recomputed in full and cut exactly.
    """
    scores, indices = _order(scores, indices)
    if k == 0 or scores.shape[1] <= k:
        return scores[:, :k], indices[:, :k]
    tied = (scores[:, k - 1] == scores[:, k]).nonzero().flatten()
    scores, indices = scores[:, :k].clone(), indices[:, :k].clone()
    if len(tied):
        block = full_rows(tied)
        for row, values in zip(tied.tolist(), block):
            cut = values.topk(k).values[-1]  # from the recomputed row: FAISS may round differently
            above = (values > cut).nonzero().flatten()
            level = (values == cut).nonzero().flatten()[: k - len(above)]
            chosen = torch.cat([above, level])
            row_scores, row_indices = _order(values[chosen][None], chosen[None])
            scores[row], indices[row] = row_scores[0].to(scores.device), row_indices[0].to(indices.device)
    return scores, indices


def streamed_knn(queries: torch.Tensor, chunks, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over vectors given in chunks, merged chunk by chunk (ties to the lower id, as knn)."""
    best_scores = torch.empty(len(queries), 0)
    best_ids = torch.empty(len(queries), 0, dtype=torch.long)
    start = 0
    for vectors in chunks:
        scores, ids = knn(queries, vectors, k)
        scores = torch.cat([best_scores, scores], 1)
        ids = torch.cat([best_ids, ids + start], 1)
        order = torch.argsort(ids, dim=1)  # stable sort by score below then keeps lower ids first on ties
        scores, ids = scores.gather(1, order), ids.gather(1, order)
        top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        best_scores, best_ids = scores.gather(1, top), ids.gather(1, top)
        start += len(vectors)
    return best_scores, best_ids
