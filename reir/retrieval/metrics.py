"""Retrieval and clustering metrics: Recall@K, precision@1, R-precision, MAP@R, NMI.

Two protocols: self-retrieval (every test image queries all the others; the query
itself is excluded) and query -> gallery. R for a query is the number of other
images of its class among the references. Definitions follow "A Metric Learning
Reality Check" (Musgrave et al., 2020) and agree with pytorch-metric-learning's
AccuracyCalculator: queries whose class has no other reference image ("lone"
queries) are left out of precision@1, R-precision and MAP@R, while Recall@K, as
in the original REIR, averages over every query (a lone query is a miss).

None of these needs a K-nearest-neighbour list. Recall@K for every K needs, per
query, only the rank of its first relevant reference: how many references of other
classes come before its best same-class reference (higher score first, then lower
reference index). MAP@R and R-precision need only the top R. So references are
ordered by class and cut into square tiles of one size; one pass of tile GEMMs
(only the upper triangle in self-retrieval, since the scores are symmetric) keeps,
per query, those counts and a top-R list, looking only at the few scores at or
above a per-query threshold.

On the CPU (``_CompiledRanking``) the tiles come from a bf16 GEMM where the CPU has
native bf16 arithmetic (fp32 elsewhere) and are scanned by compiled code
(``reir.retrieval.tilescan``); every score that decides a metric is recomputed exactly in
float64 whenever the tile's rounding (bounded per pair) could change the decision.
On other devices (``_TensorRanking``) the scores are the fp32 tile GEMM's, each from a
GEMM of the same shape, so that a pair scores the same in whichever tile it lies.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from reir.errors import ReirError
from reir.retrieval.similarity import faiss_available, flatten
from reir.validation import as_features, check_labels

KMEANS_ITERATIONS = 20
KMEANS_SEED = 1234
# Rows (and columns) of one score tile: 2048 x 2048 floats = 16 MB.
TILE = 2048
# Below this BLAS libraries switch to small-matrix code whose rounding depends on where an entry lies.
MIN_TILE = 64
# A block's tiles that hold its own classes are kept (not recomputed) up to this many.
KEPT_OWN_TILES = 4
# Devices ranked by ``_CompiledRanking`` (compiled scan, exact float64 rescoring); others by ``_TensorRanking``.
COMPILED_SCAN_DEVICES = ("cpu",)


def relevant_counts(query_labels: torch.Tensor, reference_labels: torch.Tensor, self_retrieval: bool) -> torch.Tensor:
    """R per query: reference images of its class, not counting the query itself."""
    classes, counts = torch.unique(reference_labels, return_counts=True)
    position = torch.searchsorted(classes, query_labels.contiguous()).clamp(max=len(classes) - 1)
    r = torch.where(classes[position] == query_labels, counts[position], 0)
    return r - 1 if self_retrieval else r


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
    ranking = (_CompiledRanking if device.type in COMPILED_SCAN_DEVICES else _TensorRanking)(
        queries, query_labels, references, gallery_labels, self_retrieval, max(recalls), device, chunk_size or TILE)
    ranking.rank()
    return ranking.metrics(recalls)


class _Ranking:
    """Per query: how many other-class references come before its best relevant one, and its top R.

    Queries and references are sorted by class and split into blocks of at most ``tile``
    rows that hold whole classes (a larger class spans several blocks of its own), padded
    to ``tile`` rows so that every GEMM has one shape. Row state is kept per padded row.
    Subclasses fill the state in ``rank``.
    """

    score_dtype = torch.float32

    def __init__(self, queries, query_labels, references, reference_labels, self_retrieval, max_recall, device, tile):
        self.self_retrieval, self.device = self_retrieval, device
        classes, ids = torch.unique(torch.cat([query_labels, reference_labels]), return_inverse=True)
        query_ids, reference_ids = ids[:len(query_labels)], ids[len(query_labels):]
        self.query_ids, self.reference_ids = query_ids.to(device), reference_ids.to(device)
        self.tile = tile = max(MIN_TILE, min(tile, max(len(queries), len(references))))
        query_order = torch.argsort(query_ids, stable=True)
        reference_order = query_order if self_retrieval else torch.argsort(reference_ids, stable=True)
        class_starts = torch.searchsorted(reference_ids[reference_order], torch.arange(len(classes) + 1))
        self.query_blocks = _class_blocks(query_ids[query_order], class_starts, tile)
        self.reference_blocks = self.query_blocks if self_retrieval else [
            (start, min(start + tile, len(references))) for start in range(0, len(references), tile)]
        sorted_query_ids = query_ids[query_order]
        self.class_starts, self.sorted_query_ids = class_starts, sorted_query_ids
        # each query's relevant references are one run of sorted reference positions
        sorted_position = torch.full((len(self.query_blocks), tile), -1, dtype=torch.long)
        for block, (start, stop) in enumerate(self.query_blocks):
            sorted_position[block, :stop - start] = torch.arange(start, stop)
        row_ids = torch.where(sorted_position >= 0, sorted_query_ids[sorted_position.clamp(min=0)], 0)
        self.class_start = torch.where(sorted_position >= 0, class_starts[row_ids], 0).flatten().to(device)
        self.class_stop = torch.where(sorted_position >= 0, class_starts[row_ids + 1], 0).flatten().to(device)
        self.sorted_position = sorted_position.flatten().to(device)
        self.reference_order = reference_order.to(device)
        # blocks are gathered tile by tile into two buffers: no sorted copy of the embeddings
        self.queries = queries.detach().to(device, torch.float32)
        self.references = self.queries if self_retrieval else references.detach().to(device, torch.float32)
        self.query_index = _block_index(query_order, self.query_blocks, tile).to(device)
        self.reference_index = self.query_index if self_retrieval else _block_index(
            reference_order, self.reference_blocks, tile).to(device)
        self.loaded = [None, None]  # which block each tile buffer holds
        padded_rows = self.query_index.numel()
        valid = self.query_index >= 0
        self.valid = valid.flatten()
        self.row_class = torch.where(valid, self.query_ids[self.query_index.clamp(min=0)], -1).flatten()
        self.column_class = torch.where(self.reference_index >= 0,
                                        self.reference_ids[self.reference_index.clamp(min=0)], -2)
        relevant = relevant_counts(query_ids, reference_ids, self_retrieval).to(device)
        self.relevant = torch.where(valid, relevant[self.query_index.clamp(min=0)], 0).flatten()
        self.max_recall = max_recall
        self.k = max(1, int(self.relevant.max()) if padded_rows else 1)
        inf, scores = float("inf"), dict(device=device, dtype=self.score_dtype)
        self.best_score = torch.full((padded_rows,), -inf, **scores)
        self.best_index = torch.full((padded_rows,), len(references), device=device)
        self.top_bound = torch.full((padded_rows,), -inf, **scores)  # at most the R-th best score
        self.before = torch.zeros(padded_rows, dtype=torch.long, device=device)
        self.threshold = torch.full((padded_rows,), inf, **scores)
        self.top_scores = torch.full((padded_rows, self.k), -inf, **scores)
        self.top_index = torch.full((padded_rows, self.k), len(references), device=device)

    def _rows(self, block: int) -> slice:
        return slice(block * self.tile, (block + 1) * self.tile)

    def _open(self, block: int) -> bool:
        return bool(torch.isfinite(self.threshold[self._rows(block)]).any())

    def metrics(self, recalls: list[int]) -> dict[str, float]:
        valid = self.valid
        relevant, before = self.relevant[valid], self.before[valid]
        queries = len(relevant)
        metrics = {f"recall@{k}": ((relevant > 0) & (before < k)).double().mean().item() if queries else float("nan")
                   for k in recalls}
        scored = torch.nonzero(self.valid & (self.relevant > 0)).flatten()
        if not len(scored):
            return {**metrics, "precision@1": float("nan"), "r_precision": float("nan"), "map@r": float("nan")}
        ranks = torch.arange(1, self.k + 1, dtype=torch.float64, device=self.device)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for rows in scored.split(8192):  # in chunks: [queries, R] temporaries would add to the peak memory
            relevant = self.relevant[rows].double()
            top = self.top_index[rows].clamp(max=len(self.reference_ids) - 1)
            hits = self.reference_ids[top] == self.row_class[rows][:, None]
            hits &= (ranks[None] <= relevant[:, None]) & (self.before[rows] < self.relevant[rows])[:, None]
            sums += torch.stack([hits[:, 0].double().sum(), (hits.sum(dim=1) / relevant).sum(),
                                 ((hits.cumsum(dim=1) / ranks * hits).sum(dim=1) / relevant).sum()])
        metrics["precision@1"], metrics["r_precision"], metrics["map@r"] = (sums / len(scored)).tolist()
        return metrics


class _TensorRanking(_Ranking):
    """fp32 tile GEMMs and tensor operations (devices other than the CPU)."""

    def rank(self) -> None:
        tile, class_starts, ids = self.tile, self.class_starts, self.sorted_query_ids
        # own reference range of each query block (the references of its classes), the widest class,
        # and the block and column of every sorted reference position: how _own_tiles finds them
        self.own_ranges = [(int(class_starts[ids[start]]), int(class_starts[ids[stop - 1] + 1]))
                           for start, stop in self.query_blocks]
        self.widest = max(1, int((class_starts[1:] - class_starts[:-1]).max()))
        position_block = torch.empty(len(self.references), dtype=torch.long)
        position_column = torch.empty(len(self.references), dtype=torch.long)
        for block, (start, stop) in enumerate(self.reference_blocks):
            position_block[start:stop], position_column[start:stop] = block, torch.arange(stop - start)
        self.position_block, self.position_column = position_block.to(self.device), position_column.to(self.device)
        self.row_features = torch.zeros(tile, self.queries.shape[1], device=self.device)
        self.column_features = torch.zeros(tile, self.queries.shape[1], device=self.device)
        self.buffer = torch.empty(tile, tile, device=self.device)
        self.mask = torch.empty(tile, tile, dtype=torch.bool, device=self.device)
        self.done: set[tuple[int, int]] = set()
        for block in range(len(self.query_blocks)):
            self._own_tiles(block)
        self._remaining_tiles()

    def _score_tile(self, block: int, reference_block: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of a query block against a reference block; padding and the query itself at -inf."""
        rows = self.query_blocks[block][1] - self.query_blocks[block][0]
        columns = self.reference_blocks[reference_block][1] - self.reference_blocks[reference_block][0]
        if self.loaded[0] != block:
            _gather(self.queries, self.query_index[block, :rows], self.row_features)
            self.loaded[0] = block
        if self.self_retrieval and block == reference_block:
            column_features = self.row_features
        else:
            if self.loaded[1] != reference_block:
                _gather(self.references, self.reference_index[reference_block, :columns], self.column_features)
                self.loaded[1] = reference_block
            column_features = self.column_features
        scores = torch.mm(self.row_features, column_features.T, out=out)
        scores[rows:] = -float("inf")
        scores[:, columns:] = -float("inf")
        if self.self_retrieval and block == reference_block:
            scores.fill_diagonal_(-float("inf"))
        return scores

    def _own_tiles(self, block: int) -> None:
        """Best and worst relevant score of the block's queries, read from the tiles that hold their classes."""
        start, stop = self.own_ranges[block]
        own = [j for j, (s, e) in enumerate(self.reference_blocks) if s < stop and e > start] if start < stop else []
        rows, keep, kept = self._rows(block), len(own) <= KEPT_OWN_TILES, []
        inf = float("inf")
        positions = self.class_start[rows, None] + torch.arange(self.widest, device=self.device)
        relevant = positions < self.class_stop[rows, None]
        if self.self_retrieval:
            relevant &= positions != self.sorted_position[rows, None]
        positions = positions.clamp(max=len(self.reference_ids) - 1)
        tile_of, column = self.position_block[positions], self.position_column[positions]
        relevant_scores = torch.full(positions.shape, -inf, device=self.device)
        ranks = min(self.k, self.tile)
        for reference_block in own:
            scores = self._score_tile(block, reference_block, None if keep else self.buffer)
            relevant_scores = torch.where(relevant & (tile_of == reference_block), scores.gather(1, column),
                                          relevant_scores)
            # the R-th best score of any tile bounds the top R from below
            kth = scores.topk(ranks, dim=1).values.gather(1, (self.relevant[rows, None] - 1).clamp(0, ranks - 1))
            kth = torch.where(self.relevant[rows] <= ranks, kth[:, 0], -inf)
            self.top_bound[rows] = torch.maximum(self.top_bound[rows], kth)
            if keep:
                kept.append((reference_block, scores))
        best = relevant_scores.amax(dim=1)
        self.best_score[rows] = best
        self.best_index[rows] = torch.where(relevant & (relevant_scores == best[:, None]),
                                            self.reference_order[positions], len(self.reference_ids)).amin(dim=1)
        worst = relevant_scores.masked_fill(~relevant, inf).amin(dim=1)
        self.top_bound[rows] = torch.maximum(self.top_bound[rows], worst)
        self._update_thresholds(rows)
        for reference_block, scores in kept:
            self._scan(scores, block, reference_block, rows=True, columns=False)
            self.done.add((block, reference_block))

    def _remaining_tiles(self) -> None:
        blocks, reference_blocks = len(self.query_blocks), len(self.reference_blocks)
        for block in range(blocks):
            first = block if self.self_retrieval else 0
            for reference_block in range(first, reference_blocks):
                rows = (block, reference_block) not in self.done and self._open(block)
                # in self-retrieval the tile also serves the reference block's queries (transposed)
                columns = (self.self_retrieval and reference_block != block
                           and (reference_block, block) not in self.done and self._open(reference_block))
                if rows or columns:
                    self._scan(self._score_tile(block, reference_block, self.buffer), block, reference_block,
                               rows, columns)

    def _scan(self, scores: torch.Tensor, block: int, reference_block: int, rows: bool, columns: bool) -> None:
        """Visit the scores at or above each query's threshold: count those before its best relevant one,
        keep those that may be in its top R. ``rows``: for the block's queries; ``columns``: for the
        reference block's queries (self-retrieval)."""
        if rows:
            self._scan_direction(scores, block, reference_block, transposed=False)
        if columns:
            self._scan_direction(scores, reference_block, block, transposed=True)

    def _scan_direction(self, scores: torch.Tensor, block: int, reference_block: int, transposed: bool) -> None:
        rows = self._rows(block)
        threshold = self.threshold[rows]
        mask = torch.ge(scores, threshold[None] if transposed else threshold[:, None], out=self.mask)
        found = mask.nonzero()
        if len(found):
            with _one_thread(self.device):
                self._count_and_merge(scores, found, block, reference_block, transposed)

    def _count_and_merge(self, scores, found, block, reference_block, transposed) -> None:
        rows = self._rows(block)
        values = scores[found[:, 0], found[:, 1]]
        query, column = (found[:, 1], found[:, 0]) if transposed else (found[:, 0], found[:, 1])
        row = query + block * self.tile
        reference = self.reference_index[reference_block][column]
        best, best_index = self.best_score[row], self.best_index[row]
        ahead = (self.column_class[reference_block][column] != self.row_class[row]) & (
            (values > best) | ((values == best) & (reference < best_index)))
        alive = (self.before[rows] < self.relevant[rows])[query]  # best relevant still within the top R
        self.before[rows] += torch.bincount(query[ahead], minlength=self.tile)
        if alive.any():
            self._merge(row[alive], reference[alive], values[alive])
        self._update_thresholds(rows)

    def _merge(self, row: torch.Tensor, reference: torch.Tensor, values: torch.Tensor) -> None:
        """Fold candidates into the per-query top lists, ordered by score, then reference index."""
        rows, slot = torch.unique(row, return_inverse=True)
        k = self.k
        slot = torch.cat([torch.arange(len(rows), device=self.device).repeat_interleave(k), slot])
        values = torch.cat([self.top_scores[rows].flatten(), values])
        reference = torch.cat([self.top_index[rows].flatten(), reference])
        order = torch.argsort(reference, stable=True)
        order = order[torch.argsort(values[order], descending=True, stable=True)]
        order = order[torch.argsort(slot[order], stable=True)]
        slot, values, reference = slot[order], values[order], reference[order]
        counts = torch.bincount(slot, minlength=len(rows))
        position = torch.arange(len(slot), device=self.device) - (torch.cumsum(counts, 0) - counts)[slot]
        kept = position < k
        top_scores, top_index = self.top_scores[rows], self.top_index[rows]
        top_scores[slot[kept], position[kept]] = values[kept]
        top_index[slot[kept], position[kept]] = reference[kept]
        self.top_scores[rows], self.top_index[rows] = top_scores, top_index

    def _update_thresholds(self, rows: slice) -> None:
        """Top-R candidates while the best relevant can still be in the top R, then only the count
        (scores at or above the best relevant), then nothing once past the largest K."""
        relevant, before = self.relevant[rows], self.before[rows]
        kth = self.top_scores[rows].gather(1, (relevant[:, None] - 1).clamp(min=0))[:, 0]
        # never above the best relevant score: every score ahead of it must be seen and counted
        top = torch.minimum(torch.maximum(kth, self.top_bound[rows]), self.best_score[rows])
        threshold = torch.where(before < relevant, top,
                                torch.where(before < self.max_recall, self.best_score[rows], float("inf")))
        self.threshold[rows] = torch.where(relevant > 0, threshold, float("inf"))

