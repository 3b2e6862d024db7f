"""The ASGI wrapper that bounds request bodies, their arrival time and the requests in flight."""

import asyncio
import json
import tempfile

MAX_BODY_BYTES = 20 * 2**20
# Bytes of a request body kept in memory before the rest goes to a temporary file.
SPOOL_BYTES = 256 * 2**10
REPLAY_CHUNK = 64 * 2**10
MAX_REQUESTS = 64
UPLOAD_SECONDS = 30.0
RETRY_AFTER_SECONDS = 1


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
