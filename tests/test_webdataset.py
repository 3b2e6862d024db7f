"""WebDataset tar shards as input, and the whole scale-out path: tar shards -> torchrun embed into a sharded
database (killed once, resumed) -> a Milvus collection (Milvus Lite and the Milvus server) -> reir serve,
answering like FAISS Flat."""

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_reir, run_script
from reir.retrieval.database import load_database

PER_TAR, TARS = 15, 16


def png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The same images twice: loose files in class folders, and tar shards in the same order.

    Even tars label samples with a ``json`` member, odd ones with ``cls``; the last tar also
    holds a sample that is not an image and one with no image at all.
    """
    root = tmp_path_factory.mktemp("webdataset")
    folder, shards = root / "folder", root / "shards"
    shards.mkdir()
    rng = np.random.default_rng(3)
    count = PER_TAR * TARS
    names = sorted(f"{'a' if i % 2 else 'b'}/{i:04d}.png" for i in range(count))
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    for t in range(TARS):
        with tarfile.open(shards / f"{t:06d}.tar", "w") as tar:
            for position, name in enumerate(names[t * PER_TAR:(t + 1) * PER_TAR]):
                key, label = f"{t:06d}_{position:03d}", name.split("/")[0]
                add_member(tar, f"{key}.png", (folder / name).read_bytes())
                if t % 2:
                    add_member(tar, f"{key}.cls", label.encode())
                else:
                    add_member(tar, f"{key}.json", json.dumps({"label": label}).encode())
            if t == TARS - 1:
                add_member(tar, "broken.jpg", b"\xff\xd8 not a jpeg")
                add_member(tar, "textonly.txt", b"no image here")
    return folder, shards, names


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (torchrun starts its workers in new sessions)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            children.append(int(stat.parent.name))
    return children + [d for child in children for d in descendants(child)]


def embed(model, images, output, *extra):
    return run_reir("embed", "--model", str(model), "--images", str(images), "--output", str(output),
                      "--batch_size", "5", "--shard_size", str(PER_TAR), "--num_workers", "0", *extra)


def test_tar_shards_give_the_database_of_the_same_images_in_a_folder(served_model, images, tmp_path):
    folder, shards, names = images
    from_folder, from_tars = tmp_path / "folder_data_base.safetensors", tmp_path / "tars_data_base.safetensors"
    assert embed(served_model.model, folder, from_folder, "--labels_from_folders").returncode == 0
    result = embed(served_model.model, f"{shards}/{{000000..{TARS - 1:06d}}}.tar", from_tars)
    assert result.returncode == 0, result.stderr
    a, b = load_database(from_folder), load_database(from_tars)
    assert torch.equal(a.features["test"], b.features["test"])
    assert a.labels("test") == b.labels("test") == [name.split("/")[0] for name in names]
    assert b.paths("test")[PER_TAR + 1] == f"{shards / '000001.tar'}::000001_001"
    skipped = sorted(path for path, _ in b.info["skipped"])
    assert skipped == [f"{shards / f'{TARS - 1:06d}.tar'}::{key}" for key in ("broken", "textonly")]
    assert "Skipped 2 unreadable image(s)" in result.stderr and "has no jpg/jpeg/png/webp image" in result.stderr
    missing = embed(served_model.model, f"{shards}/{{000000..000099}}.tar", tmp_path / "x.safetensors")
    assert missing.returncode != 0 and missing.stderr.count("\n") == 1 and "000016.tar does not exist" in missing.stderr


def test_a_sample_in_a_tar_reads_like_its_file_and_a_missing_one_is_named(images, tmp_path):
    from reir.data.images import ImageError, read_image
    from reir.data.tarshards import sample_image_bytes

    folder, shards, names = images
    sample = f"{shards / '000003.tar'}::000003_004"
    assert sample_image_bytes(sample) == ((folder / names[3 * PER_TAR + 4]).read_bytes(), "png")
    assert np.array_equal(np.asarray(read_image(sample)), np.asarray(read_image(folder / names[3 * PER_TAR + 4])))
    from reir.plots.report import thumbnail
    from reir.retrieval.collection_files import CollectionFiles

    files = CollectionFiles([], str(tmp_path.parent), None)  # both folders lie under it
    assert folder.is_relative_to(tmp_path.parent) and shards.is_relative_to(tmp_path.parent)
    # reports show tar samples
    assert thumbnail(files, sample) == thumbnail(files, str(folder / names[3 * PER_TAR + 4])) != ""
    with pytest.raises(ImageError, match="does not exist") as missing:
        read_image(f"{shards / '000003.tar'}::no_such_key")
    assert missing.value.kind == "missing"
    with pytest.raises(ImageError, match="does not exist"):
        read_image(f"{tmp_path / 'gone.tar'}::000000_000")
    not_a_tar = tmp_path / "fake.tar"
    not_a_tar.write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ImageError, match="cannot be read") as broken:
        read_image(f"{not_a_tar}::000000_000")
    assert broken.value.kind == "unreadable"


@pytest.fixture(scope="module")
def resumed_database(served_model, images, tmp_path_factory):
    """tar shards -> torchrun embed into a sharded database, killed once three shards are done, then run
    again: the database, the shards done before the kill and the resumed run."""
    _, shards, _ = images
    output = tmp_path_factory.mktemp("resumed") / "web_data_base"
    parts = output.with_name("web_data_base.parts")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "reir", "embed", "--model", str(served_model.model), "--images", f"{shards}/*.tar",
               "--output", str(output), "--shard_output", "--batch_size", "5", "--num_workers", "0", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(parts.glob("shard-*.safetensors"))) < 3 and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed; make the collection larger"
        time.sleep(0.02)
    for pid in [*descendants(process.pid), process.pid]:  # both ranks (in sessions of their own), then torchrun
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    done = len(list(parts.glob("shard-*.safetensors")))
    killed_early = output.exists()
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return output, done, killed_early, again


def test_a_killed_torchrun_embed_of_tar_shards_resumes_into_a_sharded_database(resumed_database, images):
    output, done, killed_early, again = resumed_database
    _, shards, names = images
    assert 3 <= done < TARS and not killed_early
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 ranks" in again.stdout, again.stdout
    assert f"Resuming: {done} finished shard(s) of {TARS} kept" in again.stdout, again.stdout
    assert (output / "manifest.json").is_file() and not output.with_name("web_data_base.parts").exists()
    database = load_database(output)
    assert database.paths("test") == [f"{shards / f'{i // PER_TAR:06d}.tar'}::{i // PER_TAR:06d}_{i % PER_TAR:03d}"
                                      for i in range(PER_TAR * TARS)]
    assert database.labels("test") == [name.split("/")[0] for name in names]


def test_a_sharded_database_of_tar_samples_to_milvus_to_serve(resumed_database, served_model, images, milvus_uri):
    """The resumed sharded database -> a Milvus collection (Milvus Lite and the server) -> reir serve,
    answering like FAISS Flat and serving tar samples as images."""
    output, _, _, again = resumed_database
    assert again.returncode == 0, again.stderr[-2000:]
    database = load_database(output)
    indexed = run_script("reir", "index", "--data_base", str(output), "--backend", "milvus", "--uri", milvus_uri,
                         "--collection", "web")
    assert indexed.returncode == 0, indexed.stderr
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    server = subprocess.Popen([sys.executable, "-m", "reir", "serve", "--backend", "milvus", "--uri", milvus_uri,
                               "--collection", "web", "--port", "0", "--expose_paths"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()
        found = re.search(r"Serving (\d+) images \(milvus FLAT\) at (http://127\.0\.0\.1:\d+)/", line)
        assert found and int(found.group(1)) == PER_TAR * TARS, line + (server.stdout.read() if server.poll() else "")
        query = png(np.random.default_rng(9).integers(0, 256, (16, 16, 3), dtype=np.uint8))
        response = httpx.post(f"{found.group(2)}/search", files={"image": ("q.png", query, "image/png")},
                              data={"k": "8"}, timeout=120)
        assert response.status_code == 200, response.text
        served = response.json()["results"]
        thumbnail = httpx.get(f"{found.group(2)}/images/{served[0]['id']}", timeout=60)
        assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/png"
        assert thumbnail.content == (images[0] / images[2][served[0]["id"]]).read_bytes()
    finally:
        server.terminate()
        server.wait(timeout=30)
    import reir

    model = reir.load_model(served_model.model)
    flat = reir.Index.from_database(output, factory="Flat")
    scores, ids = flat.search(reir.embed(model, [Image.open(io.BytesIO(query))]), 8)
    assert [r["id"] for r in served] == ids[0].tolist()
    assert [r["path"] for r in served] == [database.paths("test")[i] for i in ids[0].tolist()]
    torch.testing.assert_close(torch.tensor([r["score"] for r in served]), scores[0], atol=1e-5, rtol=0)
