"""``--with_random`` three ways, same data and seed: no weights, one draw per batch (REIR, as the original),
and one draw per image (what REIR did before).

The original draws one softmax(U(0,1)) vector per forward pass and scales the shared map of every
image of the batch by it. Where every branch starts with a convolution and a training-mode BatchNorm
on each of its paths (share_type layer1 to layer3 of every backbone), that batch-wide factor is divided
out again, so the draw changes training only through BatchNorm's eps; a per-image draw is not. This
script trains each variant on the demo's glyphs and prints the test metrics of its best epoch and the
largest logit change one weighted training-mode pass makes, so the choice of the default rests on
measured numbers.

    python benchmarks/branch_weights.py                       # resnet18, share_type layer3, 12 branches
    python benchmarks/branch_weights.py --share_type layer4 --epochs 2
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

from reir.data.glyphs import write_subset_csv
from reir.data.sources import load_dataset
from reir.model.network import ModelConfig, REIRNet, create_model
from reir.retrieval.database import load_database
from reir.training.config import TrainConfig
from reir.training.train import train

VARIANTS = ("unweighted", "per batch", "per image")


def per_image_weights(self: REIRNet, batch: int, device, dtype) -> torch.Tensor | None:
    """The earlier draw: an independent softmax(U(0,1)) vector for every image."""
    if not (self.training and self.config.with_random):
        return None
    return torch.softmax(torch.rand(batch, self.config.ensemble_size, device=device), dim=1).to(dtype)


@contextlib.contextmanager
def draw(variant: str):
    original = REIRNet.branch_weights
    if variant == "per image":
        REIRNet.branch_weights = per_image_weights
    try:
        yield
    finally:
        REIRNet.branch_weights = original


def logit_change(config: ModelConfig, variant: str, image_size: int) -> float:
    """Largest |weighted - unweighted| logit of one training-mode pass of an untrained network, relative."""
    torch.manual_seed(0)
    weighted = create_model(ModelConfig(**{**config.__dict__, "with_random": True}), weights="none").train()
    plain = create_model(ModelConfig(**{**config.__dict__, "with_random": False}), weights="none").train()
    plain.load_state_dict(weighted.state_dict())
    images = torch.randn(16, 3, image_size, image_size)
    with draw(variant), torch.no_grad():
        reference = plain(images)
        return ((weighted(images) - reference).abs().max() / reference.abs().max()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", default=None, help="where glyphs is generated (default: a scratch folder)")
    parser.add_argument("--model_type", default="resnet18")
    parser.add_argument("--share_type", default="layer3")
    parser.add_argument("--ensemble_size", type=int, default=12)
    parser.add_argument("--meta_class_size", type=int, default=12)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train_classes", type=int, default=300)
    parser.add_argument("--test_classes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: "
                        + ", ".join(VARIANTS))
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    config = ModelConfig(args.model_type, args.share_type, args.ensemble_size, args.meta_class_size)
    with tempfile.TemporaryDirectory() as scratch:
        data_path = Path(args.data_path or scratch)
        source = write_subset_csv(load_dataset("glyphs", str(data_path), "uncropped"), Path(scratch) / "subset.csv",
                                  args.train_classes, args.test_classes, seed=None)
        print(f"glyphs {args.train_classes} + {args.test_classes} classes, {args.model_type} share_type "
              f"{args.share_type}, {args.ensemble_size} x {args.meta_class_size}, {args.image_size} px, "
              f"{args.epochs} epochs, seed {args.seed}, random init")
        print("| branch weights | R@1 | R@2 | R@4 | R@8 | MAP@R | best epoch | max logit change, one pass | seconds |")
        print("|---|---|---|---|---|---|---|---|---|")
        for variant in variants:
            start = time.perf_counter()
            run = TrainConfig(data_name="custom", data_path=str(source), output_dir=str(Path(scratch) / variant),
                              weights="none", model_type=args.model_type, share_type=args.share_type,
                              ensemble_size=args.ensemble_size, meta_class_size=args.meta_class_size,
                              with_random=variant != "unweighted", image_size=args.image_size, batch_size=64,
                              num_epochs=args.epochs, num_workers=0, seed=args.seed, device="cpu", nmi_every=0)
            with draw(variant):
                result = train(run)
            database = load_database(result.database)
            metrics = database.info["metrics"]
            change = 0.0 if variant == "unweighted" else logit_change(config, variant, args.image_size)
            print(f"| {variant} | " + " | ".join(f"{100 * metrics[f'recall@{k}']:.1f}" for k in (1, 2, 4, 8))
                  + f" | {100 * metrics['map@r']:.1f} | {database.info['epoch']} | {change:.2e} | "
                  f"{time.perf_counter() - start:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
