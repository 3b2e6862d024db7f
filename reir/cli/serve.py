"""``reir serve``: an HTTP search service and web page over a model and an index.

Built on FastAPI (Starlette underneath) served by uvicorn: both are widely used, actively
maintained, asynchronous (many idle connections cost nothing while the model runs in a worker
thread) and small; python-multipart, Starlette's own form parser, reads uploads. Endpoints:

- ``POST /search``: an image (multipart field ``image``, or the raw body with an ``image/*``
  content type) or a database id (form field ``id``) -> the top-k database images as JSON;
- ``GET /images/<id>``: a database image by its id (ids only, never a path);
- ``GET /``: a self-contained page to drop or pick an image and browse the results.

Every bad request gets a 4xx answer ``{"error": "<one line>"}``; bodies and images are
bounded (bytes before parsing, pixels before decoding), bodies are spooled to a temporary file
(memory up to ``SPOOL_BYTES``, then disk) within a time limit, and the number of requests in
flight is capped (beyond it a 503 with ``Retry-After``), so no client can take the service down.
Queries that arrive together go through the network together (``QueryBatcher``). Answers name
database images by id and by path relative to the indexed root, never the server's file layout
unless ``--expose_paths`` asks for it.
"""


import asyncio
import contextlib
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

from PIL import Image

from reir.api import Model, embed, load_model
from reir.argtypes import positive_int
from reir.cli.common import ArgumentParser, reports_errors
from reir.data.images import ImageError, read_image
from reir.data.tarshards import IMAGE_TYPES, is_sample_path, sample_image_bytes
from reir.errors import ReirError, UsageError
from reir.retrieval.database import UNLABELLED
from reir.retrieval.index import Index
from reir.training.devices import parse_device

MAX_BODY_BYTES = 20 * 2**20
MAX_PIXELS = 40_000_000
DEFAULT_K = 12
MAX_K = 100
# Bytes of a request body kept in memory before the rest goes to a temporary file.
SPOOL_BYTES = 256 * 2**10
REPLAY_CHUNK = 64 * 2**10
MAX_REQUESTS = 64
UPLOAD_SECONDS = 30.0
BATCH_SIZE = 16
BATCH_WINDOW_MS = 5.0
# Large images decoded at once: a decode holds up to --max_pixels x 3 bytes twice (decoded and RGB).
DECODE_SLOTS = 2
LARGE_PIXELS = 2_000_000
RETRY_AFTER_SECONDS = 1


