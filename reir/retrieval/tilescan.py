"""Compiled (numba) parts of exact evaluation on the CPU, used by ``ranking.CompiledRanking``.

Scores that decide a metric are *exact*: the dot product of two fp32 embeddings summed
in float64 (``exact_score``), where every product is exact and the sum's rounding is
below 1e-13, in one fixed order so that a pair scores the same wherever it is computed.
Score tiles come from a fast GEMM (bf16 or fp32) whose error is bounded per pair by
``delta`` (see ``ranking.tile_error``); a tile score can only decide when it is further
than that bound from the query's threshold, and the few within it are rescored exactly.

A tile holds about four million scores, of which a few per query matter. One vectorised
pass per tile row marks the candidates in both directions (the tile's rows as queries
and, in self-retrieval, its columns too), and only the marked scores are visited. Most
visits only count: once a query's best relevant reference has fallen out of its top R,
all that is left to learn is how many other-class references score above it.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

INF = np.inf
# relative slack when a float64 threshold is rounded down to the float32 of the tiles
ROUND_DOWN = 2.0 ** -20
# slack on every error bound: the float64 rounding of the bound and of the comparison it serves
# (relative), and products of subnormal inputs that the hardware flushes to zero (absolute)
RELATIVE_SLACK, ABSOLUTE_SLACK = 2.0 ** -40, 2.0 ** -100

# Per padded query row, updated in place by the scan: the query's threshold (scores below it are skipped),
# its best relevant reference (score and index), the other-class references counted before it, R, its class,
# its top-R list (scores and indices) and a lower bound on its R-th best score.
ScanState = namedtuple("ScanState", "threshold best_score best_index before relevant query_class "
                                    "top_scores top_index top_bound")
# One side of a tile (its rows, or its columns): ``base``, the state row of its first query; per tile row the
# ``reference`` index and ``classes`` it has as a reference, its fp32 ``features`` and error ``bounds``;
# ``scan``: whether its queries are looked at in this tile.
TileSide = namedtuple("TileSide", "base reference classes features bounds scan")
# How the tile was computed: ``shift`` 16 for bf16 tiles (0: fp32) and the coefficients of ``tile_error``.
TileRounding = namedtuple("TileRounding", "shift accumulation output")


@njit(nogil=True, cache=True)
def exact_score(features, row, other_features, other_row):
    """Float64 dot product of two fp32 rows, in eight fixed partial sums."""
    dim = features.shape[1]
    full = dim - dim % 8
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    for d in range(0, full, 8):
        s0 += np.float64(features[row, d]) * np.float64(other_features[other_row, d])
        s1 += np.float64(features[row, d + 1]) * np.float64(other_features[other_row, d + 1])
        s2 += np.float64(features[row, d + 2]) * np.float64(other_features[other_row, d + 2])
        s3 += np.float64(features[row, d + 3]) * np.float64(other_features[other_row, d + 3])
        s4 += np.float64(features[row, d + 4]) * np.float64(other_features[other_row, d + 4])
        s5 += np.float64(features[row, d + 5]) * np.float64(other_features[other_row, d + 5])
        s6 += np.float64(features[row, d + 6]) * np.float64(other_features[other_row, d + 6])
        s7 += np.float64(features[row, d + 7]) * np.float64(other_features[other_row, d + 7])
    tail = 0.0
    for d in range(full, dim):
        tail += np.float64(features[row, d]) * np.float64(other_features[other_row, d])
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)) + tail


@njit(nogil=True, cache=True, fastmath=True)
def fast_score(features, row, other_features, other_row):
    """fp32 dot product in whatever order vectorises best: within ``accumulation * |x| * |y|`` of the
    exact score, whatever the order, so it can settle a decision but never be one."""
    score = np.float32(0.0)
    for d in range(features.shape[1]):
        score += features[row, d] * other_features[other_row, d]
    return np.float64(score)


@njit(nogil=True, cache=True)
def best_relevant(queries, references, query_index, reference_order, class_start, class_stop, sorted_position,
                  self_retrieval, best_score, best_index, worst_score):
    """Per padded row: the best relevant reference (score, then lower index) and the worst relevant score."""
    for row in range(len(query_index)):
        query = query_index[row]
        if query < 0:
            continue
        best, best_at, worst = -INF, len(reference_order), INF
        for position in range(class_start[row], class_stop[row]):
            if self_retrieval and position == sorted_position[row]:
                continue
            reference = reference_order[position]
            score = exact_score(queries, query, references, reference)
            if score > best or (score == best and reference < best_at):
                best, best_at = score, reference
            worst = min(worst, score)
        best_score[row], best_index[row], worst_score[row] = best, best_at, worst


@njit(nogil=True, cache=True)
def _visit(query, reference, reference_class, score, state, max_recall):
    """An exact score of a query whose best relevant reference is still in its top R: count it,
    insert it into the top list if it belongs there, and raise the query's threshold."""
    top_scores, top_index = state.top_scores, state.top_index
    best = state.best_score[query]
    if reference_class != state.query_class[query] and (
            score > best or (score == best and reference < state.best_index[query])):
        state.before[query] += 1
    count, r = state.before[query], state.relevant[query]
    if count < r:
        slot = r - 1  # insert into the first r entries, ordered by score, then reference index
        if score > top_scores[query, slot] or (score == top_scores[query, slot] and reference < top_index[query, slot]):
            while slot > 0 and (score > top_scores[query, slot - 1] or (
                    score == top_scores[query, slot - 1] and reference < top_index[query, slot - 1])):
                top_scores[query, slot] = top_scores[query, slot - 1]
                top_index[query, slot] = top_index[query, slot - 1]
                slot -= 1
            top_scores[query, slot] = score
            top_index[query, slot] = reference
        state.threshold[query] = min(max(top_scores[query, r - 1], state.top_bound[query]), best)
    else:
        state.threshold[query] = best if count < max_recall else INF


