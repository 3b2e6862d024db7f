"""The service (and reir report) hand out images of the collection and nothing else: a database's paths are
untrusted, resolved against the database's folder, followed through symlinks and kept under the recorded
collection root."""

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_reir
from reir.errors import ReirError
from reir.model.files import load_model
from reir.retrieval.collection_files import CollectionFiles
from reir.retrieval.database import Database, load_database
from reir.retrieval.index import Index
from reir.service import Searcher, create_app


def save_png(path, seed=0, size=(12, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, "PNG")
    return path


@pytest.fixture(scope="module")
def model(served_model):
    return load_model(served_model.model)


def crafted_database(model, folder, paths, root=None):
    """A database at ``folder/db.safetensors`` listing ``paths`` as written, with ``root`` recorded (or none)."""
    ensemble, meta = model.embedding_shape
    vectors = torch.randn(len(paths), ensemble, meta, generator=torch.Generator().manual_seed(1))
    features = torch.nn.functional.normalize(vectors, dim=-1)
    info = {"collection_root": str(root)} if root is not None else {}
    path = folder / "db.safetensors"
    Database({"test": features}, {"test": {"paths": [str(p) for p in paths], "labels": [""] * len(paths)}},
             model.run_config, info).save(path)
    return path


def client_for(model, database):
    from fastapi.testclient import TestClient

    searcher = Searcher(model, Index.from_database(database), source=database)
    return TestClient(create_app(searcher))


def assert_not_found_naming_no_path(response, *paths):
    assert response.status_code == 404 and list(response.json()) == ["error"]
    assert response.headers["content-type"] == "application/json"
    assert not any(str(p) in response.text for p in paths) and "root:" not in response.text


def test_a_database_naming_etc_passwd_serves_only_its_images(model, tmp_path):
    images = [save_png(tmp_path / "photos" / f"{i}.png", i) for i in range(3)]
    database = crafted_database(model, tmp_path, ["/etc/passwd", *images], root=tmp_path / "photos")
    with client_for(model, database) as client:
        assert_not_found_naming_no_path(client.get("/images/0"), "/etc/passwd")
        served = client.get("/images/1")
        assert served.status_code == 200 and served.content == images[0].read_bytes()
        assert served.headers["content-type"] == "image/png"
        assert client.post("/search", data={"id": "0"}).status_code == 404  # searched by id: the same door


def test_a_root_of_the_whole_machine_is_refused_at_start(model, tmp_path):
    images = [save_png(tmp_path / "photos" / f"{i}.png", i) for i in range(2)]
    no_root = crafted_database(model, tmp_path, ["/etc/passwd", *images])  # common folder: /
    with pytest.raises(ReirError, match="collection root is /, a folder of the whole machine"):
        Searcher(model, Index.from_database(no_root), source=no_root)
    for root in ("/", "/etc", "/usr/share"):
        crafted = crafted_database(model, tmp_path, images, root=root)  # a crafted database cannot widen it
        result = run_reir("serve", "--data_base", str(crafted), "--model", str(model.path), "--port", "0")
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "cannot be served" in result.stderr and re.search("whole machine|system folder", result.stderr)


def test_relative_paths_resolve_against_the_database_folder_not_the_working_directory(model, tmp_path,
                                                                                       monkeypatch):
    inside = save_png(tmp_path / "collection" / "images" / "a.png", seed=1)
    decoy = save_png(tmp_path / "cwd" / "images" / "a.png", seed=2)
    database = crafted_database(model, tmp_path / "collection", ["images/a.png", "../outside.png"],
                                root="images")
    save_png(tmp_path / "outside.png", seed=3)
    monkeypatch.chdir(tmp_path / "cwd")
    with client_for(model, database) as client:
        served = client.get("/images/0")
        assert served.status_code == 200 and served.content == inside.read_bytes() != decoy.read_bytes()
        assert_not_found_naming_no_path(client.get("/images/1"), tmp_path)


def test_a_symlink_swapped_in_after_indexing_is_not_followed_out(model, served_model, tmp_path):
    folder = tmp_path / "photos"
    images = [save_png(folder / f"{i}.png", i) for i in range(3)]
    outside = save_png(tmp_path / "private" / "secret.png", seed=9)
    database = tmp_path / "db.safetensors"
    result = run_reir("embed", "--model", str(served_model.model), "--images", str(folder), "--output", str(database))
    assert result.returncode == 0, result.stderr
    assert load_database(database).info["collection_root"] == str(folder.resolve())
    with client_for(model, database) as client:
        assert client.get("/images/0").status_code == 200
        images[0].unlink()
        images[0].symlink_to(outside)
        images[1].unlink()
        images[1].symlink_to("/etc/passwd")
        assert_not_found_naming_no_path(client.get("/images/0"), outside)
        assert_not_found_naming_no_path(client.get("/images/1"), "/etc/passwd")
        assert client.get("/images/2").status_code == 200


def test_one_symlink_pointing_outside_does_not_widen_the_root(model, served_model, tmp_path):
    folder = tmp_path / "photos"
    for i in range(3):
        save_png(folder / "a" / f"{i}.png", i)
    outside = save_png(tmp_path / "elsewhere" / "other.png", seed=7)
    (folder / "a" / "linked.png").symlink_to(outside)
    database = tmp_path / "db.safetensors"
    result = run_reir("embed", "--model", str(served_model.model), "--images", str(folder), "--output", str(database))
    assert result.returncode == 0, result.stderr
    db = load_database(database)
    assert db.info["collection_root"] == str(folder.resolve())
    linked = next(i for i, p in enumerate(db.paths("test")) if "elsewhere" in p or p.endswith("linked.png"))
    with client_for(model, database) as client:
        assert_not_found_naming_no_path(client.get(f"/images/{linked}"), outside)
        others = [i for i in range(len(db.paths("test"))) if i != linked]
        assert all(client.get(f"/images/{i}").status_code == 200 for i in others)


def test_only_files_that_decode_as_images_are_served_with_their_decoded_type(model, tmp_path):
    folder = tmp_path / "photos"
    png_named_jpg = folder / "picture.jpg"
    save_png(png_named_jpg)
    notes = folder / "notes.png"
    notes.write_text("not an image\n")
    (folder / "sub").mkdir()
    database = crafted_database(model, tmp_path, [png_named_jpg, notes, folder / "sub"], root=folder)
    with client_for(model, database) as client:
        served = client.get("/images/0")
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
        assert served.headers["x-content-type-options"] == "nosniff"
        assert_not_found_naming_no_path(client.get("/images/1"), notes)
        assert_not_found_naming_no_path(client.get("/images/2"), folder)


def test_report_thumbnails_come_from_the_collection_only(model, tmp_path):
    folder = tmp_path / "photos"
    images = [save_png(folder / f"{i}.png", i) for i in range(4)]
    outside = save_png(tmp_path / "elsewhere" / "x.png", seed=8)
    database = crafted_database(model, tmp_path, [*images, outside], root=folder)
    report = tmp_path / "report.html"
    result = run_reir("report", "--data_base", str(database), "--output", str(report), "--k", "4", "--queries", "5")
    assert result.returncode == 0, result.stderr
    html = report.read_text()
    assert html.count('class="missing"') >= 1 and html.count("data:image/jpeg") >= 4
    files = CollectionFiles([], str(folder), None)
    assert files.image(str(outside)) is None and files.image(str(images[0]))[1] == "image/png"
    assert files.image("0.png") is None  # relative, and no folder to resolve it against


def test_the_served_model_still_serves_its_own_images(served_model, model):
    """A database written by training records its images' folder, so the usual flow serves every image."""
    from fastapi.testclient import TestClient

    db = load_database(served_model.database)
    assert db.info["collection_root"] == os.path.realpath(served_model.images)
    searcher = Searcher(model, Index.from_database(served_model.database), source=served_model.database)
    with TestClient(create_app(searcher)) as client:
        assert all(client.get(f"/images/{i}").status_code == 200 for i in range(len(db.paths("test"))))


KEY = "k3y-for-tests-0123456789abcdef"


def test_requests_without_the_key_are_refused_and_the_page_still_loads(model, served_model):
    from fastapi.testclient import TestClient

    searcher = Searcher(model, Index.from_database(served_model.database), source=served_model.database)
    with TestClient(create_app(searcher, api_key=KEY)) as client:
        page = client.get("/")
        assert (page.status_code == 200 and "Authorization" in page.text
                and "#key=" not in page.text.split("<script>")[0])
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Basic {KEY}"}):
            for response in (client.get("/info", headers=headers), client.get("/images/0", headers=headers),
                             client.post("/search", data={"id": "0"}, headers=headers)):
                assert response.status_code == 401 and list(response.json()) == ["error"]
                assert response.headers["www-authenticate"].startswith("Bearer")
        good = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/info", headers=good).status_code == 200
        assert client.get("/images/0", headers=good).status_code == 200
        assert client.post("/search", data={"id": "0"}, headers=good).json()["results"][0]["id"] == 0


@pytest.fixture
def no_serving(monkeypatch):
    """``reir serve`` runs its whole start-up, binds and prints, but returns instead of serving."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)


def test_listening_beyond_this_machine_needs_a_key_or_no_auth(served_model, tmp_path, no_serving):
    base = ["serve", "--data_base", str(served_model.database), "--port", "0"]
    refused = run_reir(*base, "--host", "0.0.0.0")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "--api_key_file" in refused.stderr and "--no_auth" in refused.stderr and not refused.stdout
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    weak = run_reir(*base, "--host", "0.0.0.0", "--api_key_file", str(short))
    assert weak.returncode == 2 and "at least 16" in weak.stderr
    key_file = tmp_path / "service.key"
    key_file.write_text(KEY + "\n")
    keyed = run_reir(*base, "--host", "0.0.0.0", "--api_key_file", str(key_file))
    assert keyed.returncode == 0 and "Serving" in keyed.stdout and "WARNING" not in keyed.stderr
    open_to_all = run_reir(*base, "--host", "0.0.0.0", "--no_auth")
    assert open_to_all.returncode == 0 and "WARNING: --no_auth on 0.0.0.0" in open_to_all.stderr
    local = run_reir(*base)  # this machine only: no key needed, no warning
    assert local.returncode == 0 and not local.stderr


def test_without_any_root_nothing_is_served_but_search_works(model, served_model, tmp_path):
    """An index built from bare vectors (no paths) is still searchable; it simply hands out no file."""
    from fastapi.testclient import TestClient

    db = load_database(served_model.database)
    searcher = Searcher(model, Index.build(db.features["test"]))
    assert searcher.root is None
    with TestClient(create_app(searcher)) as client:
        assert client.post("/search", data={"id": "1"}).status_code == 404  # its image cannot be read
        assert_not_found_naming_no_path(client.get("/images/0"))
    crafted = crafted_database(model, tmp_path, [save_png(tmp_path / "photos" / "0.png")], root="/")
    report = tmp_path / "report.html"
    result = run_reir("report", "--data_base", str(crafted), "--output", str(report))
    assert result.returncode == 0, result.stderr
    assert "thumbnails not shown" in report.read_text() and "data:image/jpeg" not in report.read_text()


def test_the_page_works_with_a_key_from_the_address_or_asked_for(served_model, tmp_path):
    """A real server holding a key and a real browser: the key in the address's fragment, or typed when asked."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    from browser import chromium, screenshot
    from test_serve import start_server

    key_file = tmp_path / "service.key"
    key_file.write_text(KEY)
    index = tmp_path / "digits.faiss"
    assert run_reir("index", "--data_base", str(served_model.database), "--output", str(index)).returncode == 0
    process, address, _ = start_server(index, "--api_key_file", str(key_file))
    driver = chromium(tmp_path / "profile")
    query = load_database(served_model.database).paths("test")[0]
    try:
        driver.get(f"{address}/#key={KEY}")
        WebDriverWait(driver, 30).until(lambda d: "database images" in d.find_element(By.ID, "about").text)
        assert KEY not in driver.current_url  # taken out of the address bar
        driver.find_element(By.ID, "file").send_keys(query)
        WebDriverWait(driver, 60).until(lambda d: "results in" in d.find_element(By.ID, "status").text)
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .cell img") and all(
            d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
            for img in d.find_elements(By.CSS_SELECTOR, "#results .cell img")))
        screenshot(driver, "serve_with_key")

        driver.execute_script("sessionStorage.clear()")
        driver.get(f"{address}/")
        WebDriverWait(driver, 30).until(expected_conditions.alert_is_present())
        asked = driver.switch_to.alert
        assert "key" in asked.text
        asked.send_keys(KEY)
        asked.accept()
        WebDriverWait(driver, 30).until(lambda d: "database images" in d.find_element(By.ID, "about").text)
    finally:
        driver.quit()
        process.terminate()
        process.wait(timeout=30)
