"""Images from files: the one reader (with its decompression-bomb guard), datasets over a prepared split
list or a list of files, and the original's transforms."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from reir.data.splits import SplitList
from reir.data.tarshards import is_sample_path, sample_image_bytes
from reir.errors import ReirError


def build_transform(image_size: int, mean, std, train: bool):
    """Resize to a square, random horizontal flip in training, normalise (the original's recipe)."""
    from torchvision import transforms  # here, so that reading images alone does not import torchvision

    steps = [transforms.Resize((image_size, image_size))]
    if train:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


# The largest query image decoded by default (reir serve's uploads, reir search's query): 40 MP decode to
# about 120 MB of RGB; a larger one is refused from its header, before decoding.
MAX_PIXELS = 40_000_000


class ImageError(ReirError):
    """An image that cannot be used. ``kind`` says why (``missing``, ``too_large``, ``not_image`` or
    ``unreadable``) so that each caller adds its own fix (prepare again, skip the file, answer 413 ...);
    ``size`` is ``(width, height)`` once the header was read, ``reason`` PIL's words."""

    def __init__(self, message: str, kind: str, size: tuple[int, int] | None = None, reason: str = ""):
        super().__init__(message)
        self.kind = kind
        self.size = size
        self.reason = reason


def read_image(source: str | os.PathLike | bytes | BinaryIO, max_pixels: int | None = None,
               gate: Callable[[int, int], AbstractContextManager] | None = None) -> Image.Image:
    """A file (its path, bytes or an open binary file) as RGB; a missing, non-image, truncated or too large
    image is an :class:`ImageError`. A path ``<tar file>::<key>`` (a database row made from WebDataset
    shards) reads that sample's image from the tar.

    The pixel count is checked from the header before anything is decoded: against ``max_pixels``
    when given, and always against PIL's decompression-bomb limit. ``gate(width, height)``, when
    given, is held while the pixels are decoded, so a server can bound how many large images
    decode at once.
    """
    name = f"image {source}" if isinstance(source, (str, os.PathLike)) else "the image"
    size = None
    try:
        if isinstance(source, (str, os.PathLike)) and is_sample_path(source):
            source = sample_image_bytes(source)[0]
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            size = image.size
            if max_pixels is not None and size[0] * size[1] > max_pixels:
                raise ImageError(f"{name} has {size[0]}x{size[1]} pixels, more than the {max_pixels} allowed",
                                 "too_large", size)
            with gate(*size) if gate is not None else contextlib.nullcontext():
                return image.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"{name} does not exist", "missing") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name} has too many pixels to decode safely", "too_large", size) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        kind = "not_image" if isinstance(exc, UnidentifiedImageError) else "unreadable"
        raise ImageError(f"{name} cannot be read ({reason})", kind, size, reason) from None


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image file below ``folder`` (by extension), hidden ones left out, in sorted order."""
    folder = Path(folder)
    extensions = {e.lower() for e in Image.registered_extensions()}
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if path.suffix.lower() in extensions:
            found.append(path)
    return found


class ImageItems(Dataset):
    """Paths or PIL images -> ``(tensor, error)``; an unreadable file gives a blank tensor and its error,
    so one bad file in a batch does not stop the others."""

    def __init__(self, items: Sequence, transform, image_size: int):
        self.items = items
        self.transform = transform
        self.blank = torch.zeros(3, image_size, image_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int):
        item = self.items[position]
        if isinstance(item, Image.Image):
            return self.transform(item.convert("RGB")), ""
        try:
            return self.transform(read_image(item)), ""
        except ImageError as exc:
            return self.blank, str(exc)


class ImageList(Dataset):
    """(image, target) pairs; ``targets`` are integer class indices into ``classes``."""

    def __init__(self, split_list: SplitList, split: str, transform, classes: list[str] | None = None):
        data = split_list.splits[split]
        self.paths = split_list.absolute(split)
        self.labels = data.labels
        self.classes = classes if classes is not None else data.classes
        index = {name: i for i, name in enumerate(self.classes)}
        self.targets = torch.tensor([index.get(label, -1) for label in self.labels], dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int):
        try:
            image = read_image(self.paths[item])
        except ImageError as exc:
            fix = "prepare the dataset again" if exc.kind == "missing" else "replace it or prepare with `skip_bad`"
            raise ReirError(f"{exc}; {fix}") from None
        return self.transform(image), self.targets[item]