class BadRequest(Exception):
    """A client error: the HTTP status and the one-line message sent back."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_decimal(text, what: str, status: int = 400) -> int:
    """An ASCII decimal number; "²", "①" or Arabic-Indic digits pass ``str.isdigit`` but are no id."""
    text = str(text)
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise BadRequest(status, f"{what} must be a decimal number (digits 0-9), not {text[:20]!r}")
    return int(text)


class Searcher:
    """The model and the index: an image (or a database id) -> ranked database images."""

    def __init__(self, model: Model, index: Index, max_pixels: int = MAX_PIXELS, expose_paths: bool = False):
        self.model = model
        self.index = index
        self.max_pixels = max_pixels
        self.expose_paths = expose_paths
        self.root = index.root
        self.transform = model.transform
        self.large_decodes = threading.BoundedSemaphore(DECODE_SLOTS)
        if index.dim != model.embedding_shape[0] * model.embedding_shape[1]:
            raise ReirError(f"the index holds vectors of dimension {index.dim} but the model embeds "
                            f"{model.embedding_shape[0] * model.embedding_shape[1]}; serve the model the index was built from")

    def decode(self, data) -> Image.Image:
        """Bytes, a binary file or a path -> RGB image, refusing empty, non-image, truncated and too-large uploads."""
        source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        if hasattr(source, "seek") and source.seek(0, os.SEEK_END) == 0:
            raise BadRequest(400, "the upload is empty; send an image file")
        if hasattr(source, "seek"):
            source.seek(0)
        try:
            return read_image(source, self.max_pixels, gate=self.decode_gate)
        except ImageError as exc:
            if exc.kind == "too_large" and exc.size:
                width, height = exc.size
                raise BadRequest(413, f"the image is {width}x{height} = {width * height / 1e6:.1f} megapixels; "
                                      f"the limit is {self.max_pixels / 1e6:g} megapixels") from None
            if exc.kind == "too_large":
                raise BadRequest(413, f"the image has too many pixels; the limit is {self.max_pixels / 1e6:g} megapixels") from None
            if exc.kind == "not_image":
                raise BadRequest(415, "the upload is not an image PIL can read (JPEG, PNG, WebP, ...)") from None
            raise BadRequest(400, f"the image cannot be decoded ({exc.reason}); it may be truncated") from None

    def decode_gate(self, width: int, height: int):
        """Large images decode a few at a time; small ones never wait behind them."""
        return self.large_decodes if width * height > LARGE_PIXELS else contextlib.nullcontext()

    def database_id(self, text) -> int:
        """A database id from a client's text: ASCII decimal, within the index."""
        image_id = parse_decimal(text, "a database image id", status=404)
        if image_id >= len(self.index):
            raise BadRequest(404, f"no database image has id {str(text)[:20]!r}; ids are 0 to {len(self.index) - 1}")
        return image_id

    def database_image(self, image_id: str) -> Path | tuple[bytes, str]:
        """The file of a database image, or ``(bytes, extension)`` of a sample inside a tar shard."""
        image_id = self.database_id(image_id)
        path = self.index.paths[image_id]
        if is_sample_path(path):
            try:
                return sample_image_bytes(path)
            except OSError:
                raise BadRequest(404, f"database image {image_id} is no longer in its tar shard") from None
        if not Path(path).is_file():
            raise BadRequest(404, f"database image {image_id} is no longer on disk")
        return Path(path)

    def name(self, image_id: int) -> str:
        """What a client sees of a database image's path: relative to the indexed root unless exposed."""
        path = self.index.paths[image_id]
        if self.expose_paths or not path:
            return path
        return os.path.relpath(path, self.root) if self.root else os.path.basename(path)

    def prepare(self, data):
        """Decoded and transformed: ``(tensor [3, S, S], width, height)``."""
        image = self.decode(data)
        return self.transform(image), image.width, image.height

    def search(self, image: Image.Image, k: int, query_label: str | None = None) -> list[dict]:
        return self.search_batch(self.transform(image)[None], [k], [query_label])[0]

    def search_batch(self, images, ks: list[int], query_labels: list[str | None]) -> list[list[dict]]:
        """Ranked results per query; one network pass for the batch, one index search per distinct k."""
        features = embed(self.model, images)
        answers: list[list[dict]] = [[] for _ in ks]
        for k in sorted(set(ks)):
            rows = [row for row, wanted in enumerate(ks) if wanted == k]
            found = self.index.search(features[rows], k)
            for position, row in enumerate(rows):
                answers[row] = self.results(found.row(position), query_labels[row])
        return answers

    def results(self, ranked, query_label: str | None) -> list[dict]:
        """JSON results of one query's ``(image id, score)`` pairs."""
        results = []
        for image_id, score in ranked:
            label = self.index.labels[image_id]
            known = query_label not in (None, UNLABELLED) and label != UNLABELLED
            results.append({"id": image_id, "path": self.name(image_id), "label": label or None,
                            "score": score, "correct": (label == query_label) if known else None})
        return results


class Busy(BadRequest):
    """The service is at its limit of requests or queued queries: 503, try again after ``Retry-After``."""

    def __init__(self, message: str):
        super().__init__(503, message)


class QueryBatcher:
    """Queries waiting at the same moment are embedded in one network pass.

    The first query opens a batch; others join for up to ``window_s`` (or until ``max_batch``),
    and queries that arrive while the network runs form the next batch. At most ``max_waiting``
    queries wait; beyond that a query is refused as busy.
    """

    def __init__(self, searcher: Searcher, max_batch: int, window_s: float, max_waiting: int):
        self.searcher = searcher
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_waiting = max_waiting
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None

    async def search(self, tensor, k: int, query_label: str | None) -> list[dict]:
        if self.queue is None:
            self.queue = asyncio.Queue(self.max_waiting)
            self.worker = asyncio.create_task(self.run())
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((tensor, k, query_label, future))
        except asyncio.QueueFull:
            raise Busy(f"{self.max_waiting} queries are already waiting; retry shortly") from None
        return await future

    async def run(self) -> None:
        from starlette.concurrency import run_in_threadpool
        import torch

        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait() if self.queue.qsize() else
                                 await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            batch = [entry for entry in batch if not entry[3].done()]  # clients that left are not searched
            if not batch:
                continue
            try:
                answers = await run_in_threadpool(self.searcher.search_batch, torch.stack([e[0] for e in batch]),
                                                  [e[1] for e in batch], [e[2] for e in batch])
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request, which reports it
                for entry in batch:
                    if not entry[3].done():
                        entry[3].set_exception(exc)
                continue
            for entry, answer in zip(batch, answers):
                if not entry[3].done():
                    entry[3].set_result(answer)


