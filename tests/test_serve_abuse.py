"""Abuse costs the abuser: trickled bodies hold no request slot and are cut off, decoded pixels are bounded as
a total shared by all requests."""

import asyncio
import io
import json
import threading
import time

import pytest
import torch
from PIL import Image

from reir.errors import ReirError
from reir.service import BodyLimit


async def drive(app, chunks, pause=0.0):
    """One POST whose body arrives as ``chunks``, ``pause`` seconds apart: ``(status, error text)``."""
    sent, pending = [], list(chunks)

    async def receive():
        if not pending:
            await asyncio.sleep(3600)
        if pause:
            await asyncio.sleep(pause)
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/search", "headers": [], "query_string": b""}
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body).get("error", "") if body else ""


async def answer_ok(scope, receive, send):
    more = True
    while more:
        more = (await receive())["more_body"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def test_trickling_clients_hold_no_request_slot_and_are_cut_off():
    """Before: 4 trickling bodies took all 4 slots and every other client got 503 until their deadline."""
    limit = BodyLimit(answer_ok, 10**6, max_requests=4, upload_seconds=30, min_rate=1000, grace_seconds=0.5)

    async def scenario():
        trickles = [asyncio.create_task(drive(limit, [b"0123456789"] * 100, pause=0.2)) for _ in range(8)]
        await asyncio.sleep(0.3)
        normal = [await drive(limit, [b"x" * 5000]) for _ in range(5)]
        started = time.monotonic()
        return normal, await asyncio.gather(*trickles), time.monotonic() - started

    normal, trickled, waited = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert [status for status, _ in normal] == [200] * 5
    assert all(status == 408 and "KiB/s" in error for status, error in trickled), trickled
    assert waited < 5 and limit.in_flight == limit.receiving == 0


def test_connections_receiving_have_a_bound_of_their_own():
    limit = BodyLimit(answer_ok, 10**6, max_requests=64, max_receiving=2, min_rate=1000, grace_seconds=0.5)

    async def scenario():
        trickles = [asyncio.create_task(drive(limit, [b"ab"] * 50, pause=0.2)) for _ in range(2)]
        await asyncio.sleep(0.1)
        third = await drive(limit, [b"x"])
        await asyncio.gather(*trickles)
        return third, await drive(limit, [b"x"])

    third, later = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert third[0] == 503 and "bodies are arriving" in third[1] and later[0] == 200


def blank_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def test_decoded_pixels_are_bounded_as_a_total(served_model, monkeypatch):
    """Before: every upload decoded at once (only a count of large decodes was bounded, and the decoded image
    outlived it until resized), so memory grew with the number of concurrent large uploads."""
    from reir.model.files import load_model
    from reir.retrieval.database import load_database
    from reir.retrieval.index import Index
    from reir.service import Searcher
    from reir.service.searcher import BadRequest

    db = load_database(served_model.database)
    searcher = Searcher(load_model(served_model.model), Index.build(db.features["test"], db.paths("test")),
                        max_pixels=4_000_000)
    searcher.pixels.total = searcher.pixels.free = 5_000_000  # room for one 4 MP image, not two
    searcher.pixels.wait_seconds = 30
    held, most = [0], [0]
    lock = threading.Lock()
    transform = searcher.transform

    def counting_transform(image):
        with lock:
            held[0] += image.width * image.height
            most[0] = max(most[0], held[0])
        time.sleep(0.05)
        try:
            return transform(image)
        finally:
            with lock:
                held[0] -= image.width * image.height

    searcher.transform = counting_transform
    large = blank_png(2000, 2000)
    threads = [threading.Thread(target=searcher.prepare, args=(large,)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 4_000_000 and searcher.pixels.free == 5_000_000
    searcher.pixels.wait_seconds = 0.2
    with searcher.pixels.claim() as claim, claim.take(2000, 2000), pytest.raises(BadRequest) as busy:
        searcher.prepare(large)
    assert busy.value.status == 503 and "megapixels" in str(busy.value)
    assert searcher.prepare(blank_png(64, 64))[1:] == (64, 64) and searcher.pixels.free == 5_000_000


def nan_features(count=6, shape=(4, 3)):
    vectors = torch.randn(count, *shape, generator=torch.Generator().manual_seed(0))
    features = torch.nn.functional.normalize(vectors, dim=-1)
    features[2, 1, 0] = float("nan")
    features[4, 0, 2] = float("inf")
    return features


def test_non_finite_vectors_are_refused_when_built(tmp_path):
    """Before: one NaN row was indexed, and every search over the index then answered 500."""
    from reir.retrieval.database import Database, save_shard
    from reir.retrieval.index import Index

    for build in (lambda: Index.build(nan_features()), lambda: Index.build(nan_features(), factory="HNSW8"),
                  lambda: Database({"test": nan_features()}, {"test": {"paths": ["a"] * 6, "labels": [""] * 6}},
                                   {}).save(tmp_path / "db.safetensors"),
                  lambda: save_shard(tmp_path / "shard.safetensors", {"test": nan_features()},
                                     {"test": {"paths": ["a"] * 6, "labels": [""] * 6}})):
        with pytest.raises(ReirError, match="holds 2 of 6 vectors with NaN or infinite values; re-embed"):
            build()
    assert not (tmp_path / "db.safetensors").exists() and not (tmp_path / "shard.safetensors").exists()


@pytest.mark.parametrize("factory", ["Flat", "HNSW8"])
def test_non_finite_vectors_are_refused_when_opened(tmp_path, factory):
    """Files made elsewhere (or edited): the index and the database refuse to open, with the count."""
    import faiss
    import numpy as np

    from reir.fileio import save_tensors
    from reir.retrieval.database import FORMAT, load_database
    from reir.retrieval.index import Index

    index = Index.build(torch.nn.functional.normalize(torch.randn(6, 12), dim=-1), [f"{i}.png" for i in range(6)],
                        factory=factory)
    raw = faiss.index_factory(12, factory, faiss.METRIC_INNER_PRODUCT)
    raw.add(nan_features().reshape(6, 12).numpy().astype(np.float32))
    index.faiss_index = raw
    index.save(tmp_path / "nan.faiss")
    with pytest.raises(ReirError, match=r"nan\.faiss holds 2 of 6 vectors with NaN"):
        Index.load(tmp_path / "nan.faiss")
    save_tensors(tmp_path / "db.safetensors", {"test_features": nan_features()},
                 {"format": FORMAT, "splits": {"test": {"paths": ["a"] * 6, "labels": [""] * 6}}, "config": {}})
    with pytest.raises(ReirError, match="holds 2 of 6 vectors"):
        load_database(tmp_path / "db.safetensors")


def test_reir_search_applies_the_services_pixel_limit(served_model, tmp_path):
    """Before: a 144-megapixel query was decoded with only a warning (1.9 GB)."""
    from conftest import run_reir

    huge, middling = tmp_path / "huge.png", tmp_path / "middling.png"
    Image.new("L", (6500, 6500)).save(huge)  # 42.25 MP, refused from its header
    Image.new("RGB", (2500, 2000)).save(middling)  # 5 MP
    base = ["search", "--data_base", str(served_model.database), "--output_dir", str(tmp_path), "--json"]
    refused = run_reir(*base, "--query_img_name", str(huge))
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "6500x6500 pixels, more than the 40000000 allowed" in refused.stderr and "--max_pixels" in refused.stderr
    lowered = run_reir(*base, "--query_img_name", str(middling), "--max_pixels", "4000000")
    assert lowered.returncode == 1 and "more than the 4000000 allowed" in lowered.stderr
    searched = run_reir(*base, "--query_img_name", str(middling))
    assert searched.returncode == 0, searched.stderr
    assert json.loads(searched.stdout)["query"]["in_database"] is False
