"""Metrics of embeddings (``evaluate``) or of a database (``evaluate_database``), for the API and the
commands that need no model.

Kept apart from the model layer so that ``reir eval`` and ``reir report`` import neither the
network nor torchvision.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

from reir.errors import ReirError
from reir.retrieval.database import UNLABELLED, Database, load_database
from reir.validation import as_features, check_device, check_labels, check_positive_ints


def evaluate(features: torch.Tensor, labels: Sequence | torch.Tensor | None = None, *,
             recalls: Iterable[int] = (1, 2, 4, 8), gallery: torch.Tensor | None = None,
             gallery_labels: Sequence | torch.Tensor | None = None, with_nmi: bool = True,
             device: torch.device | str | None = None) -> dict[str, float | None]:
    """Recall@K, precision@1, R-precision, MAP@R and NMI (``None`` when skipped) of embeddings, exact.

    Every image queries the others (itself excluded), or the ``gallery`` when one is given. ``labels``
    are class names or integer ids, one per image. A database's metrics: :func:`evaluate_database`.
    """
    if isinstance(features, (str, os.PathLike, Database)):
        raise ReirError("evaluate takes embeddings and their labels; for a database use evaluate_database")
    if labels is None:
        raise ReirError("evaluate needs labels for the features (a database's metrics: evaluate_database)")
    features = as_features(features, "features")
    labels = check_labels(labels, len(features), "labels", "features")
    if gallery is not None:
        gallery = as_features(gallery, "gallery")
        if gallery_labels is None:
            raise ReirError("evaluate was given a gallery but no gallery_labels; pass the gallery's labels "
                            "(metrics cannot score a gallery with the queries' labels)")
        gallery_labels = check_labels(gallery_labels, len(gallery), "gallery_labels", "gallery")
    elif gallery_labels is not None:
        raise ReirError("evaluate was given gallery_labels but no gallery; pass gallery= too, or neither")
    labels, gallery_labels = _label_ids(labels, gallery_labels)
    return _metrics(features, labels, gallery, gallery_labels, recalls, with_nmi, device)


def evaluate_database(database: str | os.PathLike | Database, *, recalls: Iterable[int] = (1, 2, 4, 8),
                      with_nmi: bool = True, device: torch.device | str | None = None) -> dict[str, float | None]:
    """The metrics of a database (or its path), as ``reir eval`` reports them: its test split against
    itself, or its query split against its gallery."""
    db = database if isinstance(database, Database) else load_database(database)
    splits = db.eval_splits
    missing = [s for s in splits if s not in db.features]
    if missing:
        raise ReirError(f"database has no {', '.join(missing)} features; regenerate it with train.py")
    unlabelled = [s for s in splits if UNLABELLED in db.labels(s)]
    if unlabelled:
        raise ReirError(f"the {unlabelled[0]} split has images without a label; metrics need every label")
    ids = db.label_ids(*splits)
    gallery, gallery_labels = (db.features[splits[1]], ids[1]) if len(splits) == 2 else (None, None)
    return _metrics(db.features[splits[0]], ids[0], gallery, gallery_labels, recalls, with_nmi, device)


def _metrics(features, labels, gallery, gallery_labels, recalls, with_nmi, device) -> dict[str, float | None]:
    from reir.retrieval.metrics import evaluate_embeddings

    recalls = check_positive_ints(recalls, "recalls")
    if device is not None:
        device = check_device(device)
    return evaluate_embeddings(features, labels, sorted(set(recalls)), gallery, gallery_labels,
                               with_nmi=with_nmi, device=device)


def _label_ids(labels, gallery_labels) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class names (or ids) of queries and gallery as integers on one shared vocabulary."""
    groups = [labels] + ([gallery_labels] if gallery_labels is not None else [])
    if all(isinstance(g, torch.Tensor) for g in groups):
        return labels, gallery_labels
    from reir.retrieval.database import shared_label_ids

    ids = shared_label_ids(*([str(label) for label in (g.tolist() if isinstance(g, torch.Tensor) else g)]
                             for g in groups))
    return ids[0], (ids[1] if len(ids) > 1 else None)
