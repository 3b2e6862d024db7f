"""Shared fixtures: the embedded digits dataset prepared once, and a tiny training configuration."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import milvus_server as milvus_standalone  # another name: the fixture below is milvus_server

REPO = Path(__file__).resolve().parents[1]
# One thread per process: pytest-xdist runs a test per core, and tests start their own processes. Two
# threads per process on a busy machine spin in OpenMP barriers: measured ten times the CPU per step.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    """The pytest controller (not an xdist worker) names the session's Milvus server folder for its workers."""
    if not hasattr(config, "workerinput"):
        milvus_standalone.session_folder(create=True)


def pytest_collection_finish(session):
    """The Milvus server starts in the background as soon as a selected test will need it (its start, 4 s on
    an idle machine, overlaps other tests); the fixture waits for it."""
    if any(uses_milvus_server(item) for item in session.items):
        with contextlib.suppress(milvus_standalone.ServerUnavailable):
            milvus_standalone.start(milvus_standalone.session_folder())


def pytest_unconfigure(config):
    """The controller stops the session's Milvus server, if one was started, once every worker is done."""
    folder = milvus_standalone.session_folder()
    if not hasattr(config, "workerinput") and folder and (folder / "owner").read_text() == str(os.getpid()):
        milvus_standalone.stop(folder)


def uses_milvus_server(item) -> bool:
    """Whether a test asks for the server itself or runs a parameter marked ``milvus_server``."""
    return "milvus_server" in getattr(item, "fixturenames", ()) or \
        item.get_closest_marker("milvus_server") is not None


def pytest_collection_modifyitems(items):
    """Tests marked slow start first: under ``-n auto --dist worksteal`` the other workers take the short
    tests meanwhile, so no long run is left alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def terminal_logging():
    """Library messages reach stdout/stderr as under the CLI, so tests read them as a user would."""
    from reir.cli.common import configure_logging

    configure_logging()


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """A data folder with digits written once for the whole test session."""
    from reir.data.digits import prepare_digits

    root = tmp_path_factory.mktemp("data")
    prepare_digits(root)
    return root


@pytest.fixture(scope="session")
def glyphs_root(tmp_path_factory) -> Path:
    """A data folder holding the first 12 glyph classes (6 train, 6 test), generated once."""
    from reir.data.glyphs import prepare_glyphs

    root = tmp_path_factory.mktemp("glyphs_data")
    prepare_glyphs(root, limit=12)
    return root


def tiny_args(data_path: Path, output_dir: Path, *extra: str) -> list[str]:
    """A REIR small enough to train an epoch on digits in a second on a CPU: the branches are heads on a shared
    resnet18 (``--share_type layer4``; a test of deeper branches says so)."""
    return ["--data_name", "digits", "--data_path", str(data_path), "--output_dir", str(output_dir),
            "--weights", "none", "--share_type", "layer4", "--ensemble_size", "3", "--meta_class_size", "2",
            "--image_size", "32",
            "--batch_size", "64", "--num_epochs", "1", "--num_workers", "0", "--seed", "0", "--device", "cpu",
            *extra]


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a root script or ``-m reir`` as a user would, capturing output."""
    command = [sys.executable, *(["-m", "reir"] if script == "reir" else [str(REPO / script)]), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun_two_nodes(*script: str, folders: tuple[Path, Path],
                      timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """``torchrun --nnodes 2 --nproc_per_node 1 SCRIPT...`` as two nodes would run it: two separate launchers,
    node ``n`` in its own working folder ``folders[n]``, meeting at a c10d rendezvous on 127.0.0.1.

    The c10d rendezvous ignores ``--node_rank`` and numbers the nodes by their sorted addresses (host
    names on a cluster), so node 0 says it is 127.0.0.1 and node 1 127.0.0.2 (both this machine's
    loopback): node 0 then holds rank 0, whichever launcher starts first.
    """
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    job = uuid.uuid4().hex  # the rendezvous id both nodes give
    launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                                   str(node), "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                                   f"127.0.0.1:{port}", "--rdzv_id", job, "--rdzv_conf",
                                   "join_timeout=120", "--local_addr", f"127.0.0.{node + 1}", *script],
                                  cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for node, folder in enumerate(folders)]
    try:
        with ThreadPoolExecutor(len(launchers)) as pool:
            outputs = list(pool.map(lambda launcher: launcher.communicate(timeout=timeout), launchers))
    finally:
        for launcher in launchers:  # SIGTERM first: torchrun then stops its workers (in sessions of their own)
            if launcher.poll() is None:
                launcher.terminate()
                try:
                    launcher.wait(30)
                except subprocess.TimeoutExpired:
                    launcher.kill()
                    launcher.wait()
    return [subprocess.CompletedProcess(launcher.args, launcher.returncode, out, err)
            for launcher, (out, err) in zip(launchers, outputs)]


