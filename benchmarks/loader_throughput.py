"""Training-loader throughput with and without the resize cache, in one run on this machine.

    python benchmarks/loader_throughput.py [--num_images 400] [--num_workers 2]

Writes photo-like JPEGs of the benchmarks' typical size (500x375), prepares them twice (originals,
and the ``--resize`` cache), then times the training DataLoader + transform over each, alternating
the two so that machine load affects both alike. Prints images/s and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from reir.data.build import build_split_list
from reir.data.custom import read_folder
from reir.data.images import ImageList, build_transform


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth shapes plus fine texture: JPEGs of about the size of real photographs."""
    coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float64)
    image += rng.normal(0, 18, size=image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def images_per_second(split_list, image_size: int, batch_size: int, num_workers: int) -> float:
    dataset = ImageList(split_list, "train", build_transform(image_size, split_list.mean, split_list.std, True))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    start = time.perf_counter()
    seen = sum(len(images) for images, _ in loader)
    return seen / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=400)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed passes of each, alternating")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        root = Path(work) / "images"
        rng = np.random.default_rng(0)
        for i in range(args.num_images):
            split = "train" if i % 4 else "test"
            path = root / split / f"class{i % 10}" / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            photo_like(rng, args.width, args.height).save(path, quality=90)
        records = read_folder(root)
        size_kb = np.mean([r.source.stat().st_size for r in records]) / 1024
        lists = {}
        for name, resize in (("originals", 0), ("cache", args.image_size)):
            target = Path(work) / name / "custom" / "splits_uncropped.json"
            lists[name] = build_split_list(records, data_name="custom", crop_type="uncropped", target=target,
                                           image_root=root, resize=resize, skip_bad=False, workers=None).split_list
        timings = {name: [] for name in lists}
        for _ in range(args.rounds):
            for name, split_list in lists.items():
                timings[name].append(images_per_second(split_list, args.image_size, args.batch_size,
                                                       args.num_workers))
    best = {name: max(values) for name, values in timings.items()}
    print(f"{len(lists['cache'].splits['train'])} training JPEGs of {args.width}x{args.height} "
          f"(mean {size_kb:.0f} KiB), image_size {args.image_size}, batch {args.batch_size}, "
          f"{args.num_workers} workers, best of {args.rounds}")
    for name, value in best.items():
        print(f"  {name:<10} {value:8.1f} images/s   (passes: {', '.join(f'{v:.1f}' for v in timings[name])})")
    print(f"  cache / originals: {best['cache'] / best['originals']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