def create_app(searcher: Searcher, max_body_bytes: int = MAX_BODY_BYTES, default_k: int = DEFAULT_K,
               max_requests: int = MAX_REQUESTS, upload_seconds: float = UPLOAD_SECONDS,
               batch_size: int = BATCH_SIZE, batch_window_ms: float = BATCH_WINDOW_MS):
    """The FastAPI application; a bounded, spooling body reader with a cap on requests in flight wraps it."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    app = FastAPI(title="REIR search", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("reir.cli").joinpath("serve_page.html").read_text(encoding="utf-8")
    page = page.replace("__DEFAULT_K__", str(default_k)).replace("__MAX_K__", str(MAX_K))

    batcher = QueryBatcher(searcher, batch_size, batch_window_ms / 1000, max_requests)

    def error(status: int, message: str) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(BadRequest)
    async def bad_request(_request, exc: BadRequest):
        return error(exc.status, str(exc))

    @app.exception_handler(Exception)
    async def server_fault(_request, exc: Exception):
        print(f"reir serve: internal error {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return error(500, "internal error; the request was not answered, the service goes on")

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        message = {404: "not found; the service answers GET /, POST /search and GET /images/<id>",
                   405: "method not allowed; search with POST /search"}.get(exc.status_code, str(exc.detail))
        return error(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        return error(400, f"invalid request: {exc.errors()[0].get('msg', 'bad parameters') if exc.errors() else 'bad parameters'}")

    @app.get("/", response_class=HTMLResponse)
    async def home():
        return HTMLResponse(page)

    model_path = searcher.model.path
    model_name = str(model_path) if searcher.expose_paths or model_path is None else Path(model_path).name

    @app.get("/info")
    async def info():
        index = searcher.index
        return {"images": len(index), "factory": index.factory, "dim": index.dim,
                "labelled": any(l != UNLABELLED for l in index.labels), "model": model_name,
                "default_k": default_k, "max_k": MAX_K, "max_body_bytes": max_body_bytes,
                "max_pixels": searcher.max_pixels, "max_requests": max_requests, "upload_seconds": upload_seconds}

    @app.get("/images/{image_id}")
    async def database_image(image_id: str, request: Request):
        # images go whole: Range is ignored (as HTTP allows), so a malformed one cannot get a plain-text error
        request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k not in (b"range", b"if-range")]
        found = searcher.database_image(image_id)
        headers = {"Cache-Control": "max-age=3600", "Accept-Ranges": "none"}
        if isinstance(found, Path):
            return FileResponse(found, headers=headers)
        data, extension = found
        return Response(data, media_type=IMAGE_TYPES[extension], headers=headers)

    @app.post("/search")
    async def search(request: Request):
        started = time.perf_counter()
        content_type = request.headers.get("content-type", "")
        query_label, query_id, data = None, None, None
        k_text = request.query_params.get("k")
        if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            try:
                form = await request.form(max_files=1, max_fields=8)
            except Exception as exc:  # noqa: BLE001 - any parser failure is the client's malformed form
                raise BadRequest(400, f"the multipart form cannot be parsed ({type(exc).__name__}); "
                                      "send the image as field 'image'") from None
            upload = form.get("image")
            k_text = text_field(form, "k") or k_text
            query_label = text_field(form, "label") or None
            query_id = text_field(form, "id")
            if isinstance(upload, UploadFile):
                data = upload.file
            elif upload is not None:
                raise BadRequest(400, "field 'image' must be a file upload, not text")
        elif content_type.startswith(("image/", "application/octet-stream")):
            data = request.state.body_file
        else:
            raise BadRequest(415, "send a form with a file field 'image' (or a field 'id'), "
                                  "or the raw image with an image/* content type")
        k = parse_k(k_text, default_k)
        if data is None and query_id is None:
            raise BadRequest(400, "no image: send a file field 'image' or a database image 'id'")
        if data is None:
            data = searcher.database_image(query_id)
            query_id = searcher.database_id(query_id)
            query_label = searcher.index.labels[query_id] or None
        tensor, width, height = await run_in_threadpool(searcher.prepare, data)
        results = await batcher.search(tensor, k, query_label)
        return {"k": k, "query": {"id": query_id, "label": query_label, "width": width, "height": height},
                "results": results, "milliseconds": round(1000 * (time.perf_counter() - started), 2)}

    return BodyLimit(app, max_body_bytes, max_requests, upload_seconds)


def text_field(form, name: str) -> str | None:
    """A plain form field; a file sent under a text field's name is the client's mistake."""
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise BadRequest(400, f"field {name!r} must be text, not a file")
    return value


def parse_k(text, default_k: int) -> int:
    if text in (None, ""):
        return default_k
    k = parse_decimal(text, f"k (an integer from 1 to {MAX_K})")
    if not 1 <= k <= MAX_K:
        raise BadRequest(400, f"k must be an integer from 1 to {MAX_K}, not {str(text)[:20]!r}")
    return k


class BodyLimit:
    """ASGI wrapper: caps requests in flight, and spools each request body to a temporary file.

    A body over the limit is refused with 413 before anything parses it, a body that does not
    arrive within ``upload_seconds`` with 408, and a request beyond ``max_requests`` in flight
    with 503 and ``Retry-After``. The spooled body is replayed to the application in chunks and
    left at ``request.state.body_file``, so no body is ever held whole in memory twice.
    """

    def __init__(self, app, limit: int, max_requests: int = MAX_REQUESTS, upload_seconds: float = UPLOAD_SECONDS):
        self.app = app
        self.limit = limit
        self.max_requests = max_requests
        self.upload_seconds = upload_seconds
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_requests:
            return await self.refuse(send, 503, f"the service is answering {self.max_requests} requests; retry shortly")
        self.in_flight += 1
        try:
            if scope["method"] in ("GET", "HEAD", "OPTIONS"):
                return await self.app(scope, receive, send)
            return await self.spooled(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def spooled(self, scope, receive, send):
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):
                return await self.refuse(send, 400, "the Content-Length header is not a number")
            if int(declared) > self.limit:
                return await self.refuse(send, 413, self.too_large(int(declared)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.upload_seconds
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as body:
            size, more = 0, True
            while more:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    return await self.refuse(send, 408, f"the request body did not arrive within "
                                                        f"{self.upload_seconds:g} s; send it at once")
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.limit:
                    return await self.refuse(send, 413, self.too_large(size))
                body.write(chunk)
                more = message.get("more_body", False)
            body.seek(0)
            scope.setdefault("state", {})["body_file"] = body
            replayed = False

            async def replay():
                nonlocal replayed
                if replayed:
                    return await receive()
                chunk = body.read(REPLAY_CHUNK)
                replayed = body.tell() >= size
                if replayed:
                    body.seek(0)  # the raw-body route reads the file from its start
                return {"type": "http.request", "body": chunk, "more_body": not replayed}

            return await self.app(scope, replay, send)

    def too_large(self, size: int) -> str:
        return f"the request body is {size / 2**20:.1f} MiB or more; the limit is {self.limit / 2**20:g} MiB"

    @staticmethod
    async def refuse(send, status: int, message: str) -> None:
        payload = json.dumps({"error": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                   (b"connection", b"close")]
        if status == 503:
            headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def load_searcher(args) -> Searcher:
    if args.uri or args.backend == "milvus":
        if args.backend != "milvus" or not args.uri:
            raise UsageError("a Milvus collection is served with --backend milvus --uri URI [--collection NAME]")
        index = Index.open("milvus", uri=args.uri, collection=args.collection)
    elif args.index:
        index = Index.load(args.index)
    else:
        from reir.retrieval.database import resolve_database_path

        index = Index.from_database(resolve_database_path(args.data_base, "."))
    model_file = args.model or index.info.get("model_file")
    if not model_file:
        raise UsageError("the index records no model file; pass --model epochs/<name>_model.safetensors")
    model = load_model(model_file, parse_device(args.device))
    return Searcher(model, index, args.max_pixels, args.expose_paths)


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
    searcher = load_searcher(args)
    if not 0 < args.upload_seconds <= 3600 or not 0 <= args.batch_window_ms <= 1000 or not args.max_body_mb > 0:
        raise UsageError("--upload_seconds must be within (0, 3600], --batch_window_ms within [0, 1000] "
                         "and --max_body_mb positive")
    app = create_app(searcher, int(args.max_body_mb * 2**20), args.k, args.max_requests, args.upload_seconds,
                     args.batch_size, args.batch_window_ms)
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
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
