"""Data parallel training under ``torchrun``: PyTorch's DistributedDataParallel, nothing custom.

``torchrun --nproc_per_node N train.py ...`` starts N processes; each sees ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``. Every rank builds the same model from the same seed and the same meta labels
(rank 0's, broadcast), trains on its own share of each epoch's images, and DDP averages the
gradients. ``batch_size`` is per process, so the global batch is ``batch_size * world_size``.
Evaluation, saving and progress output happen on rank 0 only.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from reir.errors import UsageError

T = TypeVar("T")
# Rank 0 evaluates alone while the others wait at the next collective; allow long evaluations.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=3)


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device_request: str | None) -> tuple[Context, torch.device | None]:
    """Join the process group when started by torchrun; returns the context and this rank's device.

    The device is ``None`` outside torchrun (the caller resolves it as usual). NCCL serves GPUs,
    gloo the CPU.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) < 2:
        return Context(), None
    context = Context(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    wants_cpu = device_request is not None and torch.device(device_request).type == "cpu"
    if torch.cuda.is_available() and not wants_cpu:
        if context.local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {context.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                             "start at most one process per GPU with --nproc_per_node")
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    if not context.is_main:
        _silence_print()
    return context, device


def _silence_print() -> None:
    """Only rank 0 prints and draws progress bars; every rank keeps stderr for its errors."""
    sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the process


def broadcast(value, context: Context):
    """Rank 0's ``value`` on every rank (seeds, meta labels): one source of truth."""
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: float, weight: int, context: Context, device: torch.device) -> float:
    """The ``weight``-weighted mean of a per-rank mean: the epoch's loss over all ranks' images."""
    if not context.enabled:
        return value
    totals = torch.tensor([value * weight, float(weight)], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp_min(1)).item()


def main_rank_first(work: Callable[[], T], context: Context) -> T:
    """``work()`` on rank 0 first (preparing a cold dataset cache, rendering embedded data) while the
    other ranks wait; then on them, to read what rank 0 wrote. No two ranks ever prepare, or clean
    up after preparing, the same files at once."""
    if context.enabled and not context.is_main:
        dist.barrier()
    result = work()
    if context.enabled and context.is_main:
        dist.barrier()
    return result


def barrier(context: Context) -> None:
    if context.enabled:
        dist.barrier()


def cleanup(context: Context) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, context: Context, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model``; the model itself unchanged when alone."""
    if not context.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
