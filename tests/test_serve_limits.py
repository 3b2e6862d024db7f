"""The service's door: ASCII-only ids and k, relative names, capped requests, timed and spooled uploads."""

import asyncio
import json

import httpx
import pytest

from reir.cli.serve import load_searcher
from reir.data.splits import Split
from reir.service import SPOOL_BYTES, BodyLimit, Searcher, create_app
from test_serve import assert_one_line_error, index_file, png_bytes, search, server  # noqa: F401 - fixtures

NOT_ASCII_DIGITS = ["\u00b2", "\u2460", "\u0663", "\uff13", "3\u00b2"]  # ², ①, Arabic-Indic 3, fullwidth 3


@pytest.mark.parametrize("text", NOT_ASCII_DIGITS)
def test_ids_and_k_are_ascii_decimal_only(server, text):
    assert_one_line_error(httpx.get(f"{server}/images/{text}", timeout=30), 404)
    assert_one_line_error(search(server, png_bytes(), k=text), 400)
    assert_one_line_error(httpx.post(f"{server}/search?k={text}", content=png_bytes(),
                                     headers={"content-type": "image/png"}, timeout=30), 400)
    assert_one_line_error(httpx.post(f"{server}/search", data={"id": text}, timeout=30), 404)
    assert httpx.get(f"{server}/images/3", timeout=30).status_code == 200


def test_a_file_sent_as_a_text_field_is_a_client_error(server):
    response = httpx.post(f"{server}/search", files={"image": ("q.png", png_bytes(), "image/png"),
                                                      "label": ("l.txt", b"3", "text/plain")}, timeout=30)
    assert_one_line_error(response, 400)


def test_raw_image_body_is_searched_like_an_upload(server):
    raw = httpx.post(f"{server}/search?k=3", content=png_bytes(seed=5), headers={"content-type": "image/png"},
                     timeout=60)
    form = search(server, png_bytes(seed=5), k="3")
    assert raw.status_code == form.status_code == 200
    assert [r["id"] for r in raw.json()["results"]] == [r["id"] for r in form.json()["results"]]


@pytest.fixture(scope="module")
def exposed_client(index_file):
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    args = SimpleNamespace(index=str(index_file), data_base=None, model=None, device=None, max_pixels=10**6,
                           expose_paths=True, backend="faiss", uri=None, collection=None)
    with TestClient(create_app(load_searcher(args))) as client:
        yield client


def test_absolute_paths_only_with_expose_paths(exposed_client, served_model):
    results = exposed_client.post("/search", files={"image": ("q.png", png_bytes(), "image/png")}).json()["results"]
    from reir.retrieval.database import load_database

    paths = load_database(served_model.database).paths("test")
    assert all(r["path"] == paths[r["id"]] for r in results)
    assert exposed_client.get("/info").json()["model"] == str(served_model.model)


def test_relative_names_come_from_the_common_folder(served_model):
    from reir.model.files import load_model
    from reir.retrieval.database import load_database
    from reir.retrieval.index import Index

    db = load_database(served_model.database)
    paths = [f"/srv/photos/{'a' if i % 2 else 'b/c'}/{i}.png" for i in range(len(db.paths("test")))]
    searcher = Searcher(load_model(served_model.model), Index.build(db.features["test"], paths))
    assert searcher.root == "/srv/photos"
    assert [searcher.name(i) for i in range(2)] == ["b/c/0.png", "a/1.png"]


def asgi_request(app, chunks, method="POST", headers=()):
    """Drive an ASGI app with one request whose body arrives as ``chunks`` (None: a pause of 0.2 s)."""
    sent = []
    pending = list(chunks)

    async def receive():
        while pending and pending[0] is None:
            pending.pop(0)
            await asyncio.sleep(0.2)
        if not pending:
            await asyncio.sleep(3600)
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": "/search", "headers": list(headers), "query_string": b""}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(body) if body else None


def test_requests_beyond_the_cap_get_503_with_retry_after():
    async def never_called(scope, receive, send):
        raise AssertionError("the capped request reached the application")

    limit = BodyLimit(never_called, 1000, max_requests=2)
    limit.in_flight = 2
    status, headers, body = asgi_request(limit, [b"x"])
    assert status == 503 and headers[b"retry-after"] == b"1" and "retry" in body["error"]


def test_a_trickled_body_past_the_time_limit_gets_408():
    async def never_called(scope, receive, send):
        raise AssertionError("the late request reached the application")

    status, _, body = asgi_request(BodyLimit(never_called, 10**6, upload_seconds=0.5), [b"a", None, b"b", None, None,
                                                                                        b"c", None, b"d"])
    assert status == 408 and "0.5 s" in body["error"]


def test_a_body_is_spooled_to_disk_and_replayed_whole():
    seen = {}

    async def app(scope, receive, send):
        received, more = b"", True
        while more:
            message = await receive()
            received += message["body"]
            more = message["more_body"]
        spool = scope["state"]["body_file"]
        seen.update(received=received, on_disk=spool._rolled, from_file=spool.read())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    payload = bytes(range(256)) * (3 * SPOOL_BYTES // 256)
    status, _, _ = asgi_request(BodyLimit(app, 10**7), [payload[i:i + 50_000] for i in range(0, len(payload), 50_000)])
    assert status == 200 and seen["received"] == payload and seen["from_file"] == payload and seen["on_disk"]


def test_natural_sort_of_class_names_takes_unicode_digits_as_text():
    split = Split(["a"] * 5, ["10", "\u00b2", "2", "\u0663", "b"])
    assert split.classes == ["2", "10", "b", "\u00b2", "\u0663"]


def test_a_malformed_range_header_gets_the_whole_image(server):
    whole = httpx.get(f"{server}/images/2", timeout=30)
    ranged = httpx.get(f"{server}/images/2", headers={"Range": "bytes=x-"}, timeout=30)
    assert whole.status_code == ranged.status_code == 200 and ranged.content == whole.content
