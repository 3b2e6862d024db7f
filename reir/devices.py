"""Which devices a command runs on: ``device`` and ``gpu_ids`` checked once, for every command."""

from __future__ import annotations

import logging

import torch

from reir.errors import UsageError

log = logging.getLogger(__name__)


def parse_device(requested: str | None, default: str = "cpu") -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; a GPU that is not there is a usage error."""
    text = requested or default
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"`device` {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("`device` cuda requested but no CUDA GPU is available; use `device` cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"`device` {text} does not exist: {torch.cuda.device_count()} GPU(s) visible; "
                             "use cuda:0 up to the last one")
    return device


def training_devices(requested: str | None, gpu_ids: list[int]) -> list[torch.device]:
    """The devices a model's branches are split over; the first also holds the stem.

    ``cuda:N`` means that GPU alone. ``cuda`` (or no ``device`` on a GPU machine) means every GPU
    in ``gpu_ids`` that exists, as in the original; missing ids are dropped with a note.
    """
    if requested is None and not torch.cuda.is_available():
        return [torch.device("cpu")]
    device = parse_device(requested, default="cuda")
    if device.type != "cuda" or device.index is not None:
        return [device]
    present = [i for i in gpu_ids if i < torch.cuda.device_count()]
    if len(present) < len(gpu_ids):
        absent = sorted(set(gpu_ids) - set(present))
        log.warning("GPU ids %s do not exist; using %s", absent, present or [0])
    return [torch.device("cuda", i) for i in present] or [torch.device("cuda", 0)]