def run_reir(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``reir ARGS`` in this process, its output captured: what a user sees, without starting Python and
    importing torch again (about 3 s of CPU a command). For commands that end by themselves; servers,
    torchrun, kills and a fresh interpreter's view stay with :func:`run_script`."""
    import contextlib
    import io

    from reir.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    try:
        os.chdir(cwd or REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse's usage errors and --help
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(["reir", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def small_digits_root(tmp_path_factory) -> Path:
    """Digits cut to 8 images per class (0-4 train, 5-9 test), for tests that run many short trainings."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from reir.data.splits import Split, save_split_list, split_list_path

    root = tmp_path_factory.mktemp("small_data")
    digits = load_digits()
    splits = {"train": Split([], []), "test": Split([], [])}
    for label in range(10):
        for index in np.flatnonzero(digits.target == label)[:8]:
            grey = np.clip(digits.images[index] * 16, 0, 255).astype(np.uint8)
            path = root / "digits" / "images" / f"{index:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2)).save(path)
            split = splits["train" if label < 5 else "test"]
            split.paths.append(f"images/{index:04d}.png")
            split.labels.append(str(label))
    save_split_list(split_list_path(root, "digits", "uncropped"), "digits", "uncropped",
                    [0.2] * 3, [0.3] * 3, splits)
    return root


@pytest.fixture(scope="session")
def served_model(small_digits_root, tmp_path_factory):
    """One tiny model trained once (16 px, 4 branches), shared by the API, embed, serve and report tests."""
    from types import SimpleNamespace

    from reir.cli.train import main as train_main

    out = tmp_path_factory.mktemp("served_model")
    args = tiny_args(small_digits_root, out, "--image_size", "16", "--ensemble_size", "4", "--meta_class_size", "3",
                     "--share_type", "layer4", "--num_epochs", "2")
    assert train_main(args) == 0
    name = "digits_uncropped_fixed_unrandom_layer4_resnet18_4_3"
    return SimpleNamespace(model=out / "epochs" / f"{name}_model.safetensors",
                           database=out / "results" / f"{name}_data_base.safetensors",
                           statistics=out / "statistics" / f"{name}_results.csv",
                           images=small_digits_root / "digits" / "images", data_path=small_digits_root, output=out)


def missing(message: str):
    """Something the machine lacks: a skip that says what to install, a failure in CI (``CI=true``)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def milvus_server():
    """The session's Milvus standalone server (tests/milvus_server.py), answering a real pymilvus call:
    its URI on the host's loopback, shared by every test and worker of the session."""
    from pymilvus import MilvusClient

    from reir.retrieval.milvus import TOKEN_VARIABLE

    try:
        uri = milvus_standalone.address(milvus_standalone.session_folder())
    except milvus_standalone.ServerUnavailable as exc:
        missing(str(exc))
    client = MilvusClient(uri=uri, token=milvus_standalone.ROOT_TOKEN, timeout=30)
    try:
        assert "default" in client.list_databases(timeout=30)
    finally:
        client.close()
    with pytest.MonkeyPatch.context() as patch:  # REIR's credentials for the server, for the rest of the session
        patch.setenv(TOKEN_VARIABLE, milvus_standalone.ROOT_TOKEN)
        yield uri


@contextlib.contextmanager
def milvus_database(server: str):
    """A database of its own on the session's Milvus server (so tests never see each other's collections),
    dropped with its collections after: its URI."""
    import uuid

    from pymilvus import MilvusClient

    database = f"test_{uuid.uuid4().hex[:12]}"
    client = MilvusClient(uri=server, token=milvus_standalone.ROOT_TOKEN, timeout=30)
    client.create_database(database)
    uri = f"{server}/{database}"
    try:
        yield uri
    finally:
        inside = MilvusClient(uri=uri, token=milvus_standalone.ROOT_TOKEN, timeout=30)
        for collection in inside.list_collections():
            inside.drop_collection(collection)
        inside.close()
        client.drop_database(database)
        client.close()


MILVUS_TARGETS = ["lite", pytest.param("server", marks=pytest.mark.milvus_server)]


@pytest.fixture(params=MILVUS_TARGETS)
def milvus_uri(request, tmp_path):
    """Each Milvus test against Milvus Lite (a file of its own) and the Milvus server (a database of its own)."""
    if request.param == "lite":
        yield str(tmp_path / "reir.milvus.db")
        return
    with milvus_database(request.getfixturevalue("milvus_server")) as uri:
        yield uri


def pytest_terminal_summary(terminalreporter):
    """The fuzz campaigns' case counts per surface, shown after the run (also from xdist workers)."""
    lines = [value for reports in terminalreporter.stats.values() for report in reports
             for name, value in getattr(report, "user_properties", ()) if name == "fuzz cases"]
    if lines:
        terminalreporter.section("fuzz cases")
        for line in dict.fromkeys(lines):
            terminalreporter.write_line(line)
