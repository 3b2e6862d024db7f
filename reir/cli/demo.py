"""``make demo``: train a small REIR on the embedded glyphs and show what learning bought.

It trains from random weights on the CPU on the 300 glyph training characters with the lowest code
points (each drawn in 12 to 21 fonts), then prints Recall@1/2/4/8 and MAP@R on the 300 lowest unseen
test characters for the trained model, for raw pixels and for the same network untrained, all on the
same test split.

    python -m reir.cli.demo --output_dir demo_output
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from reir.cli.common import reports_errors
from reir.data.custom import load_custom
from reir.data.glyphs import write_subset_csv
from reir.data.sources import load_dataset
from reir.data.splits import Split, save_split_list, split_list_path
from reir.model.network import ModelConfig
from reir.retrieval.baselines import label_ids, raw_pixel_features, untrained_features
from reir.retrieval.database import load_database
from reir.retrieval.metrics import retrieval_metrics
from reir.training import train
from reir.training.config import TrainConfig

RECALLS = (1, 2, 4, 8)
# The whole resnet18 is shared and the 48 branches are its meta-class heads: the cheapest REIR,
# so that training fits in about two minutes of a 2-core CPU.
CONFIG = ModelConfig("resnet18", "layer4", ensemble_size=48, meta_class_size=12)
IMAGE_SIZE = 32
# The 300 characters with the lowest code points of each split keep training near two minutes of a
# 2-core CPU; they are the hard part of the set (Latin letters with every diacritic, then Greek and
# Cyrillic), where raw pixels reach about the R@1 they reach on all 1,143 test characters.
TRAIN_CLASSES = 300
TEST_CLASSES = 300
# Seconds each stage took on an idle 2-core CPU (README's Results), announced before it starts so that a
# slower, shared machine shows progress rather than a hang: rendering the glyphs once, one epoch with its
# evaluation, the two baselines.
IDLE_SECONDS = {"dataset": 16, "epoch": 24, "baselines": 7}


def announce(stage: str, what: str, seconds: float) -> None:
    print(f"{stage}: {what}; about {seconds:.0f} s on an idle 2-core CPU, longer on a busy one", flush=True)


def training_config(args, source: Path) -> TrainConfig:
    """The demo's run: the cheap REIR above, from random weights, on the CPU, without NMI."""
    return TrainConfig(data_name="glyphs", data_path=str(source), output_dir=args.output_dir, weights="none",
                       model_type=CONFIG.model_type, share_type=CONFIG.share_type,
                       ensemble_size=CONFIG.ensemble_size, meta_class_size=CONFIG.meta_class_size,
                       image_size=IMAGE_SIZE, batch_size=64, num_epochs=args.num_epochs, num_workers=0,
                       seed=args.seed, device="cpu", nmi_every=0)


def row(name: str, metrics: dict[str, float]) -> str:
    cells = " | ".join(f"{100 * metrics[f'recall@{k}']:5.1f}" for k in RECALLS)
    return f"| {name:<24} | {cells} | {100 * metrics['map@r']:5.1f} |"


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reir.cli.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--data_path", default="data")
    parser.add_argument("--num_epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rendered = split_list_path(args.data_path, "glyphs", "uncropped").is_file()
    announce("[1/3] dataset", f"{'reading' if rendered else 'rendering'} the glyphs under {args.data_path}/glyphs, "
             f"then the {TRAIN_CLASSES} + {TEST_CLASSES} characters of the lowest code points",
             2 if rendered else IDLE_SECONDS["dataset"])
    source = write_subset_csv(load_dataset("glyphs", args.data_path, "uncropped"),
                              Path(args.output_dir) / "glyphs_subset.csv", TRAIN_CLASSES, TEST_CLASSES, seed=None)
    split_list = load_custom(source, "uncropped")
    # the chosen characters as a glyphs split list of their own, so that every output is named glyphs_...
    # after what it was trained on (a CSV trains as custom_...); the images stay under --data_path
    subset_root = Path(args.output_dir) / "glyphs_subset"
    save_split_list(split_list_path(subset_root, "glyphs", "uncropped"), "glyphs", "uncropped", split_list.mean,
                    split_list.std, {name: Split(split_list.absolute(name), split.labels)
                                     for name, split in split_list.splits.items()},
                    {"subset": f"{TRAIN_CLASSES} + {TEST_CLASSES} characters of {source}"})
    prepared = time.perf_counter()
    config = training_config(args, subset_root)
    announce("[2/3] training", f"{args.num_epochs} epochs on {len(split_list.splits['train'])} images, each "
             "followed by an evaluation (a bar shows each epoch's progress and time left)",
             args.num_epochs * IDLE_SECONDS["epoch"])
    database = load_database(train.train(config).database)
    trained = time.perf_counter()
    labels = label_ids(split_list, "test")
    announce("[3/3] baselines", f"raw pixels and the untrained network on the {len(split_list.splits['test'])} "
             "test images", IDLE_SECONDS["baselines"])
    rows = {
        f"REIR, trained (epoch {database.info['epoch']})":
            retrieval_metrics(database.features["test"], labels, RECALLS),
        "raw pixels": retrieval_metrics(raw_pixel_features(split_list, "test", IMAGE_SIZE), labels, RECALLS),
        "same network, untrained": retrieval_metrics(
            untrained_features(CONFIG, args.seed, split_list, "test", IMAGE_SIZE), labels, RECALLS),
    }
    test = split_list.splits["test"]
    print(f"\nglyphs test split: {len(test)} images of {len(test.classes)} characters never seen in training")
    print(f"| {'embedding':<24} |   R@1 |   R@2 |   R@4 |   R@8 | MAP@R |")
    print(f"|{'-' * 26}|-------|-------|-------|-------|-------|")
    for name, metrics in rows.items():
        print(row(name, metrics))
    print(f"dataset ready in {prepared - start:.0f} s, training (with its evaluations) {trained - prepared:.0f} s, "
          f"whole demo {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
