"""Where a training run's split list comes from, by ``data_name``."""

from __future__ import annotations

import logging
from pathlib import Path

from reir.data.custom import load_custom
from reir.data.digits import prepare_digits
from reir.data.fonts import prepare_fonts
from reir.data.glyphs import prepare_glyphs
from reir.data.registry import BENCHMARKS, dataset_info
from reir.data.splits import SplitList, load_split_list, split_list_path
from reir.data.typefaces import prepare_typefaces
from reir.errors import ReirError, UsageError

log = logging.getLogger(__name__)
# Datasets generated on first use, with no download (typefaces: from Debian's fonts-liberation, installed).
EMBEDDED = {"digits": prepare_digits, "glyphs": prepare_glyphs, "fonts": prepare_fonts,
            "typefaces": prepare_typefaces}


def load_dataset(data_name: str, data_path: str | Path, crop_type: str, image_size: int | None = None) -> SplitList:
    split_list = _load(data_name, data_path, crop_type)
    cached = split_list.info.get("image_size")
    if image_size and cached and image_size > cached:
        log.warning(f"{split_list.root} holds images resized to {cached}x{cached}; `image_size` {image_size} "
                    f"upsamples them: prepare with `resize` {image_size} (or 0 for the originals)")
    return split_list


def _load(data_name: str, data_path: str | Path, crop_type: str) -> SplitList:
    if crop_type == "cropped" and not dataset_info(data_name).croppable:
        raise UsageError(f"`crop_type` cropped only applies to car, cub and custom, not {data_name}; "
                         "use `crop_type` uncropped")
    if data_name in EMBEDDED:
        return EMBEDDED[data_name](data_path)
    if data_name in BENCHMARKS:
        path = split_list_path(data_path, data_name, crop_type)
        if not path.is_file():
            raise ReirError(f"{path} not found: prepare the dataset first with "
                            f"python data_utils.py `data_path` {data_path} `data_name` {data_name}")
        return load_split_list(path)
    if data_name == "custom":
        return load_custom(data_path, crop_type)
    raise UsageError(f"unknown data_name {data_name!r}")
