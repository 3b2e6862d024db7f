"""Numeric precision of training: autocast to bf16/fp16 and fp16 loss scaling; fp32 master weights."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """Autocast and loss scaling for one ``amp`` choice on one device type."""

    device_type: str
    dtype: torch.dtype | None

    def __post_init__(self):
        fp16 = self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=fp16)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward and optimizer step; fp16 scales the loss so small gradients do not underflow."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


def precision_for(amp: str, device: torch.device) -> Precision:
    return Precision(torch.device(device).type, AMP_DTYPES[amp])
