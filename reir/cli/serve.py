"""``reir serve``: parses its flags, opens the model and the index, and starts the service (reir.service)."""

import socket
import sys
from pathlib import Path

from reir.argtypes import positive_int
from reir.cli.common import ArgumentParser, reports_errors
from reir.devices import parse_device
from reir.errors import ReirError, UsageError
from reir.model.files import load_model
from reir.retrieval.backends import open_index
from reir.retrieval.database import is_database
from reir.retrieval.index import Index, id_map_path
from reir.service import (
    BATCH_SIZE,
    BATCH_WINDOW_MS,
    DEFAULT_K,
    MAX_BODY_BYTES,
    MAX_K,
    MAX_PIXELS,
    MAX_REQUESTS,
    UPLOAD_SECONDS,
    Searcher,
    create_app,
)
from reir.service.access import MIN_KEY_CHARACTERS, is_loopback


def check_source_kind(args) -> None:
    """A database given as an index, or an index as a database, is refused with the flag it needs."""
    if args.index and not id_map_path(args.index).is_file() and is_database(args.index):
        raise UsageError(f"{args.index} is a database, not an index: serve it with --data_base {args.index} "
                         "(or build an index over it with reir index)")
    if args.data_base and id_map_path(args.data_base).is_file():
        raise UsageError(f"{args.data_base} is an index written by reir index, not a database: "
                         f"serve it with --index {args.data_base}")


def load_searcher(args) -> Searcher:
    check_source_kind(args)
    if args.uri or args.backend == "milvus":
        if args.backend != "milvus" or not args.uri:
            raise UsageError("a Milvus collection is served with --backend milvus --uri URI [--collection NAME]")
        index, source = open_index("milvus", uri=args.uri, collection=args.collection), None
    elif args.index:
        index, source = Index.load(args.index), args.index
    else:
        from reir.retrieval.database import resolve_database_path

        source = resolve_database_path(args.data_base, ".")
        index = Index.from_database(source)
    if not len(index):
        where = f"collection {args.collection} at {args.uri}" if args.uri else f"index {args.index or args.data_base}"
        raise ReirError(f"{where} holds no images; build it with reir index from a database that holds some")
    model_file = args.model or index.info.get("model_file")
    if not model_file:
        raise UsageError("the index records no model file; pass --model epochs/<name>_model.safetensors")
    model = load_model(model_file, parse_device(args.device))
    return Searcher(model, index, args.max_pixels, args.expose_paths, source)


def access_key(args) -> str | None:
    """The key requests must carry, from --api_key_file; a --host beyond this machine needs one or --no_auth."""
    if args.api_key_file and args.no_auth:
        raise UsageError("--api_key_file and --no_auth contradict each other; pass one")
    if args.api_key_file is None:
        if not is_loopback(args.host) and not args.no_auth:
            raise UsageError(f"--host {args.host} listens beyond this machine; pass --api_key_file FILE (a key "
                             "clients send as 'Authorization: Bearer <key>'), or --no_auth to serve anyone")
        return None
    try:
        key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--api_key_file {args.api_key_file} cannot be read ({type(exc).__name__}); "
                         "write the key on one line of a text file") from None
    if len(key) < MIN_KEY_CHARACTERS or any(c.isspace() or not c.isprintable() for c in key) or not key.isascii():
        raise UsageError(f"--api_key_file {args.api_key_file} must hold one key of at least {MIN_KEY_CHARACTERS} "
                         "printable ASCII characters and no spaces, e.g. from: python -c 'import secrets; "
                         "print(secrets.token_urlsafe(32))'")
    return key


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="reir serve", description="Serve search over an index: JSON API and a web page.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--index", help="an index file written by reir index (its .ids.json beside it)")
    source.add_argument("--data_base", help="a database, searched exactly (an in-memory Flat index)")
    source.add_argument("--uri", help="with --backend milvus: a Milvus Lite file or http://HOST:19530")
    parser.add_argument("--backend", default="faiss", choices=["faiss", "milvus"], help="index backend (default faiss)")
    parser.add_argument("--collection", default="reir", help="with --backend milvus: the collection (default reir)")
    parser.add_argument("--model", default=None, help="model file (default: the one the index records)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", default=8000, type=int, help="port (0: any free port, printed at start)")
    parser.add_argument("--k", default=DEFAULT_K, type=positive_int, help="results per search unless asked")
    parser.add_argument("--max_body_mb", default=MAX_BODY_BYTES / 2**20, type=float, help="largest request body")
    parser.add_argument("--max_pixels", default=MAX_PIXELS, type=positive_int, help="largest image, in pixels")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--max_requests", default=MAX_REQUESTS, type=positive_int,
                        help="requests in flight at once; beyond it 503 with Retry-After")
    parser.add_argument("--upload_seconds", default=UPLOAD_SECONDS, type=float,
                        help="time a request body may take to arrive (408 after it)")
    parser.add_argument("--batch_size", default=BATCH_SIZE, type=positive_int,
                        help="queries embedded together in one network pass at most")
    parser.add_argument("--batch_window_ms", default=BATCH_WINDOW_MS, type=float,
                        help="how long a first query waits for others to join its batch")
    parser.add_argument("--api_key_file", default=None,
                        help="file holding the key every request must send as 'Authorization: Bearer <key>' "
                             "(required with a --host beyond this machine, unless --no_auth)")
    parser.add_argument("--no_auth", action="store_true",
                        help="listen beyond this machine with no key: anyone who can reach it can search and "
                             "fetch every collection image (a warning is printed)")
    parser.add_argument("--expose_paths", action="store_true",
                        help="answer with the server's absolute image and model paths (default: relative names)")
    return parser


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port {args.port} is not a port; use 1-65535 or 0 for any free port")
    if args.k > MAX_K:
        raise UsageError(f"--k {args.k} exceeds {MAX_K}")
    if (not 0 < args.upload_seconds <= 3600 or not 0 <= args.batch_window_ms <= 1000
            or not 0 < args.max_body_mb < 2**20):
        raise UsageError("--upload_seconds must be within (0, 3600], --batch_window_ms within [0, 1000] "
                         "and --max_body_mb within (0, 1048576)")
    api_key = access_key(args)
    searcher = load_searcher(args)
    app = create_app(searcher, int(args.max_body_mb * 2**20), args.k, args.max_requests, args.upload_seconds,
                     args.batch_size, args.batch_window_ms, api_key)
    import uvicorn

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        # listening before the address is printed: a client that connects as soon as it reads it
        # waits in the backlog until uvicorn accepts, instead of being refused
        sock.listen(2048)
    except OSError as exc:
        raise ReirError(f"cannot listen on {args.host}:{args.port} ({exc.strerror}); choose another --port") from None
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    print(f"Serving {len(searcher.index)} images ({searcher.index.factory}) at http://{shown}:{port}/ "
          "(Ctrl-C stops)", flush=True)
    if args.no_auth and not is_loopback(args.host):
        print(f"reir serve: WARNING: --no_auth on {args.host}: anyone who can reach port {port} can search and "
              "download every collection image; use --api_key_file instead", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