@njit(nogil=True, cache=True, inline="always")
def _pair_error(bounds, row, other_bounds, other_row, accumulation, value, output):
    """Largest possible |tile score - exact score| of one pair: input rounding (per-row norms of the
    embedding and of its rounding error), accumulation, and rounding of the output ``value``."""
    norm, error, rounded = bounds[row, 0], bounds[row, 1], bounds[row, 2]
    other_norm, other_error, other_rounded = other_bounds[other_row, 0], other_bounds[other_row, 1], \
        other_bounds[other_row, 2]
    bound = (error * other_norm + norm * other_error + error * other_error
             + accumulation * rounded * other_rounded + output * abs(value))
    return bound * (1 + RELATIVE_SLACK) + RELATIVE_SLACK * abs(value) + ABSOLUTE_SLACK


@njit(nogil=True, cache=True, inline="always")
def _fine_error(bounds, row, other_bounds, other_row, accumulation):
    """Largest possible |fast_score - exact score| of one pair (fp32 products and sums; the slack also
    covers comparisons in float64, since |fast_score| is at most about the product of the norms)."""
    norms = bounds[row, 0] * other_bounds[other_row, 0]
    return (accumulation + RELATIVE_SLACK) * norms * (1 + RELATIVE_SLACK) + ABSOLUTE_SLACK


@njit(nogil=True, cache=True)
def _ranks_before(value, delta, best, best_at, reference, features, row, other_features, other_row, fine):
    """Whether an other-class reference ranks before the best relevant one: settled by the tile score
    when it is further than ``delta`` from the best relevant score, else by the fp32 score when it is
    further than ``fine``, else by the exact score."""
    if value - delta > best:
        return 1
    if value + delta < best:
        return 0
    score = fast_score(features, row, other_features, other_row)
    if score - fine > best:
        return 1
    if score + fine < best:
        return 0
    score = exact_score(features, row, other_features, other_row)
    return 1 if score > best or (score == best and reference < best_at) else 0


