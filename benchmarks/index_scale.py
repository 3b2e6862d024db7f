"""Index build and search at scale, FAISS and Milvus Lite, and sharded embedding under torchrun.

Embeddings are shaped like a 48-branch x 12-meta-class REIR (576 dimensions), every branch
L2-normalised and the whole vector scaled by 1/sqrt(48), so inner products are mean
per-branch cosines as in REIR. They are drawn around class centres (``--per_class`` images
per class, noise ``--noise``) so that neighbours exist, as in a trained model; pure noise
would be a worst case for every approximate index. Queries are fresh draws from the same
classes. FAISS indexes are built through :class:`reir.Index`, Milvus Lite collections through
:class:`reir.retrieval.milvus.MilvusIndex` (in-process, in a temporary folder). Each index is built
and searched in a process of its own, so the peak RSS printed per row is that index's (the
vectors included); its Recall@10 is measured against exact search
(:func:`reir.retrieval.similarity.knn`). Printed per size and index: build seconds (Milvus: the
inserts and the index build), size (FAISS's serialised index; Milvus Lite's data folder), search
queries/s (all queries in one call), Recall@10 and peak RSS.

``--embed_images N`` also measures ``reir embed`` of N images in WebDataset tar shards into a
sharded database: one process against ``torchrun --nproc_per_node 2`` (a random-init
resnet18 x 48 x 12 at 64 px), images/s of each and their ratio.

    python benchmarks/index_scale.py                          # 10k and 100k images
    python benchmarks/index_scale.py --sizes 1000000          # 1M x 576: 2.3 GB of vectors per process
    python benchmarks/index_scale.py --sizes 0 --embed_images 960
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from reir.fileio import load_tensors, save_tensors
from reir.retrieval.index import Index
from reir.retrieval.index_quality import recall_against_exact
from reir.retrieval.similarity import knn

REPO = Path(__file__).resolve().parents[1]
INDEXES = ("flat", "hnsw", "ivfpq", "milvus-flat", "milvus-hnsw")

ENSEMBLE, META = 48, 12


def synthetic(count: int, per_class: int, noise: float, seed: int, centres: torch.Tensor | None = None,
              chunk: int = 100_000) -> tuple[torch.Tensor, torch.Tensor]:
    """``[count, 576]`` REIR-shaped vectors around class centres (drawn here unless given), in chunks."""
    generator = torch.Generator().manual_seed(seed)
    if centres is None:
        centres = torch.randn(max(1, count // per_class), ENSEMBLE, META, generator=generator)
    out = torch.empty(count, ENSEMBLE * META)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        classes = torch.randint(len(centres), (n,), generator=generator)
        points = centres[classes] + noise * torch.randn(n, ENSEMBLE, META, generator=generator)
        out[start:start + n] = torch.nn.functional.normalize(points, dim=-1).reshape(n, -1) / math.sqrt(ENSEMBLE)
    return out, centres


def ivf_lists(count: int) -> int:
    """About 4 sqrt(N) lists, a power of two, with at least 39 training points each (FAISS's advice)."""
    lists = 2 ** round(math.log2(4 * math.sqrt(count)))
    return max(16, min(lists, count // 39))


def plan(name: str, count: int, args) -> tuple[str, dict]:
    """The label and the build/search settings of one ``--indexes`` entry."""
    lists = ivf_lists(count)
    return {"flat": ("Flat", {}),
            "hnsw": (f"HNSW{args.hnsw_m} efSearch={args.ef_search}", {"efSearch": args.ef_search}),
            "ivfpq": (f"IVF{lists},{args.pq} nprobe={args.nprobe}", {"nprobe": args.nprobe}),
            "milvus-flat": ("Milvus Lite FLAT", {}),
            "milvus-hnsw": (f"Milvus Lite HNSW M={args.hnsw_m} ef={args.ef_search}", {"efSearch": args.ef_search}),
            }[name]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def build_and_search(name: str, count: int, args, scratch: Path) -> dict:
    """One index over the size's vectors (drawn again here, same seed), its queries searched; in a child process."""
    vectors, centres = synthetic(count, args.per_class, args.noise, seed=count)
    queries, _ = synthetic(args.queries, args.per_class, args.noise, seed=count + 1, centres=centres)
    _, tuning = plan(name, count, args)
    start = time.perf_counter()
    if name.startswith("milvus"):
        from reir.retrieval.milvus import MilvusIndex

        uri = str(scratch / f"{name}-{count}.db")
        parameters = {"M": args.hnsw_m, "efConstruction": 40} if name == "milvus-hnsw" else None
        index = MilvusIndex.build(vectors, index_type="HNSW" if name == "milvus-hnsw" else "FLAT", uri=uri,
                                  collection="bench", parameters=parameters)
        index.search(queries[:1], args.k)  # the first search waits for the index build; count it as building
    else:
        factory = {"flat": "Flat", "hnsw": f"HNSW{args.hnsw_m}", "ivfpq": f"IVF{ivf_lists(count)},{args.pq}"}[name]
        train_size = None if name != "ivfpq" else min(count, max(256 * 39, ivf_lists(count) * 64))
        index = Index.build(vectors, factory=factory, train_size=train_size)
    build = time.perf_counter() - start
    del vectors
    if tuning:
        index.tune(**tuning)
    start = time.perf_counter()
    _, ids = index.search(queries, args.k)
    seconds = time.perf_counter() - start
    if name.startswith("milvus"):
        index.close()
        size = folder_bytes(Path(uri))
    else:
        import faiss

        size = faiss.serialize_index(index.faiss_index).size
    save_tensors(scratch / f"{name}-{count}.ids.safetensors", {"ids": ids}, {})
    return {"build_s": build, "bytes": size, "qps": len(queries) / seconds,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_size(count: int, args, scratch: Path):
    """Rows of one size: exact search here, then each index in a child process."""
    vectors, centres = synthetic(count, args.per_class, args.noise, seed=count)
    queries, _ = synthetic(args.queries, args.per_class, args.noise, seed=count + 1, centres=centres)
    start = time.perf_counter()
    _, exact_ids = knn(queries, vectors, args.k)
    exact_seconds = time.perf_counter() - start
    exact = {"index": "exact knn (reir.retrieval.similarity)", "build_s": 0.0, "bytes": vectors.numel() * 4,
             "qps": len(queries) / exact_seconds, "recall": 1.0,
             "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    del vectors
    yield exact
    for name in args.indexes.split(","):
        child = subprocess.run([sys.executable, __file__, "--child", name, "--child_size", str(count),
                                "--scratch", str(scratch), *args.passed], capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"{name} at {count} failed:\n{child.stderr[-3000:]}")
        row = json.loads(child.stdout.strip().splitlines()[-1])
        ids = load_tensors(scratch / f"{name}-{count}.ids.safetensors")[0]["ids"]
        yield {**row, "index": plan(name, count, args)[0], "recall": recall_against_exact(ids, exact_ids)}


def write_shards(folder: Path, count: int, size: int, per_tar: int) -> str:
    """``count`` random ``size`` px PNG images in WebDataset tar shards of ``per_tar``; returns their glob."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for first in range(0, count, per_tar):
        with tarfile.open(folder / f"{first // per_tar:06d}.tar", "w") as tar:
            for i in range(first, min(first + per_tar, count)):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
                member = tarfile.TarInfo(f"{i:08d}.png")
                member.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(member, buffer)
    return str(folder / "*.tar")


def embed_throughput(args, scratch: Path) -> None:
    """Sharded ``reir embed`` of tar shards: one process vs torchrun with 2 processes, same images."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from serve_load import synthetic_setup

    from reir.retrieval.database import load_database

    model_file, _ = synthetic_setup(scratch, 48, args.embed_size, 1)
    shards = write_shards(scratch, args.embed_images, args.embed_size, args.embed_per_tar)
    common = ["-m", "reir", "embed", "--model", str(model_file), "--images", shards, "--shard_output",
              "--batch_size", "32", "--num_workers", "0", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = {"one process": ([sys.executable, *common, "--output", str(scratch / "one")], env),
            "torchrun, 2 processes": ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                       "--standalone", *common, "--output", str(scratch / "two")],
                                      {**env, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // 2))})}
    rates: dict[str, list[float]] = {label: [] for label in runs}
    for attempt in range(args.embed_repeats):  # interleaved, so a change in the machine's load hits both
        for label, (command, environment) in runs.items():
            start = time.perf_counter()
            done = subprocess.run(command, env=environment, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"reir embed ({label}) failed:\n{done.stderr[-3000:]}")
            rates[label].append(args.embed_images / seconds)
            print(f"reir embed, {label}, run {attempt + 1}: {args.embed_images} images in {seconds:.1f} s = "
                  f"{rates[label][-1]:.1f} images/s (process start and model load included)", flush=True)
    best = {label: max(r) for label, r in rates.items()}
    print(f"torchrun 2 processes / one process, best of {args.embed_repeats}: "
          f"{best['torchrun, 2 processes'] / best['one process']:.2f}x")
    one, two = load_database(scratch / "one"), load_database(scratch / "two")
    difference = (one.features["test"] - two.features["test"]).abs().max().item()
    print(f"same database from both: paths {'equal' if one.paths('test') == two.paths('test') else 'DIFFER'}, "
          f"largest feature difference {difference:.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated database sizes (1000000 for 1M; "
                        "0 for none)")
    parser.add_argument("--indexes", default=",".join(INDEXES), help=f"comma-separated, of {', '.join(INDEXES)}")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--per_class", type=int, default=50, help="images per synthetic class")
    parser.add_argument("--noise", type=float, default=0.6, help="spread around the class centre (per coordinate)")
    parser.add_argument("--hnsw_m", type=int, default=32)
    parser.add_argument("--ef_search", type=int, default=64)
    parser.add_argument("--pq", default="PQ96x4fs", help="PQ codes: PQ96x4fs = 96 4-bit codes, 48 bytes per vector")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="FAISS/torch threads (0: library default)")
    parser.add_argument("--embed_images", type=int, default=0, help="also time reir embed of this many images")
    parser.add_argument("--embed_size", type=int, default=64, help="their side in pixels")
    parser.add_argument("--embed_per_tar", type=int, default=64, help="images per tar shard")
    parser.add_argument("--embed_repeats", type=int, default=2, help="runs of each, interleaved")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child_size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.passed = list(argv if argv is not None else sys.argv[1:])
    unknown = [n for n in args.indexes.split(",") if n not in INDEXES]
    if unknown:
        parser.error(f"--indexes {unknown[0]} is not one of {', '.join(INDEXES)}")
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(build_and_search(args.child, args.child_size, args, Path(args.scratch))))
        return 0
    print(f"synthetic REIR embeddings: {ENSEMBLE} branches x {META} = {ENSEMBLE * META} dims, "
          f"{args.per_class} per class, noise {args.noise}; {args.queries} queries, Recall@{args.k} vs exact; "
          f"{torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory(prefix="reir-index-scale-") as scratch:
        sizes = [int(s) for s in args.sizes.split(",") if int(s) > 0]
        if sizes:
            print(f"{'N':>9}  {'index':<36} {'build s':>8} {'MiB':>9} {'queries/s':>10} "
                  f"{'recall@' + str(args.k):>9} {'peak RSS GiB':>12}", flush=True)
        for count in sizes:
            for row in run_size(count, args, Path(scratch)):
                print(f"{count:>9}  {row['index']:<36} {row['build_s']:>8.1f} {row['bytes'] / 2**20:>9.1f} "
                      f"{row['qps']:>10,.0f} {100 * row['recall']:>8.2f}% {row['peak_rss'] / 2**30:>12.2f}",
                      flush=True)
        if args.embed_images:
            embed_throughput(args, Path(scratch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
