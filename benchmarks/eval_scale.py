"""Exact evaluation at SOP scale: our metrics vs a bare FAISS IndexFlatIP search vs the GEMMs alone.

Each part runs in a fresh subprocess so its peak RSS is its own, ``--repeats`` times
(interleaved), and the median time is compared. The embeddings are REIR-shaped
(``ensemble x meta`` unit vectors per branch, flattened and scaled) and clustered by
SOP-like classes of 2-12 images. K = max(largest recall, largest class size): the K
a list-based exact Recall@K + MAP@R evaluation needs. FAISS searches that K (+1, for
the query itself); our evaluation computes every retrieval metric without such a
list. The ``gemm`` part runs only the tile products ours runs (the upper triangle of
the score matrix, in bf16 where the CPU has native bf16, else fp32), the floor of our time.
The first ``ours`` run of a fresh checkout includes compiling the scan (about 5 s, cached).

    python benchmarks/eval_scale.py                 # N=60,000, D=576 (48 x 12): SOP's test set
    python benchmarks/eval_scale.py --n 8000 --naive
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def make_data(n: int, dim: int, ensemble: int, seed: int, noise: float = 4.0):
    """Embeddings filled block by block so generating them adds nothing to the peak."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 13, (n // 2 + 1,), generator=generator)
    labels = torch.repeat_interleave(torch.arange(len(sizes)), sizes)[:n]
    labels = labels[torch.randperm(n, generator=generator)]
    meta = dim // ensemble
    features = torch.empty(n, ensemble * meta)
    for start in range(0, n, 1024):  # small blocks: their temporaries stay out of the peak
        rows = labels[start:start + 1024]
        centre = torch.stack([torch.randn(ensemble, meta, generator=torch.Generator().manual_seed(int(c) + 1))
                              for c in rows])
        block = centre + noise * torch.randn(len(rows), ensemble, meta, generator=generator)
        features[start:start + len(rows)] = torch.nn.functional.normalize(block, dim=-1).reshape(len(rows), -1)
        del centre, block
    features /= ensemble ** 0.5
    return features, labels


def run_part(args) -> dict:
    import torch

    from reir.retrieval.clustering import nmi
    from reir.retrieval.metrics import retrieval_metrics
    from reir.retrieval.ranking import TILE, native_bf16, relevant_counts

    baseline = current_rss_bytes()
    features, labels = make_data(args.n, args.dim, args.ensemble, args.seed, args.noise)
    k = max(args.recall, int(relevant_counts(labels, labels, True).max()))
    result = {"part": args.part, "k": k, "baseline_rss": baseline, "classes": int(labels.unique().numel())}
    start = time.perf_counter()
    if args.part == "ours":
        result["metrics"] = retrieval_metrics(features, labels, (1, 10, 100, args.recall))
    elif args.part == "gemm":  # the tile products alone, in the precision ours uses on this CPU
        dtype = torch.bfloat16 if native_bf16() else torch.float32
        blocks = [block.to(dtype) for block in features.split(TILE)]
        tile = torch.empty(TILE, TILE, dtype=dtype)
        result["tile_dtype"] = str(dtype)
        start = time.perf_counter()
        for i, rows in enumerate(blocks):
            for columns in blocks[i:]:
                torch.mm(rows, columns.T, out=tile[:len(rows), :len(columns)])
    elif args.part == "nmi":
        result["metrics"] = {"nmi": nmi(features, labels)}
    elif args.part == "faiss":
        import faiss

        index = faiss.IndexFlatIP(features.shape[1])
        index.add(features.numpy())
        _scores, indices = index.search(features.numpy(), k + 1)  # the query finds itself first
        result["checksum"] = int(indices[:, 1].sum())
    else:  # naive: the full N x N matrix, sorted
        order = (features @ features.T).fill_diagonal_(-float("inf")).argsort(dim=1, descending=True)[:, :k]
        result["checksum"] = int(order[:, 0].sum())
    result["seconds"] = time.perf_counter() - start
    result["peak_rss"] = peak_rss_bytes()
    return result


