"""Under torchrun, rank 0 prepares a cold dataset cache while the other ranks wait; all train on its files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from dataset_fixtures import make_custom_csv
from reir.data.build import GENERATION_MARKER


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["custom cropped", "glyphs"])
def test_two_ranks_on_a_cold_cache_prepare_once_and_train_on_the_same_files(tmp_path, dataset):
    data_name, crop_type = [*dataset.split(), "uncropped"][:2]
    # custom: crops and resizes into a cache beside the CSV; glyphs render into the folder on first use
    data_path = make_custom_csv(tmp_path / "custom") if data_name == "custom" else tmp_path / "data"
    record = tmp_path / "record"
    record.mkdir()
    flags = ["--data_name", data_name, "--crop_type", crop_type, "--data_path", str(data_path),
             "--output_dir", str(tmp_path / "out"), "--weights", "none", "--ensemble_size", "3",
             "--meta_class_size", "2", "--share_type", "layer4", "--image_size", "16", "--batch_size", "4",
             "--num_epochs", "1", "--num_workers", "0", "--seed", "0", "--device", "cpu", "--nmi_every", "0"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             str(REPO / "tests" / "train_recording_data.py"), str(record), *flags],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (json.loads((record / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert second["start"] >= first["end"], "rank 1 read the data only after rank 0 had prepared it"
    assert first["root"] == second["root"] and first["paths"] == second["paths"] and len(first["paths"]) >= 9
    assert first["exist"] and second["exist"]
    root = tmp_path / "custom" if data_name == "custom" else data_path / "glyphs"
    hidden = [p for p in root.rglob(".*") if p.name not in (".reir", GENERATION_MARKER)]  # the cache's own names
    assert hidden == [], "no scratch folder or temporary file is left behind"
    if data_name == "custom":  # one cache generation, the one both ranks read
        generations = [p for p in (tmp_path / "custom").rglob("cropped_*") if p.is_dir()]
        assert len(generations) == 1 and all(p.startswith(str(generations[0])) for p in first["paths"])