class _CompiledRanking(_Ranking):
    """Fast tile GEMMs, scanned by ``reir.retrieval.tilescan``; decisive scores recomputed exactly (CPU)."""

    score_dtype = torch.float64

    def rank(self) -> None:
        # the tile GEMMs must run in the precision their error bound assumes
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            with torch.autocast("cpu", enabled=False):
                self._rank_tiles()
        finally:
            torch.set_float32_matmul_precision(precision)

    def _rank_tiles(self) -> None:
        from reir.retrieval import tilescan

        tile, dim = self.tile, self.queries.shape[1]
        queries, references = self.queries.contiguous().numpy(), self.references.contiguous().numpy()
        bf16 = native_bf16()
        shift, tile_dtype, bits = (16, torch.bfloat16, (torch.int16, np.uint16)) if bf16 else (
            0, torch.float32, (torch.int32, np.uint32))
        accumulation, output = tile_error(dim, bf16)
        query_bits, reference_bits = queries.view(np.uint32), references.view(np.uint32)
        query_bounds = tilescan.error_bounds(query_bits, shift)
        reference_bounds = query_bounds if self.self_retrieval else tilescan.error_bounds(reference_bits, shift)
        query_index, reference_index = self.query_index.numpy(), self.reference_index.numpy()
        # [blocks, tile, 3]: the bounds of each block row (padding rows are never visited)
        row_bounds = query_bounds[np.maximum(query_index, 0)]
        column_bounds = row_bounds if self.self_retrieval else reference_bounds[np.maximum(reference_index, 0)]
        state = tuple(t.numpy() for t in (self.threshold, self.best_score, self.best_index, self.before, self.relevant,
                                          self.row_class, self.top_scores, self.top_index, self.top_bound))
        tilescan.best_relevant(queries, references, query_index.reshape(-1), self.reference_order.numpy(),
                               self.class_start.numpy(), self.class_stop.numpy(), self.sorted_position.numpy(),
                               self.self_retrieval, state[1], state[2], state[8])
        # every relevant score is at least the worst one, so the R-th best score is too
        self.threshold.copy_(torch.where(self.relevant > 0, self.top_bound, float("inf")))
        row_tile, column_tile = (torch.zeros(tile, dim, dtype=tile_dtype) for _ in range(2))
        scores = torch.empty(tile, tile, dtype=tile_dtype)
        row_rounded, column_rounded, score_bits = (t.view(bits[0]).numpy().view(bits[1])
                                                   for t in (row_tile, column_tile, scores))
        # the blocks' fp32 rows, for the scores computed one by one (the tiles themselves when fp32)
        row_exact, column_exact = (np.zeros((tile, dim), np.uint32) for _ in range(2)) if bf16 else (
            row_rounded, column_rounded)
        row_class, column_class = self.row_class.view(-1, tile).numpy(), self.column_class.numpy()
        for block, (start, stop) in enumerate(self.query_blocks):
            first = block if self.self_retrieval else 0
            for reference_block in range(first, len(self.reference_blocks)):
                diagonal = self.self_retrieval and reference_block == block
                rows = self._open(block)
                columns = self.self_retrieval and not diagonal and self._open(reference_block)
                if not (rows or columns):
                    continue
                if self.loaded[0] != block:
                    tilescan.gather_tile(query_bits, query_index[block], stop - start, row_exact, row_rounded, shift)
                    self.loaded[0] = block
                reference_start, reference_stop = self.reference_blocks[reference_block]
                if not diagonal and self.loaded[1] != reference_block:
                    tilescan.gather_tile(reference_bits, reference_index[reference_block],
                                         reference_stop - reference_start, column_exact, column_rounded, shift)
                    self.loaded[1] = reference_block
                torch.mm(row_tile, (row_tile if diagonal else column_tile).T, out=scores)
                tilescan.scan_tile(
                    score_bits, shift, stop - start, reference_stop - reference_start, diagonal, block * tile,
                    reference_block * tile, query_index[block], reference_index[reference_block], row_class[block],
                    column_class[reference_block], row_exact.view(np.float32),
                    (row_exact if diagonal else column_exact).view(np.float32), row_bounds[block],
                    column_bounds[reference_block], rows, columns, state, self.max_recall, accumulation, output)


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16, AMX): then bf16 tiles are about 2.5x
    faster than fp32 ones; elsewhere bf16 would be emulated, and tiles stay fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def tile_error(dim: int, bf16: bool) -> tuple[float, float]:
    """Rounding-error coefficients of a tile score: ``accumulation`` (fp32 sums of ``dim`` exact
    products, times the norms of the rounded rows) and ``output`` (times |tile score|: the bf16
    rounding of the result)."""
    unit = 2.0 ** -24
    accumulation = dim * unit / (1 - dim * unit)
    output = 2.0 ** -8 / (1 - 2.0 ** -8) if bf16 else 0.0
    return accumulation, output


