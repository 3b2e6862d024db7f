"""An artifact of several files is replaced as one: a full disk or a kill at any write point leaves the old
artifact or the new one, each opening and giving its own answers, never new parts beside old ones."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from faults import Killed, disk_full, fault_at, kill_child
from reir.errors import ReirError
from reir.fileio import atomic_files, atomic_write
from reir.retrieval.database import load_database, save_shard
from reir.retrieval.embedding_job import publish_sharded, shard_name
from reir.retrieval.index import Index

COUNT = 28  # the collection of the reported case: 26 of its 28 self-queries came back wrong
FAULTS = {"a full disk": disk_full, "a kill": Killed}


def vectors(seed: int, count: int = COUNT) -> torch.Tensor:
    features = torch.randn(count, 2, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(features, dim=2)


def self_answers(index: Index, features: torch.Tensor, paths: list[str]) -> bool:
    """Every image, as a query, finds itself first under its own path."""
    ids = index.search(features, 1).gallery_ids[:, 0].tolist()
    return [index.paths[i] for i in ids] == paths


def which_index(path: Path, sides: dict) -> str:
    loaded = Index.load(path)
    found = [name for name, (features, paths) in sides.items()
             if loaded.paths == paths and self_answers(loaded, features, paths)]
    assert found, f"the index at {path} mixes two saves: its paths are no save's, or its vectors answer wrongly"
    return found[0]


def index_sides() -> dict:
    return {"old": (vectors(1), [f"old/{i:02d}.png" for i in range(COUNT)]),
            "new": (vectors(2), [f"new/{i:02d}.png" for i in range(COUNT)])}


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@pytest.mark.parametrize("fault", FAULTS)
def test_an_index_and_its_id_map_are_replaced_as_one_at_every_write_point(tmp_path, fault):
    sides = index_sides()
    old, new = (Index.build(features, paths) for features, paths in sides.values())
    with fault_at(None) as seen:
        new.save(fresh(tmp_path / "count") / "c.faiss")
    assert len(seen) >= 4, seen
    outcomes = []
    for point in range(1, len(seen) + 1):
        target = fresh(tmp_path / "c") / "c.faiss"
        old.save(target)
        try:
            with fault_at(point, FAULTS[fault]):
                new.save(target)
        except (ReirError, Killed):
            pass
        outcomes.append(which_index(target, sides))
        Index.build(vectors(3, 5), [f"third/{i}" for i in range(5)]).save(target)  # a later save heals
        assert Index.load(target).paths == [f"third/{i}" for i in range(5)]
    assert outcomes[0] == "old" and outcomes[-1] in ("old", "new")
    if fault == "a kill":
        assert outcomes[-1] == "new"  # the last point is after the commit: the new index is what opens


def test_an_index_killed_between_its_renames_opens_as_the_new_one(tmp_path):
    sides = index_sides()
    target = tmp_path / "c.faiss"
    Index.build(*sides["old"]).save(target)
    script = f"""