@njit(nogil=True, cache=True, inline="always")
def _tile_reach(bounds, row, largest, accumulation):
    """The part of the pair error bound that does not depend on the tile score, at its largest over
    the tile's other rows (``largest``: their norm, error norm and rounded norm maxima), with room for
    the slack of ``_pair_error`` (the marks' own rounding covers the rest)."""
    norm, error, rounded = bounds[row, 0], bounds[row, 1], bounds[row, 2]
    reach = error * largest[0] + norm * largest[1] + error * largest[1] + accumulation * rounded * largest[2]
    return reach * (1 + 2.0 ** -30)


@njit(nogil=True, cache=True, inline="always")
def _low_mark(threshold, reach, output):
    """The float32 tile score below which no reference can reach ``threshold`` (rounded down)."""
    if threshold == INF:
        return np.float32(INF)
    target = threshold - reach  # value + output * |value| >= target
    value = target / (1.0 + output) if target >= 0 else target / (1.0 - output)
    return np.float32(value - abs(value) * ROUND_DOWN - 1e-30)


@njit(nogil=True, cache=True, inline="always")
def _high_mark(best, reach, output):
    """The float32 tile score above which a reference surely scores above ``best`` (rounded up)."""
    if best == INF or best == -INF:
        return np.float32(INF)
    target = best + reach  # value - output * |value| > target
    value = target / (1.0 - output) if target >= 0 else target / (1.0 + output)
    return np.float32(value + abs(value) * ROUND_DOWN + 1e-30)


@njit(nogil=True, cache=True)
def _largest(bounds, count):
    """Column-wise maxima of ``bounds[:count]`` (norm, error norm, rounded norm)."""
    largest = np.zeros(3)
    for row in range(count):
        for j in range(3):
            largest[j] = max(largest[j], bounds[row, j])
    return largest


@njit(nogil=True, cache=True, inline="always")
def _marks(query, state, bounds, row, largest, accumulation, output, max_recall):
    """(low, high) marks of a query for one tile. Tile scores above ``high`` surely rank before its best
    relevant reference and are only counted; scores from ``low`` to ``high`` are looked at one by one.
    While the best relevant reference is in the top R every score from ``low`` up is looked at."""
    reach = _tile_reach(bounds, row, largest, accumulation)
    low = _low_mark(state.threshold[query], reach, output)
    before = state.before[query]
    if before < state.relevant[query] or before >= max_recall:
        return low, np.float32(INF)
    return low, _high_mark(state.best_score[query], reach, output)


