"""Branch heads other than the original's linear classifier (docs/ACCURACY.md measures them).

A cosine head scores a feature against each meta class by the cosine between the feature and the
class's weight vector, times a scale (the inverse of a softmax temperature), fixed or learned. Its
logits, L2-normalised, remain the branch's embedding, as with the linear head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("linear", "cosine")


class CosineHead(nn.Module):
    """Logits ``scale * cos(feature, class weight)``; ``learn_scale`` makes log(scale) a parameter."""

    def __init__(self, in_features: int, out_features: int, scale: float, learn_scale: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's initialisation
        log_scale = torch.tensor(float(scale)).log()
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * F.normalize(features, dim=-1) @ F.normalize(self.weight, dim=-1).T


def grouped_cosine(heads: list[CosineHead], x: torch.Tensor) -> torch.Tensor:
    """Every head on its block of ``x`` (``[batch, len(heads) * features]`` or ``[batch, len(heads), features]``)
    at once: ``[batch, len(heads), classes]``."""
    inputs = F.normalize(x.view(x.shape[0], len(heads), -1), dim=-1)
    weight = F.normalize(torch.stack([h.weight for h in heads]), dim=-1)
    scale = torch.stack([h.log_scale for h in heads]).exp()
    return torch.einsum("bki,koi->bko", inputs, weight) * scale[:, None]
