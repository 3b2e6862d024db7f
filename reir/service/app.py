"""The FastAPI application: the routes, their JSON errors and the web page."""

import sys
import time
from importlib import resources
from pathlib import Path
from typing import BinaryIO

from reir.service.access import KeyRequired
from reir.service.batcher import QueryBatcher
from reir.service.limits import MAX_BODY_BYTES, MAX_REQUESTS, RETRY_AFTER_SECONDS, UPLOAD_SECONDS, BodyLimit
from reir.service.searcher import BadRequest, Searcher, parse_decimal

DEFAULT_K = 12
MAX_K = 100
BATCH_SIZE = 16
BATCH_WINDOW_MS = 5.0


def create_app(searcher: Searcher, max_body_bytes: int = MAX_BODY_BYTES, default_k: int = DEFAULT_K,
               max_requests: int = MAX_REQUESTS, upload_seconds: float = UPLOAD_SECONDS,
               batch_size: int = BATCH_SIZE, batch_window_ms: float = BATCH_WINDOW_MS, api_key: str | None = None):
    """The FastAPI application; a bounded, spooling body reader with a cap on requests in flight wraps it, and
    with ``api_key`` a check of that key on every request (before a body is read) wraps that."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    app = FastAPI(title="REIR search", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("reir.service").joinpath("serve_page.html").read_text(encoding="utf-8")
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
        message = exc.errors()[0].get("msg", "bad parameters") if exc.errors() else "bad parameters"
        return error(400, f"invalid request: {message}")

    @app.get("/", response_class=HTMLResponse)
    async def home():
        return HTMLResponse(page)

    model_path = searcher.model.path
    model_name = str(model_path) if searcher.expose_paths or model_path is None else Path(model_path).name

    @app.get("/info")
    async def info():
        index = searcher.index
        return {"images": len(index), "factory": index.factory, "dim": index.dim,
                "labelled": index.labelled, "model": model_name,
                "default_k": default_k, "max_k": MAX_K, "max_body_bytes": max_body_bytes,
                "max_pixels": searcher.max_pixels, "max_requests": max_requests, "upload_seconds": upload_seconds}

    @app.get("/images/{image_id}")
    async def database_image(image_id: str, request: Request):
        # images go whole: Range is ignored (as HTTP allows), so a malformed one cannot get a plain-text error
        request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k not in (b"range", b"if-range")]
        data, content_type = searcher.database_image(image_id)
        return Response(data, media_type=content_type,
                        headers={"Cache-Control": "max-age=3600", "Accept-Ranges": "none",
                                 "X-Content-Type-Options": "nosniff"})

    @app.post("/search")
    async def search(request: Request):
        started = time.perf_counter()
        content_type = request.headers.get("content-type", "")
        query_label: str | None = None
        query_text: str | None = None  # a database image's id as the client wrote it
        query_id: int | None = None
        data: BinaryIO | bytes | None = None
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
            query_text = text_field(form, "id")
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
        if data is None:
            if query_text is None:
                raise BadRequest(400, "no image: send a file field 'image' or a database image 'id'")
            data = searcher.database_image(query_text)[0]
            query_id = searcher.database_id(query_text)
            query_label = searcher.index.labels[query_id] or None
        tensor, width, height = await run_in_threadpool(searcher.prepare, data)
        results = await batcher.search(tensor, k, query_label)
        return {"k": k, "query": {"id": query_id, "label": query_label, "width": width, "height": height},
                "results": results, "milliseconds": round(1000 * (time.perf_counter() - started), 2)}

    limited = BodyLimit(app, max_body_bytes, max_requests, upload_seconds)
    return KeyRequired(limited, api_key) if api_key is not None else limited


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
