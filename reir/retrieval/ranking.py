"""Ranking for exact retrieval metrics: per query, where its first relevant reference ranks and its top R.

None of the metrics needs a K-nearest-neighbour list. Recall@K for every K needs, per
query, only the rank of its first relevant reference: how many references of other
classes come before its best same-class reference (higher score first, then lower
reference index). MAP@R and R-precision need only the top R. So references are
ordered by class and cut into square tiles of one size; one pass of tile GEMMs
(only the upper triangle in self-retrieval, since the scores are symmetric) keeps,
per query, those counts and a top-R list, looking only at the few scores at or
above a per-query threshold. The result is a ``Ranks``; ``reir.retrieval.metrics``
turns it into numbers.

On the CPU (``CompiledRanking``) the tiles come from a bf16 GEMM where the CPU has
native bf16 arithmetic (fp32 elsewhere) and are scanned by compiled code
(``reir.retrieval.tilescan``); every score that decides a metric is recomputed exactly in
float64 whenever the tile's rounding (bounded per pair) could change the decision.
On other devices (``TensorRanking``) the scores are the fp32 tile GEMM's, each from a
GEMM of the same shape, so that a pair scores the same in whichever tile it lies.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

# Rows (and columns) of one score tile: 2048 x 2048 floats = 16 MB.
TILE = 2048
# Below this BLAS libraries switch to small-matrix code whose rounding depends on where an entry lies.
MIN_TILE = 64
# A block's tiles that hold its own classes are kept (not recomputed) up to this many.
KEPT_OWN_TILES = 4


@dataclass(frozen=True)
class Ranks:
    """What a ranking knows per padded query row (padding rows have ``valid`` False), all the metrics need."""

    valid: torch.Tensor  # [rows] bool: a real query, not padding
    query_class: torch.Tensor  # [rows] class id of the query
    relevant: torch.Tensor  # [rows] R: references of its class, the query itself not counted
    before: torch.Tensor  # [rows] other-class references ranked before its best relevant one (exact while < max K)
    top_index: torch.Tensor  # [rows, k] its best references in order (exact while before < R)
    reference_class: torch.Tensor  # [references] class id of each reference


def relevant_counts(query_labels: torch.Tensor, reference_labels: torch.Tensor, self_retrieval: bool) -> torch.Tensor:
    """R per query: reference images of its class, not counting the query itself."""
    classes, counts = torch.unique(reference_labels, return_counts=True)
    position = torch.searchsorted(classes, query_labels.contiguous()).clamp(max=len(classes) - 1)
    r = torch.where(classes[position] == query_labels, counts[position], 0)
    return r - 1 if self_retrieval else r


class Ranking:
    """Per query: how many other-class references come before its best relevant one, and its top R.

    Queries and references are sorted by class and split into blocks of at most ``tile``
    rows that hold whole classes (a larger class spans several blocks of its own), padded
    to ``tile`` rows so that every GEMM has one shape. Row state is kept per padded row.
    Subclasses fill the state in ``rank``, which returns it as ``Ranks``.
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
        self.loaded: list[int | None] = [None, None]  # which block each tile buffer holds
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

    def ranks(self) -> Ranks:
        return Ranks(valid=self.valid, query_class=self.row_class, relevant=self.relevant, before=self.before,
                     top_index=self.top_index, reference_class=self.reference_ids)


class TensorRanking(Ranking):
    """fp32 tile GEMMs and tensor operations (devices other than the CPU)."""

    def rank(self) -> Ranks:
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
        return self.ranks()

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

class CompiledRanking(Ranking):
    """Fast tile GEMMs, scanned by ``reir.retrieval.tilescan``; decisive scores recomputed exactly (CPU)."""

    score_dtype = torch.float64

    def rank(self) -> Ranks:
        # the tile GEMMs must run in the precision their error bound assumes
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            with torch.autocast("cpu", enabled=False):
                self._rank_tiles()
        finally:
            torch.set_float32_matmul_precision(precision)
        return self.ranks()

    def _rank_tiles(self) -> None:
        from reir.retrieval import tilescan

        tile, dim = self.tile, self.queries.shape[1]
        queries, references = self.queries.contiguous().numpy(), self.references.contiguous().numpy()
        bf16 = native_bf16()
        shift, tile_dtype, bits = (16, torch.bfloat16, (torch.int16, np.uint16)) if bf16 else (
            0, torch.float32, (torch.int32, np.uint32))
        rounding = tilescan.TileRounding(shift, *tile_error(dim, bf16))
        query_bits, reference_bits = queries.view(np.uint32), references.view(np.uint32)
        query_bounds = tilescan.error_bounds(query_bits, shift)
        reference_bounds = query_bounds if self.self_retrieval else tilescan.error_bounds(reference_bits, shift)
        query_index, reference_index = self.query_index.numpy(), self.reference_index.numpy()
        # [blocks, tile, 3]: the bounds of each block row (padding rows are never visited)
        row_bounds = query_bounds[np.maximum(query_index, 0)]
        column_bounds = row_bounds if self.self_retrieval else reference_bounds[np.maximum(reference_index, 0)]
        state = tilescan.ScanState(
            threshold=self.threshold.numpy(), best_score=self.best_score.numpy(), best_index=self.best_index.numpy(),
            before=self.before.numpy(), relevant=self.relevant.numpy(), query_class=self.row_class.numpy(),
            top_scores=self.top_scores.numpy(), top_index=self.top_index.numpy(), top_bound=self.top_bound.numpy())
        tilescan.best_relevant(queries, references, query_index.reshape(-1), self.reference_order.numpy(),
                               self.class_start.numpy(), self.class_stop.numpy(), self.sorted_position.numpy(),
                               self.self_retrieval, state.best_score, state.best_index, state.top_bound)
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
                row_side = tilescan.TileSide(
                    base=block * tile, reference=query_index[block], classes=row_class[block],
                    features=row_exact.view(np.float32), bounds=row_bounds[block], scan=rows)
                column_side = tilescan.TileSide(
                    base=reference_block * tile, reference=reference_index[reference_block],
                    classes=column_class[reference_block],
                    features=(row_exact if diagonal else column_exact).view(np.float32),
                    bounds=column_bounds[reference_block], scan=columns)
                tilescan.scan_tile(score_bits, stop - start, reference_stop - reference_start, diagonal,
                                   row_side, column_side, state, self.max_recall, rounding)


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

