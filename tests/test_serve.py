"""reir index + reir serve as a user runs them: a real server process, real HTTP, a real browser."""

import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from browser import chromium, screenshot
from conftest import REPO, run_reir

MAX_BODY_MB = 1


@pytest.fixture(scope="module")
def index_file(served_model, tmp_path_factory):
    output = tmp_path_factory.mktemp("index") / "digits.faiss"
    result = run_reir("index", "--data_base", str(served_model.database), "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert re.search(r"Indexed \d+ images \(test\) of dimension 12 with Flat", result.stdout)
    return output


def start_server(index_file, *flags: str) -> tuple[subprocess.Popen, str, int]:
    """``reir serve`` on a free port of 127.0.0.1: the process, its base URL and its port."""
    command = [sys.executable, "-m", "reir", "serve", "--index", str(index_file), "--port", "0", *flags]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = process.stdout.readline()
    found = re.search(r"at (http://127\.0\.0\.1:(\d+))/", line)
    if not found:
        process.kill()
        pytest.fail(f"reir serve did not start: {line}{process.stdout.read()}")
    return process, found.group(1), int(found.group(2))


@pytest.fixture(scope="module")
def server(index_file):
    """``reir serve`` on a free port of 127.0.0.1; yields its base URL."""
    process, address, port = start_server(index_file, "--k", "6", "--max_body_mb", str(MAX_BODY_MB))
    # the printed address takes connections at once (it once was bound but not yet listening)
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    yield address
    process.terminate()
    process.wait(timeout=30)


def png_bytes(size=(16, 16), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def search(server, data: bytes, name="query.png", **fields):
    return httpx.post(f"{server}/search", files={"image": (name, data, "image/png")}, data=fields, timeout=60)


def assert_one_line_error(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and body["error"] and "\n" not in body["error"]


def test_index_reports_recall_and_speed_of_approximate_indexes(served_model, tmp_path):
    result = run_reir("index", "--data_base", str(served_model.database), "--factory", "HNSW8",
                        "--efSearch", "7", "--output", str(tmp_path / "hnsw.faiss"))
    assert result.returncode == 0, result.stderr
    recall = re.search(r"Recall@10 against exact search: ([\d.]+)% on \d+ queries; ([\d,]+) queries/s", result.stdout)
    assert recall and 0 < float(recall.group(1)) <= 100
    assert (tmp_path / "hnsw.faiss").stat().st_size > 0 and (tmp_path / "hnsw.faiss.ids.json").is_file()
    import faiss

    from reir.retrieval.index import Index

    assert faiss.downcast_index(Index.load(tmp_path / "hnsw.faiss").faiss_index).hnsw.efSearch == 7
    bad = run_reir("index", "--data_base", str(served_model.database), "--factory", "IVF100000,Flat",
                     "--output", str(tmp_path / "ivf.faiss"))
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "cannot train" in bad.stderr
    assert not (tmp_path / "ivf.faiss").exists()


def test_search_returns_ranked_database_images(server, served_model):
    from reir.retrieval.database import load_database

    db = load_database(served_model.database)
    query = db.paths("test")[3]
    response = search(server, Path(query).read_bytes(), k="4")
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    # named relative to the indexed root (the one images folder), never by the server's absolute path
    assert len(results) == 4 and results[0]["path"] == Path(query).name
    assert results[0]["score"] == pytest.approx(1, abs=1e-4)
    assert all(r["path"] == Path(db.paths("test")[r["id"]]).name for r in results)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert all(r["label"] == db.labels("test")[r["id"]] for r in results)
    by_id = httpx.post(f"{server}/search", data={"id": "3", "k": "4"}, timeout=60).json()
    assert [r["id"] for r in by_id["results"]] == [r["id"] for r in results]
    assert all(r["correct"] == (r["label"] == db.labels("test")[3]) for r in by_id["results"])
    image = httpx.get(f"{server}/images/{results[1]['id']}", timeout=30)
    assert image.status_code == 200 and image.content == Path(db.paths("test")[results[1]["id"]]).read_bytes()
    info = httpx.get(f"{server}/info", timeout=30).json()
    assert info["model"] == served_model.model.name and str(served_model.output) not in json.dumps(info)


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def fifty_megapixels() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (7072, 7072)).save(buffer, format="PNG")  # 50.0 MP, a few hundred KB
    return buffer.getvalue()


BAD_UPLOADS = {
    "not an image": (lambda s: search(s, b"hello, this is text", name="notes.png"), 415),
    "truncated": (lambda s: search(s, truncated_jpeg(), name="cut.jpg"), 400),
    "50 megapixels": (lambda s: search(s, fifty_megapixels(), name="huge.png"), 413),
    "empty": (lambda s: search(s, b""), 400),
    "huge body": (lambda s: search(s, os.urandom(MAX_BODY_MB * 2**20 + 1000)), 413),
    "text instead of a file": (lambda s: httpx.post(f"{s}/search", data={"image": "x"}, timeout=30), 400),
    "no image at all": (lambda s: httpx.post(f"{s}/search", data={"k": "3"}, timeout=30), 400),
    "wrong content type": (lambda s: httpx.post(f"{s}/search", content=b"{}",
                                                 headers={"content-type": "application/json"}, timeout=30), 415),
    "k out of range": (lambda s: search(s, png_bytes(), k="0"), 400),
    "unknown id": (lambda s: httpx.post(f"{s}/search", data={"id": "999999"}, timeout=30), 404),
    "image id not a number": (lambda s: httpx.get(f"{s}/images/abc", timeout=30), 404),
    "negative image id": (lambda s: httpx.get(f"{s}/images/-1", timeout=30), 404),
}


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_request_is_a_4xx_with_a_one_line_json_error(server, case):
    send, status = BAD_UPLOADS[case]
    assert_one_line_error(send(server), status)
    assert search(server, png_bytes()).status_code == 200  # still answering


@pytest.mark.parametrize("path", ["/images/../../../../etc/passwd", "/images/..%2F..%2F..%2Fetc%2Fpasswd",
                                  "/images/%2Fetc%2Fpasswd", "/images/0/../../../etc/passwd"])
def test_images_never_serves_a_path(server, path):
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", path)  # sent as written: no client-side normalisation
    response = connection.getresponse()
    body = response.read()
    assert response.status == 404 and b"root:" not in body
    assert list(json.loads(body)) == ["error"]


def test_page_uploads_an_image_shows_the_grid_and_searches_a_clicked_result(server, served_model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from reir.retrieval.database import load_database

    db = load_database(served_model.database)
    expected = search(server, Path(db.paths("test")[0]).read_bytes(), k="6").json()["results"]
    driver = chromium(tmp_path / "profile")
    try:
        driver.get(server + "/")
        WebDriverWait(driver, 30).until(lambda d: "database images" in d.find_element(By.ID, "about").text)
        driver.find_element(By.ID, "file").send_keys(db.paths("test")[0])
        WebDriverWait(driver, 60).until(lambda d: "results in" in d.find_element(By.ID, "status").text)
        cells = driver.find_elements(By.CSS_SELECTOR, "#results .cell")
        assert [int(c.get_attribute("data-id")) for c in cells] == [r["id"] for r in expected]
        WebDriverWait(driver, 30).until(lambda d: all(d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", img)
            for img in d.find_elements(By.CSS_SELECTOR, "#results .cell img")))
        assert f"{expected[0]['score']:.4f}" in cells[0].text and expected[0]["label"] in cells[0].text
        screenshot(driver, "serve_upload")

        clicked = expected[1]
        cells[1].click()
        WebDriverWait(driver, 60).until(
            lambda d: f"database image {clicked['id']}" in d.find_element(By.ID, "query-text").text
            and "results in" in d.find_element(By.ID, "status").text)
        cells = driver.find_elements(By.CSS_SELECTOR, "#results .cell")
        assert int(cells[0].get_attribute("data-id")) == clicked["id"]
        for cell in cells:
            label = db.labels("test")[int(cell.get_attribute("data-id"))]
            colour = cell.value_of_css_property("border-top-color")
            assert colour == ("rgba(0, 170, 0, 1)" if label == clicked["label"] else "rgba(220, 0, 0, 1)")
        screenshot(driver, "serve_click")

        driver.find_element(By.ID, "file").send_keys(str(write(tmp_path / "notes.png", b"plain text")))
        WebDriverWait(driver, 30).until(lambda d: "error" in d.find_element(By.ID, "status").get_attribute("class"))
        assert "not an image" in driver.find_element(By.ID, "status").text
    finally:
        driver.quit()


def write(path, data: bytes):
    path.write_bytes(data)
    return path