def measure(args, part: str) -> dict:
    command = [sys.executable, __file__, "--part", part, "--n", str(args.n), "--dim", str(args.dim),
               "--ensemble", str(args.ensemble), "--recall", str(args.recall), "--seed", str(args.seed),
               "--noise", str(args.noise)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"error: part {part} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=60_000, help="images (SOP test: 60,502)")
    parser.add_argument("--dim", type=int, default=576, help="ensemble x meta (48 x 12 = 576)")
    parser.add_argument("--ensemble", type=int, default=48)
    parser.add_argument("--recall", type=int, default=1000, help="largest Recall@K (SOP reports R@1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=4.0,
                        help="spread around the class centres: 4 puts R@1 near 2%% (hard), 2.5 near 58%% (SOP-like)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each part; the median time counts")
    parser.add_argument("--naive", action="store_true", help="also time a full-matrix argsort (N <= 10,000)")
    parser.add_argument("--nmi", action="store_true", help="also time NMI (k-means; minutes at full size)")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dim % args.ensemble:
        parser.error("--dim must be a multiple of --ensemble")
    if args.part:
        print(json.dumps(run_part(args)))
        return 0
    parts = ["ours", "faiss", "gemm"] + (["naive"] if args.naive and args.n <= 10_000 else []) + (
        ["nmi"] if args.nmi else [])
    runs: dict[str, list[dict]] = {part: [] for part in parts}
    for _ in range(args.repeats):  # interleaved, so that load changes hit every part alike
        for part in parts:
            runs[part].append(measure(args, part))
    results = {part: {**done[0], "seconds": statistics.median(r["seconds"] for r in done),
                      "peak_rss": max(r["peak_rss"] for r in done),
                      "baseline_rss": min(r["baseline_rss"] for r in done), "all": [r["seconds"] for r in done]}
               for part, done in runs.items()}
    ours, faiss_result = results["ours"], results["faiss"]
    k = ours["k"]
    needed = args.n * args.dim * 4 + args.n * k * 8
    mib = 1 << 20
    print(f"N={args.n} D={args.dim} classes={ours['classes']} K={k} noise={args.noise} "
          f"threads={__import__('torch').get_num_threads()} repeats={args.repeats} "
          f"tiles={results['gemm']['tile_dtype'].removeprefix('torch.')}")
    print(f"{'part':<8}{'median s':>10}{'peak RSS MiB':>14}{'above start MiB':>17}   each run s")
    for part, r in results.items():
        print(f"{part:<8}{r['seconds']:>10.1f}{r['peak_rss'] / mib:>14.0f}"
              f"{(r['peak_rss'] - r['baseline_rss']) / mib:>17.0f}   {' '.join(f'{t:.1f}' for t in r['all'])}")
    print("metrics: " + " ".join(f"{name} {value:.4f}" for name, value in ours["metrics"].items()))
    print(f"time ratio ours / FAISS (medians): {ours['seconds'] / faiss_result['seconds']:.2f} (target <= 0.5); "
          f"GEMM floor / FAISS: {results['gemm']['seconds'] / faiss_result['seconds']:.2f}; "
          f"ours / GEMM floor: {ours['seconds'] / results['gemm']['seconds']:.2f}")
    print(f"memory ratio ours peak RSS / (embeddings + N*K indices = {needed / mib:.0f} MiB): "
          f"{ours['peak_rss'] / needed:.2f} (target <= 1.5); above interpreter start: "
          f"{(ours['peak_rss'] - ours['baseline_rss']) / needed:.2f}")
    print(f"FAISS peak RSS / same: {faiss_result['peak_rss'] / needed:.2f}")
    if "naive" in results:
        print(f"time ratio ours / naive: {ours['seconds'] / results['naive']['seconds']:.2f}, "
              f"memory ratio ours / naive: {ours['peak_rss'] / results['naive']['peak_rss']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
