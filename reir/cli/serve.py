"""``reir serve``: an HTTP search service and web page over a model and an index.

Built on FastAPI (Starlette underneath) served by uvicorn: both are widely used, actively
maintained, asynchronous (many idle connections cost nothing while the model runs in a worker
thread) and small; python-multipart, Starlette's own form parser, reads uploads. Endpoints:

- ``POST /search``: an image (multipart field ``image``, or the raw body with an ``image/*``
  content type) or a database id (form field ``id``) -> the top-k database images as JSON;
- ``GET /images/<id>``: a database image by its id (ids only, never a path);
- ``GET /``: a self-contained page to drop or pick an image and browse the results.

Every bad request gets a 4xx answer ``{"error": "<one line>"}``; bodies and images are
bounded (bytes before parsing, pixels before decoding), so no upload can take the service down.
"""


import io
import json
import socket
import sys
import time
from importlib import resources
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from reir.api import Model, embed_batch, load_model
from reir.argtypes import positive_int
from reir.cli.common import ArgumentParser, reports_errors
from reir.errors import ReirError, UsageError
from reir.retrieval.database import UNLABELLED
from reir.retrieval.index import Index
from reir.training.devices import parse_device

MAX_BODY_BYTES = 20 * 2**20
MAX_PIXELS = 40_000_000
DEFAULT_K = 12
MAX_K = 100


class BadRequest(Exception):
    """A client error: the HTTP status and the one-line message sent back."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Searcher:
    """The model and the index: an image (or a database id) -> ranked database images."""

    def __init__(self, model: Model, index: Index, max_pixels: int = MAX_PIXELS):
        self.model = model
        self.index = index
        self.max_pixels = max_pixels
        self.transform = model.transform
        if index.dim != model.embedding_shape[0] * model.embedding_shape[1]:
            raise ReirError(f"the index holds vectors of dimension {index.dim} but the model embeds "
                            f"{model.embedding_shape[0] * model.embedding_shape[1]}; serve the model the index was built from")

    def decode(self, data: bytes) -> Image.Image:
        """Bytes -> RGB image, refusing empty, non-image, truncated and too-large uploads."""
        if not data:
            raise BadRequest(400, "the upload is empty; send an image file")
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > self.max_pixels:
                raise BadRequest(413, f"the image is {width}x{height} = {width * height / 1e6:.1f} megapixels; "
                                      f"the limit is {self.max_pixels / 1e6:g} megapixels")
            image.load()
            return image.convert("RGB")
        except BadRequest:
            raise
        except Image.DecompressionBombError:
            raise BadRequest(413, f"the image has too many pixels; the limit is {self.max_pixels / 1e6:g} megapixels") from None
        except UnidentifiedImageError:
            raise BadRequest(415, "the upload is not an image PIL can read (JPEG, PNG, WebP, ...)") from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BadRequest(400, f"the image cannot be decoded ({reason}); it may be truncated") from None

    def database_image(self, image_id: str) -> Path:
        if not image_id.isdigit() or int(image_id) >= len(self.index):
            raise BadRequest(404, f"no database image has id {image_id!r}; ids are 0 to {len(self.index) - 1}")
        path = Path(self.index.paths[int(image_id)])
        if not path.is_file():
            raise BadRequest(404, f"database image {image_id} is no longer on disk")
        return path

    def search(self, image: Image.Image, k: int, query_label: str | None = None) -> list[dict]:
        features = embed_batch(self.model, self.transform(image)[None])
        scores, ids = self.index.search(features, k)
        results = []
        for score, image_id in zip(scores[0].tolist(), ids[0].tolist()):
            if image_id < 0:  # an approximate index found fewer than k
                continue
            label = self.index.labels[image_id]
            known = query_label not in (None, UNLABELLED) and label != UNLABELLED
            results.append({"id": image_id, "path": self.index.paths[image_id], "label": label or None,
                            "score": score, "correct": (label == query_label) if known else None})
        return results


def create_app(searcher: Searcher, max_body_bytes: int = MAX_BODY_BYTES, default_k: int = DEFAULT_K):
    """The FastAPI application; a bounded body reader wraps it."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    app = FastAPI(title="REIR search", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("reir.cli").joinpath("serve_page.html").read_text(encoding="utf-8")
    page = page.replace("__DEFAULT_K__", str(default_k)).replace("__MAX_K__", str(MAX_K))

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(BadRequest)
    async def bad_request(_request, exc: BadRequest):
        return error(exc.status, str(exc))

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

    @app.get("/info")
    async def info():
        index = searcher.index
        return {"images": len(index), "factory": index.factory, "dim": index.dim,
                "labelled": any(l != UNLABELLED for l in index.labels), "model": str(searcher.model.path),
                "default_k": default_k, "max_k": MAX_K, "max_body_bytes": max_body_bytes,
                "max_pixels": searcher.max_pixels}

    @app.get("/images/{image_id}")
    async def database_image(image_id: str):
        return FileResponse(searcher.database_image(image_id), headers={"Cache-Control": "max-age=3600"})

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
            k_text = form.get("k") or k_text
            query_label = form.get("label") or None
            query_id = form.get("id")
            if isinstance(upload, UploadFile):
                data = await upload.read()
            elif upload is not None:
                raise BadRequest(400, "field 'image' must be a file upload, not text")
        elif content_type.startswith(("image/", "application/octet-stream")):
            data = await request.body()
        else:
            raise BadRequest(415, "send a form with a file field 'image' (or a field 'id'), "
                                  "or the raw image with an image/* content type")
        k = parse_k(k_text, default_k)
        if data is None and query_id is None:
            raise BadRequest(400, "no image: send a file field 'image' or a database image 'id'")
        if data is None:
            path = searcher.database_image(str(query_id))
            data = await run_in_threadpool(path.read_bytes)
            query_label = searcher.index.labels[int(query_id)] or None
        image = await run_in_threadpool(searcher.decode, data)
        results = await run_in_threadpool(searcher.search, image, k, query_label)
        return {"k": k, "query": {"id": int(query_id) if query_id is not None else None, "label": query_label,
                                  "width": image.width, "height": image.height},
                "results": results, "milliseconds": round(1000 * (time.perf_counter() - started), 2)}

    return BodyLimit(app, max_body_bytes)


def parse_k(text, default_k: int) -> int:
    if text in (None, ""):
        return default_k
    if not str(text).isdigit() or not 1 <= int(text) <= MAX_K:
        raise BadRequest(400, f"k must be an integer from 1 to {MAX_K}, not {str(text)[:20]!r}")
    return int(text)


class BodyLimit:
    """ASGI wrapper: a request body over the limit is refused with 413 before anything parses it."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await self.refuse(send, 400, "the Content-Length header is not a number")
            if int(declared) > self.limit:
                return await self.refuse(send, 413, self.too_large(int(declared)))
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self.refuse(send, 413, self.too_large(len(body)))
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)

    def too_large(self, size: int) -> str:
        return f"the request body is {size / 2**20:.1f} MiB or more; the limit is {self.limit / 2**20:g} MiB"

    @staticmethod
    async def refuse(send, status: int, message: str) -> None:
        payload = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
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
    return Searcher(model, index, args.max_pixels)


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
    return parser


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port {args.port} is not a port; use 1-65535 or 0 for any free port")
    if args.k > MAX_K:
        raise UsageError(f"--k {args.k} exceeds {MAX_K}")
    searcher = load_searcher(args)
    app = create_app(searcher, int(args.max_body_mb * 2**20), args.k)
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
