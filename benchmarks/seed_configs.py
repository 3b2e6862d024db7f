"""The README's parameter table, row by row: can this machine train it, and does the whole path work?

For each row (4 backbones x the meta-class sizes of CARS196, CUB200, SOP, In-shop; 48 branches
shared from ``layer1``, as in the original) it prints the parameter count and the memory
estimate of :mod:`reir.training.memory`. For a row whose estimate plus 1.5 GiB (libraries, data,
evaluation) fits the memory available now, and that ``--rows`` selects, it runs on generated
images at ``--image_size``:

    train 2 epochs (the reference) | train again, SIGKILL in epoch 2 | --resume auto
    -> statistics, model and database identical to the reference
    -> reir export --format onnx -> reir embed -> reir index -> reir serve + one query

Every stage is its own process; its peak resident size (``wait4``'s ru_maxrss) is printed beside
the budget of 1.25 x (parameters + gradients + optimizer state) + 1.5 GiB, with the files it wrote. Runs that use more than 3 GiB belong under
``flock /tmp/reir-bigmem.lock`` on a shared machine.

    python benchmarks/seed_configs.py --rows none                  # the estimates only
    flock /tmp/reir-bigmem.lock python benchmarks/seed_configs.py --rows resnet18/12
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reir.fileio import load_tensors
from reir.model.network import ModelConfig
from reir.training.memory import GIB, HOST_OVERHEAD, estimate, host_available

REPO = Path(__file__).resolve().parents[1]

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnext50_32x4d")
META_CLASS_SIZES = {"CARS196": 12, "CUB200": 12, "SOP": 512, "In-shop": 192}
TEST_CLASSES = 3


def rows() -> list[tuple[str, int]]:
    """Distinct (backbone, meta-class size) rows; CARS196 and CUB200 share theirs."""
    return [(backbone, size) for backbone in BACKBONES for size in dict.fromkeys(META_CLASS_SIZES.values())]


def selected(selection: str, backbone: str, size: int) -> bool:
    if selection == "all":
        return True
    return f"{backbone}/{size}" in selection.split(",")


def make_images(root: Path, train_classes: int, image_size: int, per_class: int) -> Path:
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png``: noise with a per-class tint."""
    rng = np.random.default_rng(0)
    for split, classes in (("train", train_classes), ("test", TEST_CLASSES)):
        for label in range(classes):
            tint = rng.integers(0, 256, 3)
            for k in range(per_class):
                pixels = (0.5 * rng.integers(0, 256, (image_size, image_size, 3)) + 0.5 * tint).astype(np.uint8)
                folder = root / split / f"{split}{label:04d}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(folder / f"{k}.png")
    return root


