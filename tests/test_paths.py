"""A model trained with relative --data_path and --output_dir serves, searches and reports from any directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest

from conftest import REPO, run_reir, run_script, tiny_args
from test_serve import png_bytes


@pytest.mark.slow
def test_serve_search_and_report_work_from_another_directory(small_digits_root, tmp_path):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    relative_data = os.path.relpath(small_digits_root, here)
    trained = run_script("train.py", *tiny_args(relative_data, "out", "--share_type", "layer4", "--image_size", "16",
                                                "--nmi_every", "0"), cwd=here)
    assert trained.returncode == 0, trained.stderr
    database = here / "out" / "results" / "digits_uncropped_fixed_unrandom_layer4_resnet18_3_2_data_base.safetensors"
    query = elsewhere / "query.png"
    query.write_bytes(png_bytes(seed=3))

    searched = run_reir("search", "--data_base", str(database), "--query_img_name", str(query), "--json",
                        "--retrieval_num", "4", cwd=elsewhere)
    assert searched.returncode == 0, searched.stderr
    found = re.findall(r'"path": "([^"]+)"', searched.stdout)
    assert len(found) >= 4 and all(os.path.isabs(p) and os.path.isfile(p) for p in found), searched.stdout[:500]

    reported = run_reir("report", "--data_base", str(database), "--output", "report.html", cwd=elsewhere)
    assert reported.returncode == 0, reported.stderr
    page = (elsewhere / "report.html").read_text()
    assert "<img" in page and "does not exist" not in reported.stderr + page

    indexed = run_reir("index", "--data_base", str(database), "--output", str(elsewhere / "x.faiss"),
                       cwd=here)
    assert indexed.returncode == 0, indexed.stderr
    server = subprocess.Popen([sys.executable, "-m", "reir", "serve", "--index", "x.faiss", "--port", "0"],
                              cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()
        address = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
        assert address, line + server.stdout.read()
        response = httpx.post(f"{address.group(1)}/search", files={"image": ("q.png", query.read_bytes(), "image/png")},
                              timeout=60)
        assert response.status_code == 200 and len(response.json()["results"]) > 0, response.text
    finally:
        server.terminate()
        server.wait(timeout=30)
