"""Image datasets over a prepared split list, and the original's transforms."""

from __future__ import annotations

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms

from reir.data.splits import SplitList
from reir.errors import ReirError


def build_transform(image_size: int, mean, std, train: bool) -> transforms.Compose:
    """Resize to a square, random horizontal flip in training, normalise (the original's recipe)."""
    steps = [transforms.Resize((image_size, image_size))]
    if train:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ReirError(f"image {path} does not exist; prepare the dataset again") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ReirError(f"image {path} cannot be read ({exc}); replace it or prepare with --skip_bad") from None


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
        return self.transform(load_rgb(self.paths[item])), self.targets[item]
