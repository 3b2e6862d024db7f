"""README.md's command blocks run as a user runs them, in README's order, in a copy of the repository as a
fresh checkout, with the virtualenv activated as README says once up front.

Every fenced block is either run here or listed in ``NOT_RUN`` with the reason (an official dataset to
download, a network install, a placeholder for the reader's own files); a new block fails this test until
it is classified. The blocks run after the state ``make demo`` leaves (``data/glyphs`` rendered, a model
and database in ``demo_output/``), made with a small model on 40 glyph characters (the letter A among
them, which README queries) instead of the demo's two minutes of training on all of them.
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
    "python data_utils.py --data_name cub": "needs CUB-200-2011 downloaded",
    "python train.py --data_name custom": "the reader's own CSV or folder",
    "python train.py --data_name cub": "needs CUB-200-2011 downloaded",
    "python inference.py --query_img_name data/car": "needs a CARS196 database",
    "reir eval --data_base car_": "needs a CARS196 database",
    "reir convert epochs/": "needs the original's released CARS196 model (tests/test_original.py converts files "
                            "built to its three layouts)",
}
ACTIVATE = ". .venv/bin/activate"
# The glyph characters rendered in place of make demo's: the first 40 code points drawn, U+0041 among them.
GLYPHS = 40


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


def runs(first_line: str) -> bool:
    return not first_line.startswith(tuple(NOT_RUN))


def test_every_block_is_run_or_has_a_reason():
    found = [body.strip().splitlines()[0] for _, body in blocks((REPO / "README.md").read_text())]
    assert found[1] == ACTIVATE, "README says once, right after the set-up commands, how to activate the virtualenv"
    for reason in NOT_RUN:
        assert any(line.startswith(reason) for line in found), f"NOT_RUN lists {reason!r}, which README lacks"
    run = [line for line in found if runs(line)]
    # the original's four scripts and a glyph command in every section of the path through the tool
    for start in ("python data_utils.py", "python train.py --data_name glyphs", "python inference.py",
                  "reir eval --data_base runs/", "MODEL=$(ls demo_output", "import logging", "import glob"):
        assert any(line.startswith(start) for line in run), start
    assert any("python ablation.py" in body for _, body in blocks((REPO / "README.md").read_text())
               if runs(body.strip().splitlines()[0]))


@pytest.mark.slow
def test_readme_blocks_run_in_a_fresh_checkout(tmp_path):
    from reir.data.glyphs import prepare_glyphs

    checkout = fresh_checkout(tmp_path / "REIR")
    readme = [(language, body) for language, body in blocks((checkout / "README.md").read_text())]

    # what make demo leaves, small: 40 glyph characters rendered, one model and its database
    prepare_glyphs(checkout / "data", limit=GLYPHS)
    made = run_bash(".venv/bin/reir train --data_name glyphs --data_path data --output_dir demo_output --weights none "
                    "--ensemble_size 3 --meta_class_size 3 --image_size 16 --num_epochs 1 --num_workers 0 "
                    "--device cpu --batch_size 64", checkout)
    assert made.returncode == 0, made.stderr[-2000:]

    images = sorted((checkout / "data" / "glyphs" / "images").glob("*/*.png"))
    for language, body in readme:
        first = body.strip().splitlines()[0]
        if not runs(first) or first == ACTIVATE:
            continue
        if language == "python":
            done = run_bash(f"{ACTIVATE}\npython - <<'README'\n{body}README", checkout)
            assert done.returncode == 0, f"{first}: {done.stderr[-2000:]}"
            if first == "import logging":
                best_recall, database = done.stdout.strip().splitlines()[-1].split(" ", 1)
                assert 0 <= float(best_recall) <= 1 and (checkout / database).is_file()
                assert database.startswith("python_output/")
            else:
                shown = eval(done.stdout.strip().splitlines()[-1])  # the printed list of paths
                assert shown[0] == sorted(str(p.relative_to(checkout)) for p in images)[0]
        elif first.startswith("MODEL=$(ls demo_output"):
            search_your_own_images(body, checkout, images)
        else:
            done = run_bash(f"{ACTIVATE}\n{body}", checkout)
            assert done.returncode == 0, f"{first}: {done.stderr[-2000:]}"
            check_output(first, done.stdout, checkout)


def check_output(first: str, stdout: str, checkout: Path) -> None:
    """What each glyph block must have printed or written beyond exiting 0."""
    if first.startswith("python data_utils.py"):
        assert "glyphs: ready in" in stdout and "glyphs ready in" in stdout
    elif first.startswith("python train.py --data_name glyphs"):
        for run in ("fixed", "random"):
            assert list((checkout / "runs" / run / "results").glob(f"glyphs_uncropped_{run}_*_data_base.safetensors"))
    elif first.startswith("python inference.py"):
        assert "Query " in stdout and "GE rate: " in stdout and "better ratio: " in stdout
        assert list((checkout / "runs" / "fixed" / "results").glob("DejaVuSans*/grid.png"))
        assert list((checkout / "runs" / "fixed" / "statistics").glob("glyphs_*.png"))
    elif first.startswith("reir eval"):
        assert stdout.startswith("glyphs (") and re.search(r"recall@1\s+\d", stdout)


def search_your_own_images(body: str, checkout: Path, images: list[Path]) -> None:
    """Every line as written; serve (which runs until stopped) in the background on a free port, as a fixed
    8000 may be taken on a shared machine."""
    lines = body.strip().splitlines()
    serve = next(i for i, line in enumerate(lines) if " serve " in line or line.startswith("reir serve"))
    lines[serve] = lines[serve].split("#")[0].rstrip() + " --port 0 > serve.log 2>&1 & echo $! > serve.pid"
    searched = run_bash("\n".join([ACTIVATE, *lines]), checkout)
    pid = int((checkout / "serve.pid").read_text()) if (checkout / "serve.pid").is_file() else None
    try:
        assert searched.returncode == 0, searched.stderr[-2000:]
        address = wait_for_address(checkout / "serve.log")
        info = json.load(urllib.request.urlopen(f"{address}/info", timeout=30))
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


def wait_for_address(log: Path, seconds: float = 120) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/", log.read_text() if log.is_file() else "")
        if found:
            return found.group(1)
        time.sleep(0.2)
    raise AssertionError(f"reir serve did not start: {log.read_text() if log.is_file() else 'no output'}")
