"""Index build and search at scale: Flat (exact), HNSW and IVF-PQ on synthetic REIR-shaped embeddings.

Embeddings are shaped like a 48-branch x 12-meta-class REIR (576 dimensions), every branch
L2-normalised and the whole vector scaled by 1/sqrt(48), so inner products are mean
per-branch cosines as in REIR. They are drawn around class centres (``--per_class`` images
per class, noise ``--noise``) so that neighbours exist, as in a trained model; pure noise
would be a worst case for every approximate index. Queries are fresh draws from the same
classes. Every index is built through :class:`reir.Index` and its Recall@10 measured
against exact search (:func:`reir.retrieval.similarity.knn`). Printed per size and index: build seconds,
index bytes (FAISS's serialised size), search queries/s (all queries in one call) and
Recall@10; the process's peak RSS at the end.

    python benchmarks/index_scale.py                     # 10k and 100k images: a few minutes on 2 cores
    python benchmarks/index_scale.py --sizes 1000000     # 1M x 576 (2.3 GB of vectors; ~10-20 min here)
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reir.cli.index import recall_against_exact  # noqa: E402
from reir.retrieval.index import Index# noqa: E402
from reir.retrieval.similarity import knn  # noqa: E402

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


def measure(name: str, index: Index, queries: torch.Tensor, exact_ids: torch.Tensor, build_seconds: float,
            k: int) -> dict:
    import faiss

    start = time.perf_counter()
    _, ids = index.search(queries, k)
    seconds = time.perf_counter() - start
    return {"index": name, "build_s": build_seconds, "bytes": faiss.serialize_index(index.faiss_index).size,
            "qps": len(queries) / seconds, "recall": recall_against_exact(ids, exact_ids)}


def run_size(count: int, args) -> list[dict]:
    vectors, centres = synthetic(count, args.per_class, args.noise, seed=count)
    queries, _ = synthetic(args.queries, args.per_class, args.noise, seed=count + 1, centres=centres)
    start = time.perf_counter()
    exact_scores, exact_ids = knn(queries, vectors, args.k)
    exact_seconds = time.perf_counter() - start
    rows = []
    lists = ivf_lists(count)
    plans = [("Flat", {}), (f"HNSW{args.hnsw_m}", {"efSearch": args.ef_search}),
             (f"IVF{lists},{args.pq}", {"nprobe": args.nprobe})]
    for factory, tuning in plans:
        start = time.perf_counter()
        train_size = None if factory == "Flat" else min(count, max(256 * 39, lists * 64))
        index = Index.build(vectors, factory=factory, train_size=train_size)
        build = time.perf_counter() - start
        if tuning:
            index.tune(**tuning)
        label = factory + "".join(f" {k}={v}" for k, v in tuning.items())
        rows.append(measure(label, index, queries, exact_ids, build, args.k))
        del index
    rows.insert(0, {"index": "exact knn (reir.retrieval.similarity)", "build_s": 0.0, "bytes": vectors.numel() * 4,
                    "qps": len(queries) / exact_seconds, "recall": 1.0})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated database sizes (1000000 for 1M)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--per_class", type=int, default=50, help="images per synthetic class")
    parser.add_argument("--noise", type=float, default=0.6, help="spread around the class centre (per coordinate)")
    parser.add_argument("--hnsw_m", type=int, default=32)
    parser.add_argument("--ef_search", type=int, default=64)
    parser.add_argument("--pq", default="PQ96x4fs", help="PQ codes: PQ96x4fs = 96 4-bit codes, 48 bytes per vector")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="FAISS/torch threads (0: library default)")
    args = parser.parse_args(argv)
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    print(f"synthetic REIR embeddings: {ENSEMBLE} branches x {META} = {ENSEMBLE * META} dims, "
          f"{args.per_class} per class, noise {args.noise}; {args.queries} queries, Recall@{args.k} vs exact; "
          f"{torch.get_num_threads()} threads")
    print(f"{'N':>9}  {'index':<34} {'build s':>8} {'MiB':>9} {'queries/s':>10} {'recall@' + str(args.k):>9}")
    for count in (int(s) for s in args.sizes.split(",")):
        for row in run_size(count, args):
            print(f"{count:>9}  {row['index']:<34} {row['build_s']:>8.1f} {row['bytes'] / 2**20:>9.1f} "
                  f"{row['qps']:>10,.0f} {100 * row['recall']:>8.2f}%", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS of this process: {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
