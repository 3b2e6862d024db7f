"""Images -> embeddings: the one path every caller takes.

Training's evaluation, the baselines, ``reir.embed``, ``reir embed``, ``reir search`` and the service
all call :func:`embed`, so an image gets the same embedding whichever way it
arrives: the same reader (:func:`reir.data.images.read_image`), transform, eval-mode forward pass,
autocast scope and fp32 normalisation. It sits in the model layer, under training, because
training's evaluation embeds through it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from reir.data.images import ImageItems, image_files
from reir.errors import ReirError
from reir.model.files import Model
from reir.model.network import REIRNet, embedding_from_logits
from reir.validation import check_k


def embed(model: Model | REIRNet, images, device: torch.device | str | None = None, precision=None,
          progress=False, *, batch_size: int = 64, num_workers: int = 0,
          unreadable: list[tuple[int, str]] | None = None, after_batch=None) -> torch.Tensor:
    """Embeddings ``[N, ensemble, meta]`` in fp32 on the CPU, every branch L2-normalised, in input order.

    ``images``: a folder (every image below it, sorted by path), one image path, a PIL image, a list
    of paths and/or PIL images (these need a :class:`Model`, whose preprocessing they get), a batch
    tensor ``[B, 3, S, S]``, or a DataLoader whose batches are transformed images or tuples starting
    with them. ``device``: where the forward pass starts (default: the device of the network's first
    parameters, the stem's).
    ``precision``: ``None`` for fp32, or an object whose ``autocast()`` scopes the forward pass
    (:class:`reir.training.precision.Precision`). ``progress``: ``True`` for a bar on stderr, or a bar
    of the caller's (anything with ``update(n)``), advanced per image. ``unreadable``: ``None`` makes
    an unreadable image an error naming it; a list instead collects ``(position, message)`` and the
    image is left out. ``after_batch`` is called after every batch.
    """
    if not isinstance(model, (Model, torch.nn.Module)):
        raise ReirError(f"model must be a reir.Model from reir.load_model (or a network), not {type(model).__name__}")
    batch_size = check_k(batch_size, "batch_size")
    network = model.network if isinstance(model, Model) else model
    device = torch.device(device) if device is not None else next(network.parameters()).device
    batches, total = _batches(model, images, batch_size, num_workers, device)
    bar = None if isinstance(progress, bool) or progress is None else progress
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="Embed", file=sys.stderr, dynamic_ncols=True)
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    was_training = network.training
    network.eval()
    chunks, position = [], 0
    try:
        with torch.no_grad():
            for batch, errors in batches:
                count = len(batch)
                failed = [(position + i, error) for i, error in enumerate(errors) if error]
                if failed:
                    if unreadable is None:
                        raise ReirError(f"{failed[0][1]}; remove it (reir embed skips and lists unreadable images)")
                    unreadable += failed
                    batch = batch[[i for i, error in enumerate(errors) if not error]]
                if len(batch):
                    with autocast():
                        logits = network(batch.to(device, non_blocking=True))
                    chunks.append(embedding_from_logits(logits).cpu())
                position += count
                if bar is not None:
                    bar.update(count)
                if after_batch is not None:
                    after_batch()
    finally:
        network.train(was_training)
        if progress is True and bar is not None:
            bar.close()
    if chunks:
        return torch.cat(chunks)
    return torch.empty(0, network.config.ensemble_size, network.config.meta_class_size)


def _batches(model, images, batch_size: int, num_workers: int, device: torch.device):
    """``(batches of (images, errors), image count or None)`` for every kind of input :func:`embed` takes."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ReirError(f"a tensor of images must be [batch, 3, size, size], not {tuple(images.shape)}")
        return [(images, ())], len(images)
    if isinstance(images, DataLoader):
        loaded = ((batch[0] if isinstance(batch, (tuple, list)) else batch, ()) for batch in images)
        return loaded, (len(images.dataset) if hasattr(images.dataset, "__len__") else None)
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if path.is_dir():
            images = image_files(path)
            if not images:
                raise ReirError(f"folder {path} holds no image files")
        else:
            images = [path]
    elif isinstance(images, Image.Image):
        images = [images]
    elif isinstance(images, bytes) or not isinstance(images, Iterable):
        raise ReirError(f"images must be a folder, an image path, a list of paths or PIL images, a tensor or a "
                        f"DataLoader, not {type(images).__name__}")
    if not isinstance(model, Model):
        raise ReirError("image files need the model's preprocessing; load the model with reir.load_model, "
                        "or pass transformed image tensors")
    items = list(images)
    strange = [item for item in items if not isinstance(item, (str, os.PathLike, Image.Image))][:1]
    if strange:
        raise ReirError(f"images holds a {type(strange[0]).__name__}; give image paths or PIL images")
    loader = DataLoader(ImageItems(items, model.transform, model.image_size), batch_size=batch_size,
                        num_workers=num_workers, shuffle=False, collate_fn=_collate_items,
                        pin_memory=device.type == "cuda")
    return loader, len(items)


def _collate_items(batch):
    return torch.stack([image for image, _ in batch]), [error for _, error in batch]