@njit(nogil=True, cache=True, inline="always")
def _rounded_bits(bits, shift):
    """fp32 ``bits`` rounded to the tile precision: bf16 (``shift`` 16) to nearest, ties to even, as
    torch rounds; fp32 (``shift`` 0) unchanged."""
    if shift == 0:
        return bits
    return (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16


@njit(nogil=True, cache=True)
def gather_tile(feature_bits, index, count, exact, rounded, shift):
    """Rows ``index[:count]`` of fp32 embeddings (as uint32 bits) into a block's fp32 buffer ``exact``
    and its tile buffer ``rounded`` (the same array for fp32 tiles); the rest of both zero."""
    for row in range(exact.shape[0]):
        if row < count:
            source = index[row]
            for d in range(exact.shape[1]):
                exact[row, d] = feature_bits[source, d]
                rounded[row, d] = _rounded_bits(np.int64(feature_bits[source, d]), shift)
        else:
            exact[row, :] = 0
            rounded[row, :] = 0


@njit(nogil=True, cache=True)
def error_bounds(feature_bits, shift):
    """Per row, in float64 and rounded up: the norm of the embedding, of its rounding error into the
    tile precision, and of the rounded embedding."""
    bounds = np.empty((feature_bits.shape[0], 3))
    features = feature_bits.view(np.float32)
    rounded = np.zeros(1, np.uint32)
    rounded_float = rounded.view(np.float32)
    for row in range(feature_bits.shape[0]):
        norm = error = rounded_norm = 0.0
        for d in range(feature_bits.shape[1]):
            exact = np.float64(features[row, d])
            rounded[0] = _rounded_bits(np.int64(feature_bits[row, d]), shift) << shift
            rounded_value = np.float64(rounded_float[0])
            norm += exact * exact
            error += (exact - rounded_value) ** 2
            rounded_norm += rounded_value * rounded_value
        bounds[row, 0], bounds[row, 1], bounds[row, 2] = np.sqrt(norm), np.sqrt(error), np.sqrt(rounded_norm)
    return bounds * (1 + 2.0 ** -40)


@njit(nogil=True, cache=True, inline="always")
def _flagged_scores(a, values, flags, row_marks, column_marks, row_side, column_side, largest, state, max_recall,
                    rounding):
    """Visit or count the flagged scores ``values[b]`` of tile row ``a``, for its row query and for each column
    query whose marks hold the score. ``row_marks``: the row query's low and high mark, its count before its
    best relevant reference and whether that reference is still in its top R (``alive``); ``column_marks``:
    the same per column, updated in place. The row query's count and ``alive`` after the row."""
    _, accumulation, output = rounding
    row_base, row_reference, row_class, row_features, row_bounds, _ = row_side
    column_base, column_reference, column_class, column_features, column_bounds, _ = column_side
    threshold, best_score, best_index, before, relevant, query_class = (
        state.threshold, state.best_score, state.best_index, state.before, state.relevant, state.query_class)
    row_low, row_high, row_before, row_alive = row_marks
    column_low, column_high, column_before, column_alive = column_marks
    largest_column, largest_row = largest
    query, row_at = row_base + a, row_reference[a]
    best, best_at, own_class = best_score[query], best_index[query], query_class[query]
    flag_words = flags.view(np.uint64)
    for word in range(len(flag_words)):
        if flag_words[word] == 0:
            continue
        for b in range(8 * word, 8 * word + 8):
            if not flags[b]:
                continue
            value, column_at = values[b], column_reference[b]
            if row_low <= value <= row_high:
                delta = _pair_error(row_bounds, a, column_bounds, b, accumulation, value, output)
                fine = _fine_error(row_bounds, a, column_bounds, b, accumulation)
                if row_alive and value + delta >= threshold[query] and fast_score(
                        row_features, a, column_features, b) + fine >= threshold[query]:
                    _visit(query, column_at, column_class[b], exact_score(row_features, a, column_features, b),
                           state, max_recall)
                    row_before = before[query]
                    row_alive = row_before < relevant[query]
                    row_low = _low_mark(threshold[query], _tile_reach(row_bounds, a, largest_column,
                                                                      accumulation), output)
                elif not row_alive and column_class[b] != own_class:
                    row_before += _ranks_before(value, delta, best, best_at, column_at, row_features, a,
                                                column_features, b, fine)
            if column_low[b] <= value <= column_high[b]:
                column_query = column_base + b
                delta = _pair_error(column_bounds, b, row_bounds, a, accumulation, value, output)
                fine = _fine_error(column_bounds, b, row_bounds, a, accumulation)
                if column_alive[b] and value + delta >= threshold[column_query] and fast_score(
                        column_features, b, row_features, a) + fine >= threshold[column_query]:
                    _visit(column_query, row_at, row_class[a], exact_score(column_features, b, row_features, a),
                           state, max_recall)
                    column_before[b] = before[column_query]
                    column_alive[b] = column_before[b] < relevant[column_query]
                    column_low[b] = _low_mark(threshold[column_query], _tile_reach(
                        column_bounds, b, largest_row, accumulation), output)
                elif not column_alive[b] and row_class[a] != query_class[column_query]:
                    column_before[b] += _ranks_before(value, delta, best_score[column_query],
                                                      best_index[column_query], row_at, column_features, b,
                                                      row_features, a, fine)
        if not row_alive and row_before >= max_recall:
            row_low = row_high = np.float32(INF)
    return row_before, row_alive


@njit(nogil=True, cache=True)
def scan_tile(scores, rows, columns, diagonal, row_side, column_side, state, max_recall, rounding):
    """Count and visit the scores of ``scores[:rows, :columns]`` that may reach their query's threshold.

    ``scores`` holds the tile's bits: bf16 as uint16 (``rounding.shift`` 16) or fp32 as uint32 (0).
    Row ``a`` is query ``row_side.base + a`` of the ``ScanState``, with fp32 embedding
    ``row_side.features[a]``; to the column queries it is reference ``row_side.reference[a]`` of class
    ``row_side.classes[a]``. Likewise for columns. ``diagonal``: the tile pairs a block with itself;
    row ``a`` must not retrieve column ``a``.
    """
    shift, accumulation, output = rounding
    row_base, row_bounds, scan_rows = row_side.base, row_side.bounds, row_side.scan
    column_base, column_bounds, scan_columns = column_side.base, column_side.bounds, column_side.scan
    threshold, before, relevant = state.threshold, state.before, state.relevant
    largest_column, largest_row = _largest(column_bounds, columns), _largest(row_bounds, rows)
    inf32 = np.float32(INF)
    # the column queries' marks and counts, local for the tile; "alive" ones go through _visit
    column_low = np.full(columns, inf32)
    column_high = np.full(columns, inf32)
    column_before = np.zeros(columns, np.int64)
    column_alive = np.zeros(columns, np.bool_)
    column_marks = (column_low, column_high, column_before, column_alive)
    if scan_columns:
        for b in range(columns):
            query = column_base + b
            column_low[b], column_high[b] = _marks(query, state, column_bounds, b, largest_row, accumulation,
                                                   output, max_recall)
            column_before[b] = before[query]
            column_alive[b] = before[query] < relevant[query]
    bits = np.zeros(columns, np.uint32)
    values = bits.view(np.float32)
    flags = np.zeros((columns + 7) // 8 * 8, np.bool_)
    for a in range(rows):
        query = row_base + a
        row_low, row_high, row_before = inf32, inf32, 0
        if scan_rows:
            row_low, row_high = _marks(query, state, row_bounds, a, largest_column, accumulation, output, max_recall)
            row_before = before[query]
        row_alive = row_before < relevant[query]
        ahead = 0
        for b in range(columns):  # one vectorised pass: count the sure ones, flag the rest
            bits[b] = np.uint32(scores[a, b]) << shift
            value = values[b]
            ahead += value > row_high
            column_before[b] += value > column_high[b]
            flags[b] = (((value >= row_low) & (value <= row_high))
                        | ((value >= column_low[b]) & (value <= column_high[b])))
        if diagonal:  # the query itself
            ahead -= values[a] > row_high
            flags[a] = False
        row_before, row_alive = _flagged_scores(
            a, values, flags, (row_low, row_high, row_before + ahead, row_alive), column_marks, row_side, column_side,
            (largest_column, largest_row), state, max_recall, rounding)
        if scan_rows and not row_alive:
            before[query] = row_before
            if row_before >= max_recall:
                threshold[query] = INF
        if scan_columns and a % 64 == 63:  # stop counting for queries past the largest K
            for b in range(columns):
                if not column_alive[b] and column_before[b] >= max_recall:
                    column_low[b] = column_high[b] = inf32
    if scan_columns:
        for b in range(columns):
            if not column_alive[b]:
                before[column_base + b] = column_before[b]
                if column_before[b] >= max_recall:
                    threshold[column_base + b] = INF
