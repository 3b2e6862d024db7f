"""Loss terms beside the branches' cross-entropy (docs/ACCURACY.md measures them).

``multisimilarity``: pytorch-metric-learning's MultiSimilarity loss with its miner, on the
concatenated embedding (every branch's L2-normalised logits side by side), so the branches learn
a metric together while each stays a classifier over its own meta classes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from reir.errors import UsageError

PAIR_LOSSES = ("none", "multisimilarity")

PairTerm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def concatenated_embedding(logits: torch.Tensor) -> torch.Tensor:
    """``[batch, ensemble, meta]`` logits as one unit vector per image: their dot product is the mean branch cosine."""
    normalised = torch.nn.functional.normalize(logits.float(), dim=-1)
    return normalised.flatten(1) / logits.shape[1] ** 0.5


def pair_term(name: str, weight: float) -> PairTerm | None:
    """``weight * loss(concatenated embedding, class labels)``, or None for ``none`` (or weight 0)."""
    if name == "none" or weight == 0:
        return None
    if name not in PAIR_LOSSES:
        raise UsageError(f"unknown pair loss {name!r}; choose one of {', '.join(PAIR_LOSSES)}")
    try:
        from pytorch_metric_learning import losses, miners
    except ImportError:
        raise UsageError("`pair_loss` multisimilarity needs pytorch-metric-learning; "
                         "pip install pytorch-metric-learning") from None
    loss, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()

    def term(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        embeddings = concatenated_embedding(logits)
        return weight * loss(embeddings, targets, miner(embeddings, targets))

    return term
