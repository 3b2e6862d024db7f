"""Ranked search results: the one shape every search returns and every consumer reads.

The exact k-NN (:func:`reir.retrieval.similarity.knn`) and :meth:`reir.retrieval.index.Index.search`
produce :class:`Results`; ``reir search``, ``reir report``, ``reir ablation`` and the service read
them. Checked on construction, so a consumer never meets a ranking out of order, an id past the
gallery or labels that do not line up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from reir.retrieval.database import shared_label_ids

PAD = -1  # the id of an empty place: an approximate index found fewer than k


@dataclass(frozen=True)
class Results:
    """The top ``k`` gallery images of each of ``Q`` queries, best first.

    ``scores`` and ``gallery_ids`` are ``[Q, k]``; a row an approximate index could not fill ends in
    ids ``-1`` (their scores mean nothing). ``query_ids`` ``[Q]`` say which queries these are (a row of
    the query collection; ``-1`` for an image from elsewhere; default ``0 .. Q-1``). ``query_labels``
    (one per query) and ``gallery_labels`` (one per gallery image) are optional. Unpacks as
    ``scores, gallery_ids``, the pair ``knn`` and ``Index.search`` have always returned.
    """

    scores: torch.Tensor
    gallery_ids: torch.Tensor
    gallery_size: int
    query_ids: torch.Tensor | None = None
    query_labels: Sequence[str] | None = None
    gallery_labels: Sequence[str] | None = None

    def __post_init__(self):
        scores, ids = self.scores, self.gallery_ids
        if scores.dim() != 2 or scores.shape != ids.shape:
            raise ValueError(f"scores {tuple(scores.shape)} and gallery ids {tuple(ids.shape)} "
                             "must be one [Q, k] shape")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"gallery ids must be integers, not {ids.dtype}")
        query_ids = torch.arange(len(ids)) if self.query_ids is None else self.query_ids
        object.__setattr__(self, "query_ids", query_ids)
        if query_ids.shape != (len(ids),):
            raise ValueError(f"{len(ids)} result rows but query ids of shape {tuple(query_ids.shape)}")
        if len(ids) and bool((query_ids < PAD).any()):
            raise ValueError("query ids must be >= -1")
        found = ids != PAD
        outside = found & ((ids < 0) | (ids >= self.gallery_size))
        if bool(outside.any()):
            raise ValueError(f"gallery id {int(ids[outside][0])} is outside the gallery of {self.gallery_size}")
        if bool((found[:, 1:] & ~found[:, :-1]).any()):
            raise ValueError("a row has results after an empty place; empty places (-1) come last")
        pairs = found[:, 1:]
        if bool((pairs & ~(scores[:, :-1] >= scores[:, 1:])).any()):
            raise ValueError("scores must be sorted best first in every row")
        for name, labels, count in (("query", self.query_labels, len(ids)),
                                    ("gallery", self.gallery_labels, self.gallery_size)):
            if labels is not None and len(labels) != count:
                raise ValueError(f"{len(labels)} {name} labels for {count} {name} images")

    def __len__(self) -> int:
        return len(self.gallery_ids)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.scores, self.gallery_ids))

    @property
    def k(self) -> int:
        return self.gallery_ids.shape[1]

    def row(self, query: int) -> list[tuple[int, float]]:
        """``(gallery id, score)`` of one query's results, best first, empty places left out."""
        return [(i, s) for i, s in zip(self.gallery_ids[query].tolist(), self.scores[query].tolist()) if i != PAD]

    def with_labels(self, query_labels: Sequence[str], gallery_labels: Sequence[str]) -> Results:
        return dataclasses.replace(self, query_labels=list(query_labels), gallery_labels=list(gallery_labels))

    def same_label(self) -> torch.Tensor:
        """``[Q, k]``: whether each result has its query's label (``False`` on empty places)."""
        if self.query_labels is None or self.gallery_labels is None:
            raise ValueError("results without labels; attach them with with_labels")
        queries, gallery = shared_label_ids(self.query_labels, self.gallery_labels)
        found = self.gallery_ids != PAD
        return found & (gallery[self.gallery_ids.clamp(min=0)] == queries[:, None])

    def top(self, k: int, excluding: Sequence[int] | torch.Tensor | None = None) -> Results:
        """The first ``k`` results of each row, leaving out ``excluding[q]`` (a gallery id, or -1 for none)."""
        keep = self.gallery_ids != PAD
        if excluding is not None:
            keep &= self.gallery_ids != torch.as_tensor(excluding, dtype=torch.long)[:, None]
        width = min(k, int(keep.sum(1).max())) if len(keep) and keep.shape[1] else 0
        order = (~keep).int().argsort(dim=1, stable=True)[:, :width]  # kept places first, in rank order
        kept = keep.gather(1, order)
        return dataclasses.replace(self, scores=self.scores.gather(1, order),
                                   gallery_ids=self.gallery_ids.gather(1, order).masked_fill(~kept, PAD))
