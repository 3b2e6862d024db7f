"""Where the branches live: the original's model parallelism over any number of devices.

``REIRNet.shard`` puts the stem on the first device and splits the branches as evenly as possible
over all of them; ``REIRNet.forward`` gathers every branch output back on the stem's device. The
plan's devices are read from where the parameters are (``REIRNet.shards``), so moving the model
moves the plan with it.
Devices are a list of ``torch.device``, so the split and gather run even when every entry is the CPU.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ShardedNetwork(Protocol):
    """What :func:`describe` reads of a network (:class:`reir.model.network.REIRNet`)."""

    branch_batching: str

    @property
    def shards(self) -> list[tuple[torch.device, range]]: ...


def split_evenly(count: int, parts: int) -> list[range]:
    """``count`` items in ``parts`` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(count, parts)
    ranges, start = [], 0
    for part in range(parts):
        stop = start + base + (1 if part < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def describe(model: ShardedNetwork, amp: str, world_size: int = 1) -> str:
    """One line for the run log: where the branches live and how they run."""
    plan = model.shards
    if len(plan) == 1:
        where = f"device {plan[0][0]}"
    else:
        where = "branches on " + ", ".join(f"{device} ({len(group)})" for device, group in plan)
    extras = [f"{model.branch_batching} branches", f"amp {amp}"]
    if world_size > 1:
        extras.append(f"{world_size} processes")
    return f"{where}, " + ", ".join(extras)
