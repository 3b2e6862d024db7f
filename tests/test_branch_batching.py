"""Grouped branches compute what the loop computes, for every backbone and every sharing point."""

from __future__ import annotations

import itertools

import pytest
import torch

from reir.model.network import MODEL_TYPES, SHARE_TYPES, ModelConfig, create_model


def _outputs(model, images: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-mode logits (batch statistics, random branch weights drawn from a fixed seed) and eval-mode logits."""
    model.branch_batching = mode
    torch.manual_seed(1)
    with torch.no_grad():
        training = model.train()(images)
        evaluation = model.eval()(images)
    return training, evaluation


@pytest.mark.parametrize("model_type,share_type", list(itertools.product(MODEL_TYPES, SHARE_TYPES)))
def test_grouped_outputs_equal_the_loop(model_type, share_type):
    torch.manual_seed(0)
    model = create_model(ModelConfig(model_type, share_type, ensemble_size=2, meta_class_size=3, with_random=True),
                         weights="none").double()
    # Three images: BatchNorm's batch statistics need more than one value per channel at layer4 (1x1 here).
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    running = [buffer.clone() for buffer in model.buffers()]
    loop = _outputs(model, images, "loop")
    for buffer, saved in zip(model.buffers(), running):  # the grouped pass starts from the same statistics
        buffer.copy_(saved)
    grouped = _outputs(model, images, "grouped")
    assert loop[0].shape == (3, 2, 3)
    torch.testing.assert_close(grouped[0], loop[0])
    torch.testing.assert_close(grouped[1], loop[1])
    assert not torch.equal(loop[0], loop[1]), "training and eval differ: both paths were really exercised"
