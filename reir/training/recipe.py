"""How a run trains: the optimiser and its learning-rate schedule.

Two recipes. ``original`` is the original's, unchanged: Adam at 1e-4, the rate divided by 10 at
50 % and 70 % of the epochs. It starts from ImageNet weights and stays the default with them.
``scratch`` applies when the backbone starts from random weights (``weights='none'``): at 1e-4 a
random network barely moves in the few epochs a CPU run affords, and ends below its own untrained
start. ``scratch`` uses AdamW at 1e-3 with weight decay 0.05 and a cosine decay over the epochs.
Both keep the original's augmentation (resize + random horizontal flip). The measurements behind
the choice are in docs/ACCURACY.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RECIPES = ("auto", "original", "scratch")


@dataclass(frozen=True)
class Recipe:
    name: str
    learning_rate: float
    weight_decay: float

    def optimizer(self, parameters, num_epochs: int):
        """The optimiser over ``parameters`` (tensors or parameter groups) and its per-epoch scheduler."""
        # fused: one pass over each parameter instead of ~10, a large share of a CPU step (docs/SCALING.md)
        if self.name == "original":
            optimizer = torch.optim.Adam(parameters, lr=self.learning_rate, fused=True)
            milestones = [int(num_epochs * 0.5), int(num_epochs * 0.7)]
            return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        optimizer = torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay, fused=True)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: cosine(epoch, num_epochs))


def cosine(epoch: int, num_epochs: int) -> float:
    """Share of the full rate in epoch ``epoch + 1``: 1 in the first epoch, falling towards 0 at the end."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / num_epochs))


ORIGINAL = Recipe("original", learning_rate=1e-4, weight_decay=0.0)
SCRATCH = Recipe("scratch", learning_rate=1e-3, weight_decay=0.05)


def recipe_for(name: str, weights: str) -> Recipe:
    """``auto``: the original's recipe for pretrained weights, the scratch recipe for random ones."""
    if name == "auto":
        name = "scratch" if weights == "none" else "original"
    return {"original": ORIGINAL, "scratch": SCRATCH}[name]
