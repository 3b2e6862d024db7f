"""What a learned embedding has to beat: raw pixels and the same network with random weights.

Both are measured on the split a trained model is evaluated on, so their metrics sit beside
the learned ones (``make demo``, benchmarks/accuracy.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from reir.data.images import ImageList, build_transform
from reir.data.splits import SplitList
from reir.model.embedding import embed
from reir.model.network import ModelConfig, REIRNet, create_model
from reir.retrieval.database import shared_label_ids

BATCH_SIZE = 128


def label_ids(split_list: SplitList, split: str) -> torch.Tensor:
    return shared_label_ids(split_list.splits[split].labels)[0]


def raw_pixel_features(split_list: SplitList, split: str, image_size: int) -> torch.Tensor:
    """Pixels resized as training sees them, mean-centred over the split, L2-normalised: cosine retrieval."""
    images = ImageList(split_list, split, build_transform(image_size, (0, 0, 0), (1, 1, 1), train=False))
    pixels = torch.stack([images[i][0] for i in range(len(images))]).flatten(1)
    return F.normalize(pixels - pixels.mean(0), dim=1)[:, None]


def network_features(model: REIRNet, split_list: SplitList, split: str, image_size: int) -> torch.Tensor:
    """Embeddings ``[N, ensemble, meta]`` of a split with the evaluation transform."""
    images = ImageList(split_list, split, build_transform(image_size, split_list.mean, split_list.std, train=False))
    return embed(model, DataLoader(images, BATCH_SIZE))


def untrained_features(config: ModelConfig, seed: int, split_list: SplitList, split: str,
                       image_size: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return network_features(create_model(config, weights="none"), split_list, split, image_size)
