"""``reir index``: a feature database -> a FAISS index file and its id map, or a Milvus collection.

Exact indexes (FAISS ``Flat``, Milvus ``FLAT``) rank like evaluation does; approximate ones
(HNSW, IVF, PQ ...) are built from the database and measured against exact search before they
are trusted: the command prints their Recall@10 and queries per second next to exact search's.
Sharded databases are read one shard at a time (exact search for the measurement included).
"""

from __future__ import annotations

import time
from pathlib import Path

from reir.argtypes import positive_int
from reir.cli.common import ArgumentParser, reports_errors
from reir.errors import UsageError
from reir.fileio import OutputLock, claim_output
from reir.retrieval.database import resolve_database_path
from reir.retrieval.index import EXACT_FACTORY, INDEX_FORMAT, Index, id_map_path
from reir.retrieval.index_quality import compare_with_exact, streamed_queries


def default_output(database_path: Path, factory: str) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in factory).strip("-")
    stem = database_path.name.removesuffix(".safetensors")
    return database_path.with_name(f"{stem}.{slug}.faiss")


def parse_index_params(text: str | None) -> dict:
    """``M=32,efConstruction=200`` -> ``{"M": 32, "efConstruction": 200}`` (numbers where they are numbers)."""
    parameters = {}
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        if not name.strip() or not value.strip():
            raise UsageError(f"--index_params {text!r}: write name=value pairs such as M=32,efConstruction=200")
        value = value.strip()
        parameters[name.strip()] = int(value) if value.lstrip("-").isdigit() else value
    return parameters


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="reir index", description="Build a FAISS index (and id map) or a Milvus collection "
                            "over a database.")
    parser.add_argument("--data_base", required=True, help="a *_data_base.safetensors (from training or reir embed) "
                        "or a sharded database folder")
    parser.add_argument("--output_dir", default=".", help="folder whose results/ holds the database")
    parser.add_argument("--backend", default="faiss", choices=["faiss", "milvus"],
                        help="faiss (default): an index file; milvus: a collection in Milvus Lite or a Milvus server")
    parser.add_argument("--factory", default=EXACT_FACTORY,
                        help="FAISS factory string: Flat (exact), HNSW32, IVF1024,Flat, IVF4096,PQ48, ...")
    parser.add_argument("--uri", default=None, help="milvus: a Milvus Lite file (reir.milvus.db) or http://HOST:19530")
    parser.add_argument("--collection", default="reir", help="milvus: the collection to (re)create (default reir), "
                        "built as <collection>_reir_staging and renamed once complete")
    parser.add_argument("--index_type", default="FLAT", type=str.upper,
                        help="milvus: FLAT (exact), HNSW, IVF_FLAT or IVF_PQ")
    parser.add_argument("--index_params", default=None,
                        help="milvus: build parameters, e.g. M=32,efConstruction=200 or nlist=1024,m=96,nbits=8")
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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output that is not a REIR index, or a --collection "
                        "that reir index did not write")
    return parser


def build_milvus(args, database_path: Path, splits: list[str] | None):
    from reir.retrieval.milvus import MilvusIndex

    if args.factory != EXACT_FACTORY:
        raise UsageError("--factory is FAISS's; with --backend milvus choose --index_type and --index_params")
    if not args.uri:
        raise UsageError("--backend milvus needs --uri: a Milvus Lite file such as reir.milvus.db, "
                         "or http://HOST:19530")
    index = MilvusIndex.from_database(database_path, splits, args.index_type, uri=args.uri,
                                      collection=args.collection, parameters=parse_index_params(args.index_params),
                                      overwrite=args.overwrite)
    index.info["database"] = str(database_path.resolve())
    return index


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    database_path = resolve_database_path(args.data_base, args.output_dir)
    requested = [s for s in args.splits.split(",") if s] if args.splits else None
    if args.backend == "faiss" and (args.uri or args.index_params or args.index_type != "FLAT"):
        raise UsageError("--uri, --index_type and --index_params are for --backend milvus")
    if args.backend == "faiss":
        output = Path(args.output) if args.output else default_output(database_path, args.factory)
        if output.is_dir():
            raise UsageError(f"--output {output} is a folder; give a file name such as {output}/collection.faiss")
        # one writer per index file: a second reir index onto it is refused at once, before it builds anything
        with OutputLock(output.with_name(output.name + ".lock"), f"index {output}"):
            for part, record in ((output, id_map_path(output)), (id_map_path(output), id_map_path(output))):
                claim_output(part, (INDEX_FORMAT,), inputs=[database_path], record=record,
                             overwrite=args.overwrite, setting="--overwrite")
            return build(args, database_path, requested, output)
    return build(args, database_path, requested, None)


def build(args, database_path: Path, requested: list[str] | None, output: Path | None) -> int:
    """Build, save and measure the index ``main`` checked the flags of (``output``: the FAISS file)."""
    start = time.perf_counter()
    if args.backend == "milvus":
        index = build_milvus(args, database_path, requested)
    else:
        index = Index.from_database(database_path, requested, args.factory, train_size=args.train_size)
        index.info["database"] = str(database_path.resolve())
    build_seconds = time.perf_counter() - start
    splits = index.info["splits"]
    tuning = {name: value for name, value in (("nprobe", args.nprobe), ("efSearch", args.efSearch)) if value}
    if tuning:
        index.tune(**tuning)
        index.info["search_parameters"] = tuning
    if args.backend == "milvus":
        index.save_info()
        parameters = index.info["index_parameters"]
        print(f"Indexed {len(index)} images ({', '.join(splits)}) of dimension {index.dim} with {index.factory}"
              f"{f' {parameters}' if parameters else ''} in {build_seconds:.2f} s: collection {args.collection} "
              f"at {args.uri}")
    else:
        assert output is not None  # main passes the FAISS file
        index_file, ids_file = index.save(output)
        print(f"Indexed {len(index)} images ({', '.join(splits)}) of dimension {index.dim} with {args.factory} "
              f"in {build_seconds:.2f} s: {index_file} ({index_file.stat().st_size / 2**20:.1f} MiB), {ids_file}")
    if not index.exact and len(index):
        queries = streamed_queries(database_path, splits, len(index), args.queries)
        k = min(10, len(index))
        figures = compare_with_exact(index, database_path, splits, queries, k)
        print(f"Recall@{k} against exact search: {100 * figures['recall']:.2f}% on {len(queries)} queries; "
              f"{figures['qps']:,.0f} queries/s ({index.factory}) vs {figures['exact_qps']:,.0f} (exact)")
    if args.backend == "milvus":
        index.close()
    return 0
