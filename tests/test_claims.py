"""The project's main claim, held by a test: a trained REIR retrieves unseen classes better than raw pixels."""

from __future__ import annotations

import csv

import pytest

from reir.data.custom import load_custom
from reir.data.glyphs import prepare_glyphs
from reir.retrieval.baselines import label_ids, raw_pixel_features
from reir.retrieval.database import load_database
from reir.retrieval.metrics import retrieval_metrics
from reir.training.config import TrainConfig
from reir.training.train import train

# The first 400 glyph characters, of which the 50 training and 50 test characters from U+00C0 on:
# Latin letters with diacritics, look-alikes where raw pixels are weak.
CHARACTERS = 400
FIRST_CODE_POINT = 0xC0
CLASSES_PER_SPLIT = 50


def accented_block(root) -> str:
    """A custom-dataset CSV over the block (800 training and 800 test images)."""
    split_list = prepare_glyphs(root, limit=CHARACTERS)
    rows = [["path", "label", "split"]]
    for split in ("train", "test"):
        classes = sorted((c for c in split_list.splits[split].classes if int(c[2:], 16) >= FIRST_CODE_POINT),
                         key=lambda name: int(name[2:], 16))[:CLASSES_PER_SPLIT]
        rows += [[path, label, split] for path, label in
                 zip(split_list.absolute(split), split_list.splits[split].labels) if label in classes]
    target = root / "accented.csv"
    with open(target, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return str(target)


@pytest.mark.slow
def test_trained_reir_beats_raw_pixels_on_unseen_glyphs(tmp_path):
    """Learned R@1 exceeds raw pixels' by at least 8 points on the test characters.

    Measured with this very setup (the demo's REIR: resnet18 shared, 48 heads x 12 meta classes,
    32 px, random init, 2 epochs, batch 64) for seeds 0-4: learned R@1 63.7, 62.7, 63.1, 63.9, 57.2 %
    against raw pixels' 45.9 %, margins 17.9, 16.9, 17.2, 18.0, 11.4 points (minimum 11.4). The bound
    sits below that minimum, so that a change of seed passes while a regression in training,
    embedding or search (back to raw pixels' level) fails. About 15 s of CPU per run.
    """
    source = accented_block(tmp_path)
    config = TrainConfig(data_name="custom", data_path=source, output_dir=str(tmp_path / "run"), weights="none",
                         model_type="resnet18", share_type="layer4", ensemble_size=48, meta_class_size=12,
                         image_size=32, batch_size=64, num_epochs=2, num_workers=0, seed=0, device="cpu",
                         nmi_every=0, recalls=[1])
    database = load_database(train(config).database)
    split_list = load_custom(source, "uncropped")
    labels = label_ids(split_list, "test")
    assert database.labels("test") == split_list.splits["test"].labels
    learned = retrieval_metrics(database.features["test"], labels, (1,))["recall@1"]
    raw = retrieval_metrics(raw_pixel_features(split_list, "test", 32), labels, (1,))["recall@1"]
    assert learned - raw >= 0.08, f"learned R@1 {learned:.3f} vs raw pixels {raw:.3f}"
