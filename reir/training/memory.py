"""How much memory a training configuration needs, known before anything is built or downloaded.

Parameters, gradients and the optimizer's moments are counted from a model built on the meta
device; the activations are the tensors autograd saves for the backward pass in a meta-device
forward pass and loss, so they follow the image size, the sharing point and the branch
execution mode without allocating anything. With branches sharded over devices, each device
holds the stem's share (the first) plus its branches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from reir.errors import UsageError
from reir.model.network import SHARE_TYPES, ModelConfig, create_model
from reir.model.sharding import split_evenly
from reir.training.recipe import recipe_for

GIB = 2**30
# What a training process holds besides the model's state and activations: the libraries, the data
# loader, evaluation embeddings, allocator slack. The host-memory target of a run is
# ``1.25 x state + HOST_OVERHEAD``.
HOST_OVERHEAD = 1.5 * GIB
BYTES_PER_VALUE = 4  # fp32 parameters, gradients and moments, whatever --amp does to activations


@dataclass(frozen=True)
class MemoryEstimate:
    config: ModelConfig
    stem_parameters: int
    branch_parameters: int  # one branch
    optimizer_slots: int  # tensors the optimizer keeps per parameter (Adam: 2)
    stem_activations: int  # bytes saved for backward per image
    branch_activations: int  # one branch, bytes per image
    image_size: int
    batch_size: int
    devices: int = 1

    @property
    def parameters(self) -> int:
        return self.stem_parameters + self.config.ensemble_size * self.branch_parameters

    @property
    def state_bytes(self) -> int:
        """Parameters, gradients and optimizer state."""
        return self.parameters * BYTES_PER_VALUE * (2 + self.optimizer_slots)

    @property
    def activations_per_image(self) -> int:
        return self.stem_activations + self.config.ensemble_size * self.branch_activations

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.activations_per_image * self.batch_size

    @property
    def host_budget(self) -> float:
        """The most a whole run (training, evaluation, saving, resuming) should hold in host memory."""
        return 1.25 * self.state_bytes + HOST_OVERHEAD

    def per_device(self) -> list[int]:
        """Bytes each device holds when the branches are split over ``devices``: the stem on the first."""
        values = BYTES_PER_VALUE * (2 + self.optimizer_slots)
        shares = [group for group in split_evenly(self.config.ensemble_size, self.devices) if len(group)]
        need = [len(group) * (self.branch_parameters * values + self.branch_activations * self.batch_size)
                for group in shares]
        need[0] += self.stem_parameters * values + self.stem_activations * self.batch_size
        return need

    def describe(self) -> str:
        """One line: the total, its parts, and the per-device split when sharded."""
        parts = (f"parameters {gib(self.parameters * BYTES_PER_VALUE)}, gradients "
                 f"{gib(self.parameters * BYTES_PER_VALUE)}, optimizer state "
                 f"{gib(self.parameters * BYTES_PER_VALUE * self.optimizer_slots)}, activations "
                 f"{gib(self.activations_per_image * self.batch_size)} ({mib(self.activations_per_image)} per "
                 f"{self.image_size} px image x batch {self.batch_size})")
        line = f"training needs about {gib(self.total_bytes)}: {parts}"
        if self.devices > 1:
            line += "; per device " + ", ".join(gib(n) for n in self.per_device())
        return line


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def estimate(config: ModelConfig, image_size: int, batch_size: int, recipe: str = "auto", weights: str = "none",
             branch_batching: str = "loop", devices: int = 1) -> MemoryEstimate:
    """The estimate of one configuration; builds on the meta device only (no memory, no download)."""
    # Branches are alike: one stands for all of them.
    with torch.device("meta"):
        model = create_model(replace(config, ensemble_size=1), weights="none")
    model.branch_batching = branch_batching
    stem = sum(p.numel() for p in model.stem.parameters() if p.requires_grad)
    branch = sum(p.numel() for p in model.parameters() if p.requires_grad) - stem
    probe = torch.nn.Parameter(torch.empty(1, device="meta"))
    optimizer, _ = recipe_for(recipe, weights).optimizer([probe], 1)
    slots = 1 if isinstance(optimizer, torch.optim.SGD) and optimizer.defaults.get("momentum") else (
        0 if isinstance(optimizer, torch.optim.SGD) else 2)
    stem_saved, total_saved = _saved_bytes(model, image_size)
    return MemoryEstimate(config, stem, branch, slots, stem_saved, total_saved - stem_saved, image_size, batch_size,
                          devices)


def _saved_bytes(model, image_size: int) -> tuple[int, int]:
    """Bytes per image autograd saves for backward: in the stem, and in the whole forward and loss."""
    batch = 2  # batch norm refuses one value per channel
    saved: dict[int, int] = {}
    keep = list(model.parameters())  # saved tensors stay alive, so their ids stay unique
    parameters = {id(p) for p in keep}  # counted as parameters, not activations

    def pack(tensor: torch.Tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in parameters:
            keep.append(base)
            saved[id(base)] = base.numel() * base.element_size()
        return tensor

    def measure(forward) -> int:
        """Bytes saved by one forward pass on fresh images, counted on their own."""
        saved.clear()
        images = torch.empty(batch, 3, image_size, image_size, device="meta")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            forward(images)
        return sum(saved.values())

    def whole(images):
        logits = model(images)
        F.cross_entropy(logits.flatten(0, 1), torch.zeros(logits.shape[0] * logits.shape[1], dtype=torch.long,
                                                          device="meta"))

    # Separate passes on separate images, so that no tensor of one is mistaken for one of the other.
    stem_bytes = measure(model.stem)
    total = max(measure(whole), stem_bytes)
    return stem_bytes // batch, total // batch


def available_bytes(devices: list[torch.device]) -> list[int]:
    """Free memory on each device: the GPU's free memory, or the host's available memory (cgroup limit included)."""
    free = []
    for device in devices:
        if device.type == "cuda":
            free.append(torch.cuda.mem_get_info(device)[0])
        else:
            free.append(host_available())
    return free


def host_available() -> int:
    with open("/proc/meminfo") as handle:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle}
    available = fields.get("MemAvailable", fields.get("MemFree", 0))
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            text = limit.read().strip()
            if text != "max":
                available = min(available, int(text) - int(used.read()))
    except (OSError, ValueError):
        pass
    return available


def check_fits(found: MemoryEstimate, devices: list[torch.device], processes_per_host: int = 1) -> None:
    """Stop with a one-line error naming the need, what is free, and settings that would fit."""
    free = available_bytes(devices[:found.devices] if devices[0].type == "cuda" else devices[:1])
    need = found.per_device() if devices[0].type == "cuda" else [found.total_bytes * processes_per_host]
    if all(n <= f for n, f in zip(need, free)):
        return
    where = "per device " if len(need) > 1 else ""
    have = f"{', '.join(gib(f) for f in free)} free on {devices[0].type}"
    raise UsageError(f"this configuration does not fit: {found.describe()}{(', ' + where) if where else ''}"
                     f" but {have}; settings that fit: {', '.join(fitting(found, free, processes_per_host))}")


def fitting(found: MemoryEstimate, free: list[int], processes_per_host: int = 1) -> list[str]:
    """Settings that would make ``found`` fit into ``free`` (the smallest device's free memory), one change each."""
    limit = min(free) // processes_per_host
    config = found.config
    options = []
    deeper = SHARE_TYPES[SHARE_TYPES.index(config.share_type) + 1:]
    for share in deeper:
        shared = estimate(replace(config, share_type=share), found.image_size, found.batch_size,
                          branch_batching="loop")
        shared = replace(shared, optimizer_slots=found.optimizer_slots, devices=found.devices)
        if max(shared.per_device()) <= limit:
            options.append(f"`share_type` {share} ({gib(max(shared.per_device()))})")
            break
    values = BYTES_PER_VALUE * (2 + found.optimizer_slots)
    stem = found.stem_parameters * values + found.stem_activations * found.batch_size
    per_branch = found.branch_parameters * values + found.branch_activations * found.batch_size
    branches = (limit - stem) // per_branch * found.devices if limit > stem else 0
    if 1 <= branches < config.ensemble_size:
        options.append(f"`ensemble_size` {branches}")
    batch = (limit - max(found.state_bytes // found.devices, 0)) // max(found.activations_per_image, 1)
    if 1 <= batch < found.batch_size:
        options.append(f"`batch_size` {batch}")
    devices = next((n for n in range(found.devices + 1, config.ensemble_size + 1)
                    if max(replace(found, devices=n).per_device()) <= limit), None)
    options.append(f"{devices} GPUs (`gpu_ids`)" if devices else "more devices")
    return options


def processes_on_this_host() -> int:
    """Training processes torchrun started on this machine (1 outside torchrun)."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