def run_stage(command: list[str], cwd: Path) -> tuple[int, int, float, str]:
    """Exit status, peak RSS (bytes) of that one process, seconds, and its output's tail."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        tail = output.read().decode(errors="replace")[-1500:]
    return process.returncode, usage.ru_maxrss * 1024, time.perf_counter() - start, tail


def serve_one_query(index: Path, cwd: Path, query: Path) -> tuple[int, int, float, str]:
    """Start ``reir serve``, send one upload, stop it; its peak RSS."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "reir", "serve", "--index", str(index), "--port", "0"]
    server = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = []
    for line in server.stdout:
        lines.append(line)
        found = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
        if found:
            break
    answer = "".join(lines)[-300:]
    if found:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + query.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        connection = http.client.HTTPConnection("127.0.0.1", int(found.group(1)), timeout=600)
        connection.request("POST", "/search?k=3", body=body,
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = connection.getresponse()
        answer = f"HTTP {response.status}: {response.read()[:200]!r}"
        ok = response.status == 200
    else:
        ok = False
    server.terminate()
    _, _status, usage = os.wait4(server.pid, 0)
    return (0 if ok else 1), usage.ru_maxrss * 1024, time.perf_counter() - start, answer


def same_outputs(first: Path, second: Path, name: str) -> list[str]:
    """What differs between two runs' statistics, model and database (empty: identical)."""
    differences = []
    if (first / "statistics" / f"{name}_results.csv").read_bytes() != \
            (second / "statistics" / f"{name}_results.csv").read_bytes():
        differences.append("statistics")
    for label, relative in (("weights", f"epochs/{name}_model.safetensors"),
                            ("database", f"results/{name}_data_base.safetensors")):
        one, _ = load_tensors(first / relative)
        two, _ = load_tensors(second / relative)
        if one.keys() != two.keys() or any(not torch.equal(one[k], two[k]) for k in one):
            differences.append(label)
    return differences


def size_of(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:,.0f} MiB" if path.is_file() else "-"


def run_row(backbone: str, size: int, args, work: Path) -> bool:
    """The whole path for one row; prints a line per stage; True when every stage succeeded in budget."""
    config = ModelConfig(backbone, "layer1", args.ensemble_size, size, False)
    needs = estimate(config, args.image_size, args.batch_size, "auto", "none", "loop")
    data = make_images(work / "images", size + 1, args.image_size, args.images_per_class)
    name = f"custom_uncropped_fixed_unrandom_layer1_{backbone}_{args.ensemble_size}_{size}"
    flags = ["--data_name", "custom", "--data_path", str(data), "--weights", "none", "--model_type", backbone,
             "--meta_class_size", str(size), "--ensemble_size", str(args.ensemble_size), "--image_size", str(args.image_size), "--batch_size",
             str(args.batch_size), "--num_epochs", "2", "--num_workers", "0", "--seed", "0", "--device", args.device,
             "--nmi_every", "0"]
    steps = -(-(size + 1) * args.images_per_class // args.batch_size)
    python = sys.executable
    stages = [
        ("train 2 epochs (reference)", [python, str(REPO / "train.py"), *flags, "--output_dir", str(work / "reference")]),
        (f"train, SIGKILL at step {steps + 1} (epoch 2)",
         [python, str(REPO / "tests" / "train_with_kill.py"), f"step:{steps + 1}", *flags, "--output_dir",
          str(work / "run")]),
        ("--resume auto", [python, str(REPO / "train.py"), *flags, "--output_dir", str(work / "run"),
                           "--resume", "auto"]),
    ]
    out = work / "run"
    model = out / "epochs" / f"{name}_model.safetensors"
    onnx = work / "export" / f"{name}.onnx"
    database = work / "embedded_data_base.safetensors"
    stages += [
        ("reir export --format onnx", [python, "-m", "reir", "export", "--model", str(model), "--format", "onnx",
                                       "--output", str(onnx)]),
        ("reir embed", [python, "-m", "reir", "embed", "--model", str(model), "--images", str(data / "test"),
                        "--labels_from_folders", "--output", str(database), "--batch_size", str(args.batch_size),
                        "--num_workers", "0", "--device", args.device]),
        ("reir index (Flat)", [python, "-m", "reir", "index", "--data_base", str(database), "--factory", "Flat"]),
    ]
    ok = True
    print(f"  {'stage':<36} {'peak RSS':>10} {'budget':>10} {'in budget':>9} {'seconds':>8}  files")
    for stage, command in stages:
        status, peak, seconds, tail = run_stage(command, work)
        expected = -9 if "SIGKILL" in stage else 0
        files = {"train 2 epochs (reference)": f"model {size_of(work / 'reference' / 'epochs' / f'{name}_model.safetensors')}, "
                 f"checkpoint {size_of(work / 'reference' / 'checkpoints' / f'{name}_checkpoint.safetensors')}",
                 "reir export --format onnx": f"onnx {size_of(onnx)}, onnx.data {size_of(Path(f'{onnx}.data'))}",
                 "reir embed": f"database {size_of(database)}"}.get(stage, "")
        within = peak <= needs.host_budget
        ok &= within and status == expected
        print(f"  {stage:<36} {peak / GIB:>6.2f} GiB {needs.host_budget / GIB:>6.2f} GiB {'yes' if within else 'NO':>9} "
              f"{seconds:>8.0f}  {files}")
        if status != expected:
            print(f"  exit status {status}, expected {expected}:\n{tail}")
            return False
        if stage == "--resume auto":
            differences = same_outputs(work / "reference", out, name)
            print(f"  resumed run against the reference: "
                  f"{'statistics, weights and database identical' if not differences else 'DIFFERENT ' + ', '.join(differences)}")
            ok &= not differences
            shutil.rmtree(work / "reference")  # disk: the reference's checkpoint is 3x the model
    index = next(work.glob("*.faiss"))
    status, peak, seconds, answer = serve_one_query(index, work, next((data / "test").rglob("*.png")))
    within = peak <= needs.host_budget
    ok &= within and status == 0
    print(f"  {'reir serve + one query':<36} {peak / GIB:>6.2f} GiB {needs.host_budget / GIB:>6.2f} GiB "
          f"{'yes' if within else 'NO':>9} {seconds:>8.0f}  index {size_of(index)}; {answer[:60]}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="all",
                        help="rows to run end to end: all, none, or backbone/size pairs like resnet18/12,resnet50/192")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=13)
    parser.add_argument("--ensemble_size", type=int, default=48,
                        help="branches (48: the table's; fewer for a quick check of the path)")
    parser.add_argument("--images_per_class", type=int, default=2,
                        help="generated images per class (meta-class size + 1 training classes, 3 test classes)")
    parser.add_argument("--device", default="cpu", help="training and embedding device (cpu, cuda, cuda:N)")
    parser.add_argument("--work_dir", default=None, help="where the runs' files go (default: a temporary folder)")
    args = parser.parse_args(argv)
    available = host_available()
    print(f"host memory available now: {available / GIB:.2f} GiB; {args.image_size} px, batch {args.batch_size}, "
          f"{args.ensemble_size} branches from layer1, AdamW (the scratch recipe), fp32")
    print(f"{'backbone':<16} {'meta':>4} {'parameters':>15} {'estimate':>10} {'budget':>10}  path")
    all_ok = True
    for backbone, size in rows():
        needs = estimate(ModelConfig(backbone, "layer1", args.ensemble_size, size, False), args.image_size, args.batch_size,
                         "auto", "none", "loop")
        fits = needs.total_bytes + HOST_OVERHEAD <= available
        verdict = ("runs below" if selected(args.rows, backbone, size) else "fits; not selected (--rows)") if fits \
            else f"does not fit: estimate + {HOST_OVERHEAD / GIB:.1f} GiB above the {available / GIB:.2f} GiB available"
        print(f"{backbone:<16} {size:>4} {needs.parameters:>15,} {needs.total_bytes / GIB:>6.2f} GiB "
              f"{needs.host_budget / GIB:>6.2f} GiB  {verdict}")
        if fits and selected(args.rows, backbone, size):
            work = Path(args.work_dir or tempfile.mkdtemp(prefix="reir-seed-configs-")) / f"{backbone}_{size}"
            work.mkdir(parents=True, exist_ok=True)
            try:
                all_ok &= run_row(backbone, size, args, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
