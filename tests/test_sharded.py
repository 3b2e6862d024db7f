"""Sharded databases: reir embed writes a folder of shards and a manifest; every reader takes it like one file."""

import hashlib
import json

import pytest
import torch

from conftest import run_reir
from handmade import write_images
from reir.retrieval.database import MANIFEST, iter_database, load_database

IMAGES = 70


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """Two class folders of small distinct images, and one file that only looks like an image."""
    root = tmp_path_factory.mktemp("sharded_collection")
    write_images(root / "a", [f"{i:03d}.png" for i in range(IMAGES - IMAGES // 3)])
    write_images(root / "b", [f"{i:03d}.png" for i in range(100, 100 + IMAGES // 3)])
    (root / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def embed(model, collection, output, *extra):
    return run_reir("embed", "--model", str(model), "--images", str(collection), "--output", str(output),
                      "--labels_from_folders", "--shard_size", "20", "--batch_size", "10", "--num_workers", "0", *extra)


@pytest.fixture(scope="module")
def both_forms(served_model, collection, tmp_path_factory):
    folder = tmp_path_factory.mktemp("forms")
    single, sharded = folder / "one_data_base.safetensors", folder / "many_data_base"
    for output, extra in ((single, ()), (sharded, ("--shard_output",))):
        result = embed(served_model.model, collection, output, *extra)
        assert result.returncode == 0, result.stderr
    return single, sharded, result


def test_shard_output_is_a_folder_with_a_manifest_holding_what_one_file_holds(both_forms):
    single, sharded, result = both_forms
    assert sharded.is_dir() and "a sharded database of 4 shard(s)" in result.stdout
    manifest = json.loads((sharded / MANIFEST).read_text())
    assert manifest["format"] == "reir-database-shards/1" and manifest["counts"] == {"test": IMAGES}
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:06d}.safetensors" for i in range(4)]
    for shard in manifest["shards"]:
        assert shard["sha256"] == hashlib.sha256((sharded / shard["file"]).read_bytes()).hexdigest()
    assert sum(s["counts"].get("test", 0) for s in manifest["shards"]) == IMAGES
    assert manifest["model_file"] == manifest["info"]["model_file"] and manifest["embedding_shape"] == [4, 3]
    one, many = load_database(single), load_database(sharded)
    assert one.splits == many.splits and one.info == many.info and one.config == many.config
    assert torch.equal(one.features["test"], many.features["test"])
    assert len(many.info["skipped"]) == 1 and many.info["skipped"][0][0].endswith("broken.png")
    streamed = list(iter_database(sharded))
    assert len(streamed) == 4 and max(len(features) for _, features, _, _ in streamed) <= 20
    assert torch.equal(torch.cat([features for _, features, _, _ in streamed]), one.features["test"])


def test_every_reader_gives_the_same_answer_for_both_forms(both_forms, tmp_path):
    single, sharded, _ = both_forms
    evaluated = [run_reir("eval", "--data_base", str(db), "--no_nmi") for db in (single, sharded)]
    assert all(r.returncode == 0 for r in evaluated), evaluated[1].stderr
    assert "recall@1" in evaluated[0].stdout and evaluated[0].stdout == evaluated[1].stdout
    maps = []
    for db, name in ((single, "one"), (sharded, "many")):
        result = run_reir("index", "--data_base", str(db), "--output", str(tmp_path / f"{name}.faiss"))
        assert result.returncode == 0, result.stderr
        maps.append(json.loads((tmp_path / f"{name}.faiss.ids.json").read_text()))
    assert maps[0]["paths"] == maps[1]["paths"] and maps[0]["labels"] == maps[1]["labels"]
    assert (tmp_path / "one.faiss").read_bytes() == (tmp_path / "many.faiss").read_bytes()
    import reir

    assert reir.evaluate_database(str(single), with_nmi=False) == reir.evaluate_database(str(sharded), with_nmi=False)
    report = run_reir("report", "--data_base", str(sharded), "--output", str(tmp_path / "many.html"))
    assert report.returncode == 0, report.stderr
    assert f"test {IMAGES} images" in (tmp_path / "many.html").read_text()


def test_outputs_are_replaced_only_when_databases_and_a_damaged_shard_is_named(served_model, collection, tmp_path):
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "keep.txt").write_text("mine")
    result = embed(served_model.model, collection / "b", stranger, "--shard_output")
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "not a REIR database" in result.stderr
    assert (stranger / "keep.txt").read_text() == "mine"
    output = tmp_path / "again_data_base.safetensors"
    # the first run asks for shards, the second gets them from the size threshold, replacing the first
    for source, count, extra in ((collection / "b", IMAGES // 3, "--shard_output"),
                                 (collection, IMAGES, "--max_file_gb=0.000001")):
        result = run_reir("embed", "--model", str(served_model.model), "--images", str(source),
                            "--output", str(output), extra, "--shard_size", "20", "--num_workers", "0")
        assert result.returncode == 0, result.stderr
        assert output.is_dir() and len(load_database(output).features["test"]) == count
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name, output.name + ".skipped.txt", "photos"]
    # the second database's shards took names the first one's manifest did not use; the first one's are gone
    names = [entry["file"] for entry in json.loads((output / MANIFEST).read_text())["shards"]]
    assert sorted(p.name for p in output.iterdir()) == sorted([*names, MANIFEST])
    shard = output / names[2]
    assert shard.name.startswith("shard-000002-")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    evaluated = run_reir("eval", "--data_base", str(output), "--no_nmi")
    assert evaluated.returncode != 0 and evaluated.stderr.count("\n") == 1
    assert shard.name in evaluated.stderr and "checksum" in evaluated.stderr