@contextmanager
def _one_thread(device: torch.device):
    """Run the bookkeeping on small tensors on one CPU thread: split across threads it waits on
    thread hand-offs, which on a loaded machine cost more than the work."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _class_blocks(sorted_ids: torch.Tensor, class_starts: torch.Tensor, tile: int) -> list[tuple[int, int]]:
    """Consecutive runs of whole classes with at most ``tile`` queries and ``tile`` own references each;
    a larger class gets blocks of its own."""
    classes, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    own = (class_starts[classes + 1] - class_starts[classes]).tolist()
    blocks, start, rows, columns = [], 0, 0, 0
    for count, references in zip(counts.tolist(), own):
        if rows and (rows + count > tile or columns + references > tile):
            blocks.append((start, start + rows))
            start, rows, columns = start + rows, 0, 0
        if count > tile or references > tile:
            blocks.extend((s, min(s + tile, start + count)) for s in range(start, start + count, tile))
            start += count
            continue
        rows, columns = rows + count, columns + references
    if rows:
        blocks.append((start, start + rows))
    return blocks


def _block_index(order: torch.Tensor, blocks, tile: int) -> torch.Tensor:
    """``[blocks, tile]``: the original index of each block row, in class order (-1: padding)."""
    index = torch.full((len(blocks), tile), -1, dtype=torch.long)
    for block, (start, stop) in enumerate(blocks):
        index[block, :stop - start] = order[start:stop]
    return index


def _gather(features: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """Rows ``index`` of ``features`` into ``out``, the rest of ``out`` zero (every tile has one shape)."""
    torch.index_select(features, 0, index, out=out[:len(index)])
    out[len(index):] = 0


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
    labels = labels.cpu().numpy()
    assignment = cluster(features, len(np.unique(labels)), seed)
    return normalized_mutual_information(labels, assignment)


def normalized_mutual_information(first, second) -> float:
    """Mutual information of two labelings over the arithmetic mean of their entropies (natural log).

    scikit-learn's ``normalized_mutual_info_score`` defines it the same way (1.0 when both labelings
    are a single class); computed here because importing scikit-learn's metrics costs every
    ``reir eval`` and training run about a second.
    """
    first, second = (np.unique(np.asarray(x), return_inverse=True)[1].ravel() for x in (first, second))
    rows, columns = int(first.max(initial=-1)) + 1, int(second.max(initial=-1)) + 1
    if rows <= 1 and columns <= 1:
        return 1.0
    joint = np.bincount(first * columns + second, minlength=rows * columns).reshape(rows, columns) / len(first)
    first_marginal, second_marginal = joint.sum(1), joint.sum(0)
    present = joint > 0
    mutual = float((joint[present] * np.log(joint[present] / np.outer(first_marginal, second_marginal)[present])).sum())
    entropies = [-float((m[m > 0] * np.log(m[m > 0])).sum()) for m in (first_marginal, second_marginal)]
    return max(mutual, 0.0) / max(sum(entropies) / 2, np.finfo(np.float64).eps)


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
