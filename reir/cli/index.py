"""``reir index``: a feature database -> a FAISS index file and its id map.

Exact (``Flat``) indexes rank like evaluation does; approximate ones (HNSW, IVF, PQ ...)
are trained on the database and measured against exact search before they are trusted:
the command prints their Recall@10 and queries per second next to exact search's.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from reir.argtypes import positive_int
from reir.cli.common import ArgumentParser, reports_errors
from reir.errors import ReirError
from reir.retrieval.database import load_database, resolve_database_path
from reir.retrieval.index import EXACT_FACTORY, Index, collection_splits
from reir.retrieval.similarity import flatten, knn


def recall_against_exact(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean share of each query's exact top-k that the approximate top-k also found."""
    k = exact.shape[1]
    if k == 0:
        return 1.0
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(found[:, :k], exact))
    return hits / (len(exact) * k)


def timed_search(search, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """Ids found and queries per second (queries searched in one call, as a batch)."""
    start = time.perf_counter()
    _, ids = search(queries, k)
    return ids, len(queries) / max(time.perf_counter() - start, 1e-9)


def sample_queries(vectors: torch.Tensor, count: int) -> torch.Tensor:
    """A fixed random sample of the database itself serves as queries."""
    order = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(0))[:count]
    return vectors[order]


def compare_with_exact(index: Index, vectors: torch.Tensor, queries: torch.Tensor, k: int) -> dict[str, float]:
    """Recall@k of ``index`` against exact search on ``vectors``, and both engines' queries per second."""
    exact_ids, exact_qps = timed_search(lambda q, n: knn(q, vectors, n), queries, k)
    found_ids, qps = timed_search(index.search, queries, k)
    return {"recall": recall_against_exact(found_ids, exact_ids), "qps": qps, "exact_qps": exact_qps}


def default_output(database_path: Path, factory: str) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in factory).strip("-")
    stem = database_path.name.removesuffix(".safetensors")
    return database_path.with_name(f"{stem}.{slug}.faiss")


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="reir index", description="Build a FAISS index (and id map) over a database.")
    parser.add_argument("--data_base", required=True, help="a *_data_base.safetensors (from training or reir embed)")
    parser.add_argument("--output_dir", default=".", help="folder whose results/ holds the database")
    parser.add_argument("--factory", default=EXACT_FACTORY,
                        help="FAISS factory string: Flat (exact), HNSW32, IVF1024,Flat, IVF4096,PQ48, ...")
    parser.add_argument("--splits", default=None,
                        help="comma-separated splits to index (default: all but train, or train alone)")
    parser.add_argument("--output", default=None, help="index file (default: beside the database); "
                        "the id map goes to <output>.ids.json")
    parser.add_argument("--train_size", default=None, type=positive_int,
                        help="train approximate indexes on this many random vectors (default all)")
    parser.add_argument("--nprobe", default=None, type=positive_int, help="IVF lists searched per query")
    parser.add_argument("--efSearch", default=None, type=positive_int, help="HNSW search breadth")
    parser.add_argument("--queries", default=1000, type=positive_int,
                        help="database vectors used as queries for Recall@10 and QPS")
    return parser


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    database_path = resolve_database_path(args.data_base, args.output_dir)
    database = load_database(database_path)
    splits = [s for s in args.splits.split(",") if s] if args.splits else collection_splits(database)
    start = time.perf_counter()
    index = Index.from_database(database, splits, args.factory, train_size=args.train_size)
    index.info["database"] = str(database_path.resolve())
    build_seconds = time.perf_counter() - start
    tuning = {name: value for name, value in (("nprobe", args.nprobe), ("efSearch", args.efSearch)) if value}
    if tuning:
        index.tune(**tuning)
        index.info["search_parameters"] = tuning
    output = Path(args.output) if args.output else default_output(database_path, args.factory)
    if output.is_dir():
        raise ReirError(f"--output {output} is a folder; give a file name such as {output}/collection.faiss", 2)
    index_file, ids_file = index.save(output)
    print(f"Indexed {len(index)} images ({', '.join(splits)}) of dimension {index.dim} with {args.factory} "
          f"in {build_seconds:.2f} s: {index_file} ({index_file.stat().st_size / 2**20:.1f} MiB), {ids_file}")
    if not index.exact and len(index):
        vectors = flatten(torch.cat([database.features[s] for s in splits]).float())
        queries = sample_queries(vectors, args.queries)
        k = min(10, len(index))
        figures = compare_with_exact(index, vectors, queries, k)
        print(f"Recall@{k} against exact search: {100 * figures['recall']:.2f}% on {len(queries)} queries; "
              f"{figures['qps']:,.0f} queries/s ({args.factory}) vs {figures['exact_qps']:,.0f} (exact)")
    return 0
