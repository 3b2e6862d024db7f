"""Load on ``reir serve``: a bounded number of concurrent searches, for a bounded time, on 127.0.0.1 only.

Starts ``reir serve`` on a free port of 127.0.0.1, sends ``--concurrency`` streams of
``POST /search`` uploads (small PNGs) for ``--seconds``, and prints requests/s, p50/p99
latency, the error count (it must be 0; the exit code is 1 otherwise) and the index size.

Without ``--index``, it serves a synthetic setup made here: a randomly initialised REIR
(resnet18, ``--ensemble`` branches x 12 meta classes at ``--image_size`` px; the network's
cost does not depend on its weights) and a Flat index of ``--images`` random embeddings of
its shape. With ``--index`` (and ``--model`` unless the index records one), it loads yours.

    python benchmarks/serve_load.py                       # synthetic, 4 streams, 20 s
    python benchmarks/serve_load.py --index demo_output/results/<name>_data_base.Flat.faiss
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def synthetic_setup(folder: Path, ensemble: int, image_size: int, images: int) -> tuple[Path, Path]:
    """A random-init model file and a Flat index of random embeddings of its shape."""
    import torch

    from reir.retrieval.index import Index
    from reir.fileio import save_tensors
    from reir.model.network import ModelConfig, create_model

    config = ModelConfig("resnet18", "layer1", ensemble, 12)
    model_file = folder / "synthetic_model.safetensors"
    save_tensors(model_file, create_model(config, weights="none").state_dict(),
                 {"format": "reir-model/1", "config": {"save_name": "synthetic"}, "model": asdict(config),
                  "info": {"image_size": image_size, "mean": [0.5] * 3, "std": [0.25] * 3}})
    picture = folder / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(picture)
    features = torch.nn.functional.normalize(torch.randn(images, ensemble, 12, generator=torch.Generator().manual_seed(0)), dim=-1)
    index = Index.build(features, [str(picture)] * images, [str(i % 100) for i in range(images)],
                        info={"model_file": str(model_file)})
    index_file = folder / "synthetic.faiss"
    index.save(index_file)
    return model_file, index_file


def upload_bodies(count: int, size: int) -> list[tuple[bytes, str]]:
    rng = np.random.default_rng(1)
    bodies = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + buffer.getvalue() + f"\r\n--{boundary}--\r\n".encode()
        bodies.append((body, f"multipart/form-data; boundary={boundary}"))
    return bodies


def stream(port: int, bodies, k: int, stop_at: float, latencies: list[float], errors: list[str], lock) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    n = 0
    while time.perf_counter() < stop_at:
        body, content_type = bodies[n % len(bodies)]
        n += 1
        start = time.perf_counter()
        try:
            connection.request("POST", f"/search?k={k}", body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            payload = response.read()
            ok = response.status == 200 and b'"results"' in payload
            error = None if ok else f"HTTP {response.status}: {payload[:120]!r}"
        except (OSError, http.client.HTTPException) as exc:
            error = f"{type(exc).__name__}: {exc}"
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        with lock:
            if error:
                errors.append(error)
            else:
                latencies.append(time.perf_counter() - start)
    connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default=None, help="an index from reir index (default: a synthetic one)")
    parser.add_argument("--model", default=None, help="model file (default: the one the index records)")
    parser.add_argument("--concurrency", type=int, default=4, help="simultaneous request streams")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to send requests")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--images", type=int, default=100_000, help="synthetic index size")
    parser.add_argument("--ensemble", type=int, default=48, help="synthetic model branches")
    parser.add_argument("--image_size", type=int, default=64, help="synthetic model input size")
    args = parser.parse_args(argv)
    if not 1 <= args.concurrency <= 64 or not 0 < args.seconds <= 600:
        parser.error("keep --concurrency within 1-64 and --seconds within 600")
    with tempfile.TemporaryDirectory() as scratch:
        if args.index:
            index_file, model_args = Path(args.index), (["--model", args.model] if args.model else [])
            described = f"index {index_file}"
        else:
            model_file, index_file = synthetic_setup(Path(scratch), args.ensemble, args.image_size, args.images)
            model_args = ["--model", str(model_file)]
            described = (f"synthetic: random-init resnet18 x {args.ensemble} branches x 12 at {args.image_size} px, "
                         f"Flat index of {args.images:,} random embeddings")
        command = [sys.executable, "-m", "reir", "serve", "--index", str(index_file), *model_args,
                   "--host", "127.0.0.1", "--port", "0", "--k", str(args.k)]
        server = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            line = server.stdout.readline()
            found = re.search(r"Serving (\d+) images .* at http://127\.0\.0\.1:(\d+)/", line)
            if not found:
                print(f"reir serve did not start: {line}{server.stdout.read()}", file=sys.stderr)
                return 1
            port = int(found.group(2))
            bodies = upload_bodies(16, 64)
            stream(port, bodies, args.k, time.perf_counter() + 3, [], [], threading.Lock())  # warm-up
            latencies, errors, lock = [], [], threading.Lock()
            start = time.perf_counter()
            threads = [threading.Thread(target=stream, args=(port, bodies, args.k, start + args.seconds,
                                                             latencies, errors, lock))
                       for _ in range(args.concurrency)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - start
        finally:
            server.terminate()
            server.wait(timeout=30)
        size = index_file.stat().st_size
        print(f"{described}; {found.group(1)} images, index file {size / 2**20:.1f} MiB")
        print(f"{args.concurrency} concurrent streams for {elapsed:.1f} s, top-{args.k} per 64x64 PNG upload")
        if latencies:
            p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
            print(f"requests: {len(latencies)} ok, {len(errors)} errors; {len(latencies) / elapsed:.2f} requests/s; "
                  f"latency p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        else:
            print(f"requests: 0 ok, {len(errors)} errors")
        for error in errors[:5]:
            print(f"  error: {error}")
        return 1 if errors or not latencies else 0


if __name__ == "__main__":
    sys.exit(main())