import torch
from reir.retrieval.index import Index
features = torch.nn.functional.normalize(torch.randn({COUNT}, 2, 4, generator=torch.Generator().manual_seed(2)), dim=2)
Index.build(features, [f"new/{{i:02d}}.png" for i in range({COUNT})]).save({str(target)!r})
"""
    # renames: the pending index bytes, the id map (the commit), then the index file: killed before the last
    result = kill_child(script, 3, into=tmp_path)
    assert result.returncode == -9, result.stderr
    assert which_index(target, sides) == "new"


def test_an_index_that_is_not_the_one_its_id_map_names_is_refused(tmp_path):
    sides = index_sides()
    Index.build(*sides["old"]).save(tmp_path / "old.faiss")
    Index.build(*sides["new"]).save(tmp_path / "new.faiss")
    shutil.copyfile(tmp_path / "new.faiss", tmp_path / "old.faiss")  # new vectors beside the old id map
    with pytest.raises(ReirError, match="not the one its id map") as refused:
        Index.load(tmp_path / "old.faiss")
    assert "\n" not in str(refused.value) and "reir index" in str(refused.value)


# --- sharded databases ---------------------------------------------------------------------------------

SHARDS = 3


def write_parts(parts: Path, seed: int, prefix: str) -> None:
    """Finished shards of an embedding job, as reir embed leaves them before publishing."""
    fresh(parts)
    for shard in range(SHARDS):
        paths = [f"{prefix}/{shard}_{i}.png" for i in range(4)]
        save_shard(parts / shard_name(shard), {"test": vectors(seed + shard, 4)},
                   {"test": {"paths": paths, "labels": ["x"] * 4}},
                   {"fingerprint": prefix, "failed": [], "embedding_shape": [2, 4]})
    atomic_write(parts / "job.json", json.dumps({"fingerprint": prefix}))


def stand_ins(folder: Path) -> tuple[SimpleNamespace, SimpleNamespace]:
    model_file = folder / "model.safetensors"
    model_file.write_bytes(b"stands for a model")
    return (SimpleNamespace(path=model_file, file=lambda: model_file, run_config={"save_name": "toy"},
                            image_size=16, mean=[0.5] * 3, std=[0.25] * 3),
            SimpleNamespace(source="toy images", root=str(folder), data_name=None))


def which_database(output: Path) -> str:
    database = load_database(output)
    prefixes = {path.split("/")[0] for path in database.paths("test")}
    assert len(prefixes) == 1 and len(database.paths("test")) == SHARDS * 4, f"{output} mixes two databases"
    prefix = prefixes.pop()
    expected = torch.cat([vectors({"old": 10, "new": 20}[prefix] + s, 4) for s in range(SHARDS)])
    assert torch.equal(database.features["test"], expected), f"{output}'s vectors are not its paths' ones"
    return prefix


@pytest.mark.parametrize("fault", FAULTS)
def test_a_sharded_database_is_replaced_as_one_at_every_write_point(tmp_path, fault):
    model, collection = stand_ins(tmp_path)
    output, parts = tmp_path / "db", tmp_path / "db.parts"

    def publish_old():
        shutil.rmtree(output, ignore_errors=True)
        write_parts(parts, 10, "old")
        publish_sharded(model, collection, parts, output, SHARDS, [], {"test": SHARDS * 4})
        write_parts(parts, 20, "new")

    publish_old()
    with fault_at(None) as seen:
        publish_sharded(model, collection, parts, output, SHARDS, [], {"test": SHARDS * 4})
    assert which_database(output) == "new" and len(seen) >= SHARDS + 2, seen
    outcomes = []
    for point in range(1, len(seen) + 1):
        publish_old()
        try:
            with fault_at(point, FAULTS[fault]):
                publish_sharded(model, collection, parts, output, SHARDS, [], {"test": SHARDS * 4})
        except (ReirError, Killed):
            pass
        outcomes.append(which_database(output))
    assert outcomes[0] == "old" and "old" in outcomes
    if fault == "a kill":
        assert "new" in outcomes


def test_a_sharded_database_killed_while_publishing_opens_as_the_old_one(tmp_path):
    model, collection = stand_ins(tmp_path)
    output, parts = tmp_path / "db", tmp_path / "db.parts"
    write_parts(parts, 10, "old")
    publish_sharded(model, collection, parts, output, SHARDS, [], {"test": SHARDS * 4})
    write_parts(parts, 20, "new")
    script = f"""
from pathlib import Path
from types import SimpleNamespace
from reir.retrieval.embedding_job import publish_sharded
model_file = Path({str(tmp_path / 'model.safetensors')!r})
model = SimpleNamespace(path=model_file, file=lambda: model_file, run_config={{"save_name": "toy"}},
                        image_size=16, mean=[0.5] * 3, std=[0.25] * 3)
publish_sharded(model, SimpleNamespace(source="toy images", root={str(tmp_path)!r}, data_name=None),
                Path({str(parts)!r}), Path({str(output)!r}), {SHARDS}, [], {{"test": {SHARDS * 4}}})
