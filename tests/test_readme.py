"""README.md's command blocks run as a user runs them, in a copy of the repository as a fresh checkout.

Every fenced block is either run here or listed in ``NOT_RUN`` with the reason (an official
dataset to download, a network install, a placeholder for the reader's own files); a new block
fails this test until it is classified. "Search your own images" runs as written, after the state
``make demo`` leaves (``data/glyphs`` rendered, a model and database in ``demo_output/``) made with a
small model on 12 glyph characters instead of the demo's two minutes of training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

# First line of a block -> why it is not run here.
NOT_RUN = {
    "make demo": "make demo trains for minutes; its output layout is recreated with a small model below, "
                 "and make test is this suite",
    "python3 -m venv .venv": "installs from the network",
    "python data_utils.py": "needs the official datasets downloaded under data/",
    "python train.py --data_name custom": "the reader's own CSV or folder",
    "python train.py --data_name cub": "needs CUB-200-2011 downloaded",
    "python inference.py": "needs a CARS196 database",
    "reir eval": "needs a CARS196 database",
    "reir convert epochs/": "needs the original's released CARS196 model (tests/test_original.py converts files "
                            "built to its three layouts)",
}
RUN = ("import logging", "MODEL=$(ls demo_output", "import glob")


def blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def fresh_checkout(target: Path) -> Path:
    """The tracked files (as committed or edited now) in ``target``, with this environment's virtualenv."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    (target / ".venv").symlink_to(sys.prefix)
    return target


def run_bash(script: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_python(code: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(cwd / ".venv" / "bin" / "python"), "-c", code], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(cwd)}, capture_output=True, text=True, timeout=timeout)


def test_every_block_is_run_or_has_a_reason():
    found = [body.strip().splitlines()[0] for _, body in blocks((REPO / "README.md").read_text())]
    unclassified = [line for line in found if not line.startswith(tuple(NOT_RUN) + RUN)]
    assert not unclassified, f"README blocks neither run by tests/test_readme.py nor given a reason: {unclassified}"
    assert all(any(line.startswith(start) for line in found) for start in RUN)


@pytest.mark.slow
def test_readme_blocks_run_in_a_fresh_checkout(tmp_path):
    from reir.data.glyphs import prepare_glyphs

    checkout = fresh_checkout(tmp_path / "REIR")
    readme = [body for _, body in blocks((checkout / "README.md").read_text())]
    by_start = {start: next(body for body in readme if body.startswith(start)) for start in RUN}

    # "From Python" under Train: as written
    trained = run_python(by_start["import logging"], checkout)
    assert trained.returncode == 0, trained.stderr[-2000:]
    best_recall, database = trained.stdout.strip().splitlines()[-1].split(" ", 1)
    assert 0 <= float(best_recall) <= 1 and (checkout / database).is_file()
    shutil.rmtree(checkout / "demo_output")

    # what make demo leaves, small: 12 glyph characters rendered, one model and its database
    prepare_glyphs(checkout / "data", limit=12)
    made = run_bash(".venv/bin/reir train --data_name glyphs --data_path data --output_dir demo_output --weights none "
                    "--ensemble_size 3 --meta_class_size 2 --image_size 16 --num_epochs 1 --num_workers 0 "
                    "--device cpu --batch_size 64", checkout)
    assert made.returncode == 0, made.stderr[-2000:]

    # "Search your own images": every line as written; serve (which runs until stopped) in the
    # background on a free port, as a fixed 8000 may be taken on a shared machine
    lines = by_start["MODEL=$(ls demo_output"].strip().splitlines()
    serve = next(i for i, line in enumerate(lines) if " serve " in line)
    lines[serve] = lines[serve].split("#")[0].rstrip() + " --port 0 > serve.log 2>&1 & echo $! > serve.pid"
    searched = run_bash("\n".join(lines), checkout)
    pid = int((checkout / "serve.pid").read_text()) if (checkout / "serve.pid").is_file() else None
    try:
        assert searched.returncode == 0, searched.stderr[-2000:]
        address = wait_for_address(checkout / "serve.log")
        info = json.load(urllib.request.urlopen(f"{address}/info", timeout=30))
        images = sorted((checkout / "data" / "glyphs" / "images").glob("*/*.png"))
        assert info["images"] == len(images) and info["labelled"]
        query = images[5].read_bytes()
        request = urllib.request.Request(f"{address}/search?k=3", data=query, headers={"Content-Type": "image/png"})
        results = json.load(urllib.request.urlopen(request, timeout=60))["results"]
        # names relative to the indexed root (data/glyphs/images): <character>/<font>.png
        assert results[0]["path"] == images[5].relative_to(images[5].parents[1]).as_posix()
        assert results[0]["label"] == images[5].parent.name
    finally:
        if pid:
            os.kill(pid, signal.SIGTERM)
    database = next((checkout / "demo_output" / "results").glob("glyphs_*_data_base.safetensors"))
    assert database.with_suffix(".html").is_file()

    # "From Python" under Search your own images: as written
    found = run_python(by_start["import glob"], checkout)
    assert found.returncode == 0, found.stderr[-2000:]
    first = eval(found.stdout.strip().splitlines()[-1])[0]  # the printed list of paths
    assert first == sorted(str(p.relative_to(checkout)) for p in images)[0]


def wait_for_address(log: Path, seconds: float = 120) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/", log.read_text() if log.is_file() else "")
        if found:
            return found.group(1)
        time.sleep(0.2)
    raise AssertionError(f"reir serve did not start: {log.read_text() if log.is_file() else 'no output'}")
