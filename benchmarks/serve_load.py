"""Load on ``reir serve`` on 127.0.0.1 only, bounded in clients and time: throughput, and hostile neighbours.

One run, one server, three measurements:

1. ``reir embed`` (a subprocess, same model, ``--batch_size`` as the server's batches, images
   decoded in its own process as the server does: ``--num_workers 0``) on ``--embed_images`` PNGs:
   images/s from its first image to its exit.
2. Throughput: ``--clients`` (16) normal clients, each sending one 64x64 PNG search after another
   for ``--seconds``: requests/s, p50/p99 latency, errors; and requests/s / embed images/s.
3. Hostile neighbours: ``--normal`` normal clients beside 16 slow uploaders (each body trickled over
   ``--trickle_seconds``) and 16 greedy clients (each sending a real PNG of the maximum body size)
   for ``--seconds``: the normal clients' requests/s, p50/p99 and errors, the other clients'
   answers, and the server's RSS: idle vs the peak sampled during the phase.

Then two runs of abuse (``--abuse_only`` runs just these):

4. Slow bodies: 64 connections each declaring a 100 KB body and sending 10 bytes every 2 s, beside
   ``--normal`` normal clients, for ``--seconds``: the normal clients' errors (the server takes a
   request slot only once a body has arrived and cuts trickles off under its minimum rate), the
   trickling connections' answers and how long the last one was held.
5. Large uploads: 64 concurrent uploads of a 6000 x 6000 (36 MP) blank PNG: the answers, and the
   server's RSS over idle at its peak and 3 s after the last answer (decoded pixels share one budget).

Without ``--index``, it serves a synthetic setup made here: a randomly initialised REIR
(resnet18, ``--ensemble`` branches x 12 meta classes at ``--image_size`` px; the network's
cost does not depend on its weights) and a Flat index of ``--images`` random embeddings of
its shape. With ``--index`` (and ``--model`` unless the index records one), it loads yours.

    nice -n 10 python benchmarks/serve_load.py
    python benchmarks/serve_load.py --index demo_output/all.faiss --images 0
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SLOW_CLIENTS = 16
GREEDY_CLIENTS = 16
MAX_BODY_MB = 20


def synthetic_setup(folder: Path, ensemble: int, image_size: int, images: int) -> tuple[Path, Path]:
    """A random-init model file and a Flat index of random embeddings of its shape."""
    import torch

    from reir.model.files import save_model
    from reir.model.network import ModelConfig, create_model
    from reir.retrieval.index import Index

    config = ModelConfig("resnet18", "layer1", ensemble, 12)
    model_file = folder / "synthetic_model.safetensors"
    save_model(model_file, create_model(config, weights="none").state_dict(), config, {"save_name": "synthetic"},
               {"image_size": image_size, "mean": [0.5] * 3, "std": [0.25] * 3})
    picture = folder / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(picture)
    features = torch.nn.functional.normalize(torch.randn(images, ensemble, 12, generator=torch.Generator().manual_seed(0)), dim=-1)
    index = Index.build(features, [str(picture)] * images, [str(i % 100) for i in range(images)],
                        info={"model_file": str(model_file)})
    index_file = folder / "synthetic.faiss"
    index.save(index_file)
    return model_file, index_file


def png(rng: np.random.Generator, side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def multipart(image: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def largest_png_within(limit: int, rng: np.random.Generator) -> bytes:
    """A noise PNG as large as fits in a ``limit``-byte multipart body (noise hardly compresses)."""
    side = int((limit / 3) ** 0.5)
    while True:
        data = png(rng, side)
        if len(multipart(data)[0]) <= limit:
            return data
        side = int(side * 0.98)


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    statuses: dict[int | str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, started: float, status, payload: bytes) -> None:
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 200 and b'"results"' in payload:
                self.latencies.append(time.perf_counter() - started)
            else:
                self.errors.append(f"{status}: {payload[:120]!r}")

    def line(self, elapsed: float) -> str:
        text = f"{len(self.latencies)} ok, {len(self.errors)} errors; {len(self.latencies) / elapsed:.2f} requests/s"
        if self.latencies:
            p50, p99 = np.percentile(np.array(self.latencies) * 1000, [50, 99])
            text += f"; latency p50 {p50:,.0f} ms, p99 {p99:,.0f} ms"
        return text


def client(port: int, bodies, stop_at: float, tally: Tally, k: int) -> None:
    """One normal client: a search, then the next, on one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    n = 0
    while time.perf_counter() < stop_at:
        body, content_type = bodies[n % len(bodies)]
        n += 1
        started = time.perf_counter()
        try:
            connection.request("POST", f"/search?k={k}", body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            tally.add(started, response.status, response.read())
        except (OSError, http.client.HTTPException) as exc:
            tally.add(started, type(exc).__name__, b"")
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.close()


def slow_uploader(port: int, body: bytes, content_type: str, stop_at: float, trickle_s: float, tally: Tally) -> None:
    """Sends each upload in 32 pieces spread over ``trickle_s`` seconds."""
    pieces = [body[i:i + -(-len(body) // 32)] for i in range(0, len(body), -(-len(body) // 32))]
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

        def trickle(connection=connection):
            connection.putrequest("POST", "/search?k=10")
            connection.putheader("Content-Type", content_type)
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders()
            for piece in pieces:
                connection.send(piece)
                time.sleep(trickle_s / len(pieces))

        tally_answer(tally, started, connection, trickle)


def trickler(port: int, stop_at: float, answers: dict, held: list[float], lock: threading.Lock) -> None:
    """Declares a 100 KB body and sends 10 bytes every 2 s until the server answers (or ``stop_at``)."""
    import select
    import socket

    started = time.perf_counter()
    answer = "still sending at the end"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 100000\r\n\r\n")
        try:
            while time.perf_counter() < stop_at:
                sock.sendall(b"0123456789")
                readable, _, _ = select.select([sock], [], [], 2.0)
                if readable:
                    head = sock.recv(200)
                    answer = head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/") else "closed"
                    break
        except OSError as exc:
            answer = type(exc).__name__
    with lock:
        answers[answer] = answers.get(answer, 0) + 1
        held[0] = max(held[0], time.perf_counter() - started)


def large_upload(port: int, body: bytes, tally: Tally) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    tally_answer(tally, time.perf_counter(), connection,
                 lambda: connection.request("POST", "/search?k=10", body=body, headers={"Content-Type": "image/png"}))


def tally_answer(tally: Tally, started: float, connection: http.client.HTTPConnection, send) -> None:
    """Sends a request with ``send()`` and tallies its answer's status, or the error that came instead."""
    try:
        send()
        response = connection.getresponse()
        tally.add(started, response.status, response.read())
    except (OSError, http.client.HTTPException) as exc:
        tally.add(started, type(exc).__name__, b"")
    finally:
        connection.close()


def abuse_runs(server_pid: int, port: int, bodies, seconds: float, normal_clients: int, k: int) -> bool:
    """Runs 4 and 5 of the module's description; prints their lines, ``True`` when the normal clients had no error."""
    normal, answers, held, lock = Tally(), {}, [0.0], threading.Lock()
    stop_at = time.perf_counter() + seconds
    elapsed = run_clients(
        [threading.Thread(target=trickler, args=(port, stop_at, answers, held, lock)) for _ in range(64)]
        + [threading.Thread(target=client, args=(port, bodies, stop_at, normal, k)) for _ in range(normal_clients)])
    print(f"slow bodies: 64 connections sending 10 bytes every 2 s beside {normal_clients} normal clients for "
          f"{elapsed:.1f} s:")
    print(f"  normal clients: {normal.line(elapsed)}")
    print(f"  trickling connections: answers {answers}; the longest held {held[0]:.1f} s")
    buffer = io.BytesIO()
    Image.new("RGB", (6000, 6000)).save(buffer, format="PNG")
    large = buffer.getvalue()
    time.sleep(1)
    idle_kib = rss_kib(server_pid)
    uploads, stop, peak = Tally(), threading.Event(), [idle_kib]
    sampler = threading.Thread(target=peak_rss_sampler, args=(server_pid, stop, peak))
    sampler.start()
    upload_elapsed = run_clients([threading.Thread(target=large_upload, args=(port, large, uploads)) for _ in range(64)])
    time.sleep(3)
    stop.set()
    sampler.join()
    after_kib = rss_kib(server_pid)
    print(f"64 concurrent uploads of a 6000x6000 (36 MP) blank PNG ({len(large) / 1024:.0f} KiB) in "
          f"{upload_elapsed:.1f} s: answers {uploads.statuses}")
    print(f"  server RSS idle {idle_kib / 1024:.0f} MiB, peak {peak[0] / 1024:.0f} MiB "
          f"(+{(peak[0] - idle_kib) / 1024:.0f} MiB), 3 s after {after_kib / 1024:.0f} MiB "
          f"(+{(after_kib - idle_kib) / 1024:.0f} MiB)")
    for error in normal.errors[:5]:
        print(f"  normal client error: {error}")
    return not normal.errors


def peak_rss_sampler(pid: int, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_kib(pid))
        time.sleep(0.02)


def rss_kib(pid: int) -> int:
    return int(re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))


def embed_rate(model_args: list[str], folder: Path, count: int, batch_size: int, image_size: int) -> tuple[float, int]:
    """``reir embed``'s images/s from its first image (its 'Embedding' line, after the model loads) to its exit."""
    rng = np.random.default_rng(2)
    images = folder / "embed_images"
    images.mkdir()
    for n in range(count):
        Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(images / f"{n:05d}.png")
    command = [sys.executable, "-m", "reir", "embed", *model_args, "--images", str(images), "--batch_size",
               str(batch_size), "--num_workers", "0", "--output", str(folder / "embedded_data_base.safetensors")]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    started = None
    for line in process.stdout:
        if line.startswith("Embedding") and started is None:
            started = time.perf_counter()
    if process.wait() != 0 or started is None:
        raise SystemExit("reir embed failed")
    return count / (time.perf_counter() - started), count


def run_clients(targets: list[threading.Thread]) -> float:
    started = time.perf_counter()
    for thread in targets:
        thread.start()
    for thread in targets:
        thread.join()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default=None, help="an index from reir index (default: a synthetic one)")
    parser.add_argument("--model", default=None, help="model file (default: the one the index records)")
    parser.add_argument("--clients", type=int, default=16, help="normal clients of the throughput phase")
    parser.add_argument("--normal", type=int, default=4, help="normal clients beside the slow and greedy ones")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--trickle_seconds", type=float, default=5.0, help="time a slow uploader takes per body")
    parser.add_argument("--batch_size", type=int, default=16, help="server batch and reir embed --batch_size")
    parser.add_argument("--embed_images", type=int, default=256, help="images reir embed is timed on")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--images", type=int, default=100_000, help="synthetic index size")
    parser.add_argument("--ensemble", type=int, default=48, help="synthetic model branches")
    parser.add_argument("--image_size", type=int, default=64, help="synthetic model input size")
    parser.add_argument("--abuse_only", action="store_true", help="run only the slow-body and large-upload runs")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 64 or not 1 <= args.normal <= 64 or not 0 < args.seconds <= 300 \
            or not 0 < args.trickle_seconds <= 25 or not 1 <= args.embed_images <= 5000:
        parser.error("keep --clients/--normal within 1-64, --seconds within 300, --trickle_seconds within 25 "
                     "(the server's --upload_seconds is 30) and --embed_images within 5000")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if args.index:
            index_file, model_args = Path(args.index), (["--model", args.model] if args.model else [])
            described = f"index {index_file}"
        else:
            model_file, index_file = synthetic_setup(scratch, args.ensemble, args.image_size, args.images)
            model_args = ["--model", str(model_file)]
            described = (f"synthetic: random-init resnet18 x {args.ensemble} branches x 12 at {args.image_size} px, "
                         f"Flat index of {args.images:,} random embeddings")
        embed_model_args = model_args or ["--model", _recorded_model(index_file)]
        command = [sys.executable, "-m", "reir", "serve", "--index", str(index_file), *model_args,
                   "--host", "127.0.0.1", "--port", "0", "--k", str(args.k), "--batch_size", str(args.batch_size),
                   "--max_body_mb", str(MAX_BODY_MB)]
        server = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            line = server.stdout.readline()
            found = re.search(r"Serving (\d+) images .* at http://127\.0\.0\.1:(\d+)/", line)
            if not found:
                print(f"reir serve did not start: {line}{server.stdout.read()}", file=sys.stderr)
                return 1
            port = int(found.group(2))
            rng = np.random.default_rng(1)
            bodies = [multipart(png(rng, 64)) for _ in range(16)]
            client(port, bodies, time.perf_counter() + 3, Tally(), args.k)  # warm-up
            if args.abuse_only:
                print(f"{described}; {found.group(1)} images")
                return 0 if abuse_runs(server.pid, port, bodies, args.seconds, args.normal, args.k) else 1
            embed_per_s, embedded = embed_rate(embed_model_args, scratch, args.embed_images, args.batch_size,
                                               64 if args.index else args.image_size)

            throughput = Tally()
            stop_at = time.perf_counter() + args.seconds
            elapsed = run_clients([threading.Thread(target=client, args=(port, bodies, stop_at, throughput, args.k))
                                   for _ in range(args.clients)])

            greedy_body = multipart(largest_png_within(MAX_BODY_MB * 2**20, rng))
            slow_body = multipart(png(rng, 64))
            idle_kib = rss_kib(server.pid)
            normal, slow, greedy = Tally(), Tally(), Tally()
            stop, peak = threading.Event(), [idle_kib]
            sampler = threading.Thread(target=peak_rss_sampler, args=(server.pid, stop, peak))
            sampler.start()
            stop_at = time.perf_counter() + args.seconds
            hostile_elapsed = run_clients(
                [threading.Thread(target=client, args=(port, bodies, stop_at, normal, args.k)) for _ in range(args.normal)]
                + [threading.Thread(target=slow_uploader, args=(port, *slow_body, stop_at, args.trickle_seconds, slow))
                   for _ in range(SLOW_CLIENTS)]
                + [threading.Thread(target=client, args=(port, [greedy_body], stop_at, greedy, args.k))
                   for _ in range(GREEDY_CLIENTS)])
            stop.set()
            sampler.join()
            abused_ok = abuse_runs(server.pid, port, bodies, args.seconds, args.normal, args.k)
        finally:
            server.terminate()
            server.wait(timeout=30)
        size = index_file.stat().st_size
        print(f"{described}; {found.group(1)} images, index file {size / 2**20:.1f} MiB; server batches up to "
              f"{args.batch_size}")
        print(f"reir embed --batch_size {args.batch_size}: {embedded} images at {embed_per_s:.2f} images/s")
        print(f"throughput, {args.clients} concurrent clients for {elapsed:.1f} s (64x64 PNG, top-{args.k}): "
              f"{throughput.line(elapsed)}")
        print(f"  requests/s / reir embed images/s = {len(throughput.latencies) / elapsed / embed_per_s:.2f}")
        print(f"beside {SLOW_CLIENTS} slow uploaders ({args.trickle_seconds:g} s per body) and {GREEDY_CLIENTS} greedy "
              f"clients ({len(greedy_body[0]) / 2**20:.1f} MiB bodies) for {hostile_elapsed:.1f} s:")
        print(f"  {args.normal} normal clients: {normal.line(hostile_elapsed)}")
        print(f"  slow uploaders: answers {slow.statuses}; greedy clients: answers {greedy.statuses}")
        print(f"  server RSS idle {idle_kib / 1024:.0f} MiB, peak {peak[0] / 1024:.0f} MiB "
              f"(+{(peak[0] - idle_kib) / 1024:.0f} MiB)")
        for error in (throughput.errors + normal.errors)[:5]:
            print(f"  normal client error: {error}")
        return 1 if throughput.errors or normal.errors or not throughput.latencies or not abused_ok else 0


def _recorded_model(index_file: Path) -> str:
    from reir.retrieval.index import Index

    model = Index.load(index_file).info.get("model_file")
    if not model:
        raise SystemExit("the index records no model file; pass --model")
    return model


if __name__ == "__main__":
    sys.exit(main())
