"""reir embed: folders, CSVs and prepared datasets; unreadable images; a real kill and resume; torchrun."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_reir, torchrun_two_nodes
from reir.retrieval.database import load_database

IMAGES = 240
BROKEN = ("a/broken.jpg", "b/empty.png")


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """Distinct 16 px images in two class folders, with two files that only look like images."""
    root = tmp_path_factory.mktemp("collection")
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        path = root / ("a" if i % 2 else "b") / f"{i:04d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    (root / BROKEN[0]).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / BROKEN[1]).write_bytes(b"")
    return root


def embed(model, *args, cwd=None):
    return run_reir("embed", "--model", str(model), "--num_workers", "0", *args, cwd=cwd)


def assert_same_database(a, b):
    a, b = load_database(a), load_database(b)
    assert a.splits == b.splits and a.info == b.info
    assert set(a.features) == set(b.features)
    assert all(torch.equal(a.features[s], b.features[s]) for s in a.features)


@pytest.fixture(scope="module")
def uninterrupted(served_model, collection, tmp_path_factory):
    output = tmp_path_factory.mktemp("embed") / "whole_data_base.safetensors"
    result = embed(served_model.model, "--images", str(collection), "--output", str(output), "--labels_from_folders",
                   "--shard_size", "20", "--batch_size", "10")
    assert result.returncode == 0, result.stderr
    return output, result


def test_folder_with_unreadable_images_is_embedded_and_they_are_listed(uninterrupted, collection, served_model):
    output, result = uninterrupted
    db = load_database(output)
    assert list(db.features) == ["test"] and len(db.features["test"]) == IMAGES
    assert sorted(set(db.labels("test"))) == ["a", "b"]
    skipped = sorted(str(collection / name) for name in BROKEN)
    assert sorted(path for path, _ in db.info["skipped"]) == skipped
    assert "Skipped 2 unreadable image(s)" in result.stderr and all(p in result.stderr for p in skipped)
    listing = (output.parent / (output.name + ".skipped.txt")).read_text().splitlines()
    assert listing[0].startswith("# ") and sorted(line.split("\t")[0] for line in listing[1:]) == skipped
    assert "img/s" in result.stderr  # the progress bar
    assert not (output.parent / (output.name + ".parts")).exists()
    import reir

    model = reir.load_model(served_model.model)
    assert torch.allclose(reir.embed(model, db.paths("test")[:10]), db.features["test"][:10], atol=1e-5)


def test_killed_run_resumes_to_the_same_database(uninterrupted, collection, served_model, tmp_path):
    output = tmp_path / "resumed_data_base.safetensors"
    parts = tmp_path / (output.name + ".parts")
    command = [sys.executable, "-m", "reir", "embed", "--model", str(served_model.model), "--images", str(collection),
               "--output", str(output), "--labels_from_folders", "--shard_size", "20", "--batch_size", "10",
               "--num_workers", "0"]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(parts.glob("shard-*.safetensors"))) < 3 and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed; make the collection larger"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    done = len(list(parts.glob("shard-*.safetensors")))
    assert 3 <= done < -(-(IMAGES + len(BROKEN)) // 20) and not output.exists()
    again = embed(served_model.model, "--images", str(collection), "--output", str(output), "--labels_from_folders",
                  "--shard_size", "20", "--batch_size", "10")
    assert again.returncode == 0, again.stderr
    assert f"Resuming: {done} finished shard(s)" in again.stdout
    assert_same_database(uninterrupted[0], output)


def test_changed_settings_do_not_reuse_old_shards(served_model, collection, tmp_path):
    output = tmp_path / "x_data_base.safetensors"
    parts = tmp_path / (output.name + ".parts")
    parts.mkdir()
    (parts / "job.json").write_text('{"fingerprint": "another job"}')
    (parts / "shard-000000.safetensors").write_bytes(b"stale")
    result = embed(served_model.model, "--images", str(collection / "a"), "--output", str(output), "--shard_size", "50")
    assert result.returncode == 0, result.stderr
    assert "Resuming" not in result.stdout
    assert len(load_database(output).features["test"]) == IMAGES // 2
    assert set(load_database(output).labels("test")) == {""}  # no labels asked for


def test_a_rerun_with_other_split_or_labels_starts_afresh_instead_of_mixing_jobs(served_model, collection, tmp_path,
                                                                                 monkeypatch):
    """A job stopped after its shards were written, run again with other flags: its shards are not reused."""
    from reir.errors import ReirError
    from reir.retrieval import embedding_job

    output = tmp_path / "mixed_data_base.safetensors"
    parts = tmp_path / (output.name + ".parts")
    images = ["--images", str(collection), "--output", str(output), "--shard_size", "100", "--batch_size", "50"]

    def stopped(*args):
        raise ReirError("stopped before the database was written")

    with monkeypatch.context() as patch:
        patch.setattr(embedding_job, "shard_summary", stopped)
        first = embed(served_model.model, *images, "--split", "gallery", "--labels_from_folders")
    assert first.returncode == 1 and len(list(parts.glob("shard-*.safetensors"))) == 3
    recorded = json.loads((parts / "job.json").read_text())["arguments"]
    assert recorded["splits"] == ["gallery"] and recorded["labelled"] is True

    again = embed(served_model.model, *images)  # the default split test, no labels
    assert again.returncode == 0, again.stderr
    assert "Resuming" not in again.stdout
    assert ("Starting afresh: " in again.stdout and "splits ['gallery'] (now ['test'])" in again.stdout
            and "labelled True (now False)" in again.stdout), again.stdout
    database = load_database(output)
    assert list(database.features) == ["test"] and len(database.features["test"]) == IMAGES
    assert set(database.labels("test")) == {""}


def test_every_job_argument_is_recorded_and_any_change_is_named(served_model, collection):
    from dataclasses import fields, replace

    from reir.model.files import load_model
    from reir.retrieval.collections import from_folder
    from reir.retrieval.embedding_job import JobArguments

    arguments = JobArguments.of(load_model(served_model.model, "cpu"), from_folder(collection, "test", True), 20, 10)
    recorded = arguments.record()
    assert set(recorded) == {f.name for f in fields(JobArguments)} and arguments.differences(recorded) == []
    for declared in fields(JobArguments):
        value = getattr(arguments, declared.name)
        other = (not value if isinstance(value, bool) else value + 1 if isinstance(value, int)
                 else (*value, "x") if isinstance(value, tuple) else f"{value}x")
        changed = replace(arguments, **{declared.name: other})
        assert changed.key != arguments.key, declared.name
        assert [d.split()[0] for d in changed.differences(recorded)] == [declared.name]


def test_csv_and_prepared_dataset(served_model, collection, tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\n" + "".join(f"{collection / 'a' / f'{i:04d}.png'},odd\n" for i in (1, 3, 5)))
    result = embed(served_model.model, "--images", str(listing), "--output", str(tmp_path / "c.safetensors"))
    assert result.returncode == 0, result.stderr
    listed = load_database(tmp_path / "c.safetensors")
    assert listed.labels("test") == ["odd"] * 3
    # the images embedded, not the model's training data, are what the database records as its own
    assert listed.info["images"] == {"data_name": None, "source": str(listing.resolve()), "count": {"test": 3}}
    assert listed.info["data_name"] is None and listed.info["model_data"]["data_name"] == "digits"
    result = embed(served_model.model, "--data_name", "digits", "--data_path", str(served_model.data_path),
                   "--output", str(tmp_path / "d.safetensors"))
    assert result.returncode == 0, result.stderr
    embedded, trained = load_database(tmp_path / "d.safetensors"), load_database(served_model.database)
    assert embedded.info["images"]["data_name"] == "digits"
    assert embedded.info["images"]["count"] == {split: len(embedded.paths(split)) for split in embedded.features}
    assert embedded.splits == trained.splits
    assert all(torch.allclose(embedded.features[s], trained.features[s], atol=1e-5) for s in trained.features)
    evaluated = run_reir("eval", "--data_base", str(tmp_path / "d.safetensors"), "--no_nmi")
    assert evaluated.returncode == 0 and "recall@1" in evaluated.stdout


@pytest.mark.parametrize("args, message", [
    (lambda m: ["--images", "nowhere"], "does not exist"),
    (lambda m: ["--data_name", "digits", "--data_path", str(m.data_path), "--splits", "nope"], "no split nope"),
    (lambda m: ["--images", str(m.images / "0000.png")], "is a single image"),
])
def test_bad_input_is_one_line(served_model, tmp_path, args, message):
    result = embed(served_model.model, *args(served_model), "--output", str(tmp_path / "o.safetensors"))
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_torchrun_ranks_share_the_work_and_rank_zero_merges(uninterrupted, collection, served_model, tmp_path):
    output = tmp_path / "ddp_data_base.safetensors"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             "-m", "reir", "embed", "--model", str(served_model.model), "--images", str(collection),
                             "--output", str(output), "--labels_from_folders", "--shard_size", "20",
                             "--batch_size", "10", "--num_workers", "0", "--device", "cpu"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 ranks" in result.stdout
    ddp, single = load_database(output), load_database(uninterrupted[0])
    assert ddp.splits == single.splits and ddp.info["skipped"] == single.info["skipped"]
    assert torch.allclose(ddp.features["test"], single.features["test"], atol=1e-5)


def test_two_torchrun_nodes_embed_the_database_of_one_process(uninterrupted, collection, served_model, tmp_path):
    """Two launchers as two nodes (tests/conftest.py), each in its own working folder: both read the images
    and write their shards where every node sees them (a shared folder: the output is named absolutely),
    rank 0 merges, and the database is the one a single process writes."""
    nodes, shared = (tmp_path / "node0", tmp_path / "node1"), tmp_path / "shared"
    for folder in (*nodes, shared):
        folder.mkdir()
    output = shared / "two_nodes_data_base.safetensors"
    ran = torchrun_two_nodes("-m", "reir", "embed", "--model", str(served_model.model), "--images", str(collection),
                             "--output", str(output), "--labels_from_folders", "--shard_size", "20",
                             "--batch_size", "10", "--num_workers", "0", "--device", "cpu", folders=nodes)
    assert [r.returncode for r in ran] == [0, 0], ran[0].stderr[-2000:] + ran[1].stderr[-2000:]
    assert "2 ranks" in ran[0].stdout and "2 ranks" not in ran[1].stdout
    assert_same_database(output, uninterrupted[0])
    # the shards merged and gone; the two unreadable images listed beside the database
    assert sorted(p.name for p in shared.iterdir()) == [output.name, f"{output.name}.skipped.txt"]
    assert [list(folder.iterdir()) for folder in nodes] == [[], []]