"""
    # renames: the shards into the database folder, then its manifest: killed before the manifest's
    result = kill_child(script, SHARDS + 1, into=output)
    assert result.returncode == -9, result.stderr
    assert which_database(output) == "old"


# --- ONNX exports --------------------------------------------------------------------------------------

def tiny_model(seed: int, folder: Path):
    from reir.model.files import Model
    from reir.model.network import ModelConfig, create_model

    torch.manual_seed(seed)
    network = create_model(ModelConfig("resnet18", "layer4", 2, 2), weights="none").eval()
    model_file = folder / f"model{seed}.safetensors"
    model_file.write_bytes(b"stands for a model file")
    return Model(network, 16, [0.5] * 3, [0.25] * 3, {}, model_file)


def onnx_answers(output: Path) -> torch.Tensor:
    from reir.model.export import example_images, run_onnx

    return run_onnx(output, example_images(SimpleNamespace(image_size=16), 3, 7))


@pytest.fixture(scope="module")
def two_exports(tmp_path_factory):
    """The files of two exports (different weights, external data) and the answers each gives."""
    from reir.model.export import export

    folder = tmp_path_factory.mktemp("exports")
    exports = {}
    for name, seed in (("old", 1), ("new", 2)):
        output = folder / name / "m.onnx"
        difference, files = export(tiny_model(seed, folder), "onnx", output, external_data=True)
        assert difference < 1e-4
        exports[name] = ([*files, Path(f"{output}.json")], onnx_answers(output))
    assert not torch.allclose(exports["old"][1], exports["new"][1])
    return exports


def which_export(output: Path, exports: dict) -> str:
    answers = onnx_answers(output)
    found = [name for name, (_, expected) in exports.items() if torch.allclose(answers, expected, atol=1e-5)]
    assert found, f"{output} runs with weights of another export"
    return found[0]


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_an_onnx_export_is_published_as_one_at_every_write_point(tmp_path, two_exports, fault):
    """The publishing export() does (atomic_files with the JSON record last), on the real files of two exports."""

    def place(name: str, folder: Path, point: int | None = None) -> None:
        files = two_exports[name][0]
        with fault_at(point, FAULTS[fault]), atomic_files(folder / "m.onnx", record="m.onnx.json") as staged:
            for file in files:
                shutil.copyfile(file, staged.with_name(file.name))

    with fault_at(None) as seen:
        place("new", fresh(tmp_path / "count"))
    assert len(seen) >= 6, seen
    outcomes = []
    for point in range(1, len(seen) + 1):
        folder = fresh(tmp_path / "e")
        place("old", folder)
        with contextlib.suppress(ReirError, Killed):
            place("new", folder, point)
        outcomes.append(which_export(folder / "m.onnx", two_exports))
    assert outcomes[0] == "old"
    if fault == "a kill":
        assert outcomes[-1] == "new"


@pytest.mark.slow
def test_an_onnx_export_killed_while_publishing_runs_as_the_old_one(tmp_path, two_exports):
    from reir.fileio import file_sha256

    old_files = two_exports["old"][0]
    for file in old_files:
        shutil.copyfile(file, tmp_path / file.name)
    script = f"""
from pathlib import Path
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_artifact_commit import tiny_model
from reir.model.export import export
export(tiny_model(2, Path({str(tmp_path)!r})), "onnx", Path({str(tmp_path / 'm.onnx')!r}), external_data=True)
"""
    # renames in the export's hidden folder: the weights (named by their content), then the graph; killed
    # before the graph's, the new weights lie beside the old graph, which goes on using its own
    result = kill_child(script, 2, into=tmp_path)
    assert result.returncode == -9, result.stderr
    assert which_export(tmp_path / "m.onnx", two_exports) == "old"
    record = json.loads((tmp_path / "m.onnx.json").read_text())
    assert record["sha256"] == file_sha256(tmp_path / "m.onnx") and (tmp_path / record["external_data"]).is_file()
