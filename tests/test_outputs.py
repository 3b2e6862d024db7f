"""What a user owns is never destroyed: a command refuses an output that is one of its inputs, or an existing
file it did not write itself (unless --overwrite), before doing any work; one writer per output at a time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_reir, tiny_args
from handmade import BETTER_ANGLES, TEST_LABELS, WORSE_ANGLES, make_database
from reir.errors import ReirError
from reir.fileio import claim_output, save_tensors
from reir.retrieval.database import load_database
from reir.retrieval.index import Index


def refused(result, path, code: int = 2) -> None:
    """One line on stderr, naming the path and the way to go ahead."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(path) in result.stderr


def test_claim_output_tells_inputs_foreign_files_and_its_own_apart(tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    (source / "a.png").write_bytes(b"png")
    alias = tmp_path / "alias.png"
    os.link(source / "a.png", alias)
    for output in (alias, source / "db.safetensors", source):  # the same inode; inside an input folder; the folder
        with pytest.raises(ReirError, match="input"):
            claim_output(output, ("reir-database/1",), inputs=[source / "a.png", source], overwrite=True)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(ReirError) as error:
        claim_output(notes, ("reir-database/1",), setting="--overwrite")
    assert str(notes) in str(error.value) and "--overwrite" in str(error.value) and notes.read_text() == "mine"
    assert claim_output(notes, ("reir-database/1",), overwrite=True) == notes
    own = save_tensors(tmp_path / "own.safetensors", {}, {"format": "reir-database/1"})
    assert claim_output(own, ("reir-database/1",)) == own
    with pytest.raises(ReirError, match="reir-database/1"):  # its own format, but not the kind this command writes
        claim_output(own, ("reir-model/1",))
    assert claim_output(tmp_path / "new.safetensors", ("reir-model/1",)) == tmp_path / "new.safetensors"


@pytest.fixture()
def database(tmp_path):
    return make_database(tmp_path, "toy", {"test": (BETTER_ANGLES, TEST_LABELS)})


def test_index_refuses_its_database_and_a_stranger_but_rebuilds_its_own(database, tmp_path):
    before = database.read_bytes()
    result = run_reir("index", "--data_base", database, "--output", database)
    refused(result, database)
    assert database.read_bytes() == before and load_database(database).features["test"].shape[0] == 6
    notes = tmp_path / "notes.faiss"
    notes.write_text("my notes")
    refused(run_reir("index", "--data_base", database, "--output", notes), notes)
    assert notes.read_text() == "my notes"
    for _ in range(2):  # a rerun replaces its own index
        result = run_reir("index", "--data_base", database, "--output", tmp_path / "toy.faiss")
        assert result.returncode == 0, result.stderr
    assert len(Index.load(tmp_path / "toy.faiss")) == 6
    assert run_reir("index", "--data_base", database, "--output", notes, "--overwrite").returncode == 0
    assert len(Index.load(notes)) == 6


def test_report_search_and_ablation_refuse_what_they_did_not_write(database, tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<html>my page</html>")
    refused(run_reir("report", "--data_base", database, "--output", page), page)
    assert page.read_text() == "<html>my page</html>"
    for _ in range(2):
        assert run_reir("report", "--data_base", database, "--output", tmp_path / "toy.html").returncode == 0

    query = load_database(database).paths("test")[0]
    folder = tmp_path / "results" / Path(query).stem
    search = ("search", "--query_img_name", query, "--data_base", database, "--output_dir", tmp_path,
              "--retrieval_num", "2")
    folder.mkdir(parents=True)
    (folder / "grid.png").write_bytes(b"my own picture")
    for _ in range(2):  # a folder of that name it did not write is left alone: the search goes beside it, and
        # a rerun of the same query replaces its own results there
        result = run_reir(*search)
        assert result.returncode == 0, result.stderr
        assert f"{folder}_2" in result.stdout
    assert (folder / "grid.png").read_bytes() == b"my own picture" and sorted(p.name for p in folder.iterdir()) == [
        "grid.png"]

    worse = make_database(tmp_path / "w", "worse", {"test": (WORSE_ANGLES, TEST_LABELS)})
    ablation = ("ablation", "--better_data_base", database, "--worse_data_base", worse, "--output_dir", tmp_path,
                "--retrieval_num", "2", "--save_results")
    comparison = tmp_path / "results" / "ablation_toy_vs_worse_test"
    comparison.mkdir()
    (comparison / "keep.txt").write_text("mine")
    refused(run_reir(*ablation), comparison)
    assert run_reir(*ablation, "--overwrite").returncode == 0 and run_reir(*ablation).returncode == 0
    assert (comparison / "keep.txt").read_text() == "mine"


def test_export_refuses_a_stranger_before_reading_the_model(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not even a model: the output is checked first")
    output = tmp_path / "m.onnx"
    output.write_bytes(b"someone's graph")
    refused(run_reir("export", "--model", model, "--format", "onnx", "--output", output), output)
    assert output.read_bytes() == b"someone's graph"


def test_embed_refuses_its_model_and_a_stranger(served_model, tmp_path):
    model_bytes = served_model.model.read_bytes()
    result = run_reir("embed", "--model", served_model.model, "--images", served_model.images,
                      "--output", served_model.model)
    refused(result, served_model.model)
    assert served_model.model.read_bytes() == model_bytes
    inside = served_model.images / "db_data_base.safetensors"
    refused(run_reir("embed", "--model", served_model.model, "--images", served_model.images, "--output", inside),
            inside)
    assert not inside.exists()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    embed = ("embed", "--model", served_model.model, "--images", served_model.images, "--num_workers", "0")
    refused(run_reir(*embed, "--output", notes), notes)
    assert notes.read_text() == "mine"
    assert run_reir(*embed, "--output", notes, "--overwrite").returncode == 0
    assert run_reir(*embed, "--output", notes).returncode == 0  # its own database now
    assert len(load_database(notes).paths("test")) == 80


def test_train_replaces_only_the_files_of_the_same_run(small_digits_root, tmp_path):
    from reir.cli.train import main as train_main

    assert train_main(tiny_args(small_digits_root, tmp_path, "--image_size", "16")) == 0
    model = next((tmp_path / "epochs").glob("*_model.safetensors"))
    before = model.read_bytes()
    result = run_reir("train", *tiny_args(small_digits_root, tmp_path, "--image_size", "16", "--seed", "22"))
    refused(result, tmp_path)
    assert "seed 0" in result.stderr and "seed 22" in result.stderr and "--overwrite" in result.stderr
    assert model.read_bytes() == before
    seeded = tiny_args(small_digits_root, tmp_path, "--image_size", "16")
    unseeded = seeded[:seeded.index("--seed")] + seeded[seeded.index("--seed") + 2:]
    refused(run_reir("train", *unseeded), tmp_path)
    assert run_reir("train", *tiny_args(small_digits_root, tmp_path, "--image_size", "16")).returncode == 0


# --- one writer per output: two real processes -----------------------------------------------------------

def holder(script: str, started: Path) -> subprocess.Popen:
    """A process that runs ``script`` (a command whose work waits forever once ``started`` exists)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not started.exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the first writer never started its work"
        time.sleep(0.1)
    return child


WAIT = """
import pathlib, time
def wait(*args, **kwargs):
    pathlib.Path({started!r}).touch()
    time.sleep(600)
"""


def test_a_second_embed_onto_one_output_is_refused_at_once(served_model, tmp_path):
    output, started = tmp_path / "db_data_base.safetensors", tmp_path / "started"
    command = ["embed", "--model", str(served_model.model), "--images", str(served_model.images), "--output",
               str(output), "--num_workers", "0"]
    child = holder(WAIT.format(started=str(started)) + f"""
from reir.retrieval import embedding_job
embedding_job.embed_shards = wait
from reir.cli import main
main({command!r})
""", started)
    try:
        start = time.monotonic()
        result = run_reir(*command)
        refused(result, output)
        assert f"pid {child.pid}" in result.stderr and time.monotonic() - start < 30
    finally:
        child.kill()
        child.wait()
    result = run_reir(*command)  # the kernel released the dead writer's lock
    assert result.returncode == 0, result.stderr
    assert len(load_database(output).paths("test")) == 80 and not Path(f"{output}.lock").exists()


def test_a_second_training_into_one_run_is_refused_at_once(small_digits_root, tmp_path):
    started = tmp_path / "started"
    first = tiny_args(small_digits_root, tmp_path / "run_c", "--image_size", "16", "--seed", "11")
    child = holder(WAIT.format(started=str(started)) + f"""
from reir.training import train
train.train_one_epoch = wait
from reir.cli import main
main(["train", *{first!r}])
""", started)
    try:
        second = tiny_args(small_digits_root, tmp_path / "run_c", "--image_size", "16", "--seed", "22")
        result = run_reir("train", *second)
        refused(result, tmp_path / "run_c")
        assert f"pid {child.pid}" in result.stderr
        assert not list((tmp_path / "run_c").glob("*/*_model.safetensors"))
    finally:
        child.kill()
        child.wait()
