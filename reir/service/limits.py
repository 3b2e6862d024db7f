"""The ASGI wrapper that bounds request bodies, their arrival rate and time, and the requests in flight."""

import asyncio
import json
import tempfile

MAX_BODY_BYTES = 20 * 2**20
# Bytes of a request body kept in memory before the rest goes to a temporary file.
SPOOL_BYTES = 256 * 2**10
REPLAY_CHUNK = 64 * 2**10
MAX_REQUESTS = 64
UPLOAD_SECONDS = 30.0
# Connections sending a body at once: a bound of their own, so bodies still arriving never take the
# request slots of requests ready to be answered.
MAX_RECEIVING = 256
# A body must keep arriving at this average rate once its grace period is over (a client trickling a
# few bytes now and then is cut off after about BODY_GRACE_SECONDS, not after UPLOAD_SECONDS).
MIN_BODY_BYTES_PER_SECOND = 4096
BODY_GRACE_SECONDS = 5.0
RETRY_AFTER_SECONDS = 1


class BodyLimit:
    """ASGI wrapper: caps requests in flight, and spools each request body to a temporary file first.

    A body is received before the request takes one of ``max_requests`` slots, so clients still
    sending hold no slot: at most ``max_receiving`` connections send at once (one more gets 503),
    each at an average of at least ``min_rate`` bytes/s after ``grace_seconds`` and within
    ``upload_seconds`` in all (408 otherwise). A body over the limit is refused with 413 before
    anything parses it, a request beyond ``max_requests`` in flight with 503 and ``Retry-After``.
    The spooled body is replayed to the application in chunks and left at
    ``request.state.body_file``, so no body is ever held whole in memory twice.
    """

    def __init__(self, app, limit: int, max_requests: int = MAX_REQUESTS, upload_seconds: float = UPLOAD_SECONDS,
                 max_receiving: int = MAX_RECEIVING, min_rate: float = MIN_BODY_BYTES_PER_SECOND,
                 grace_seconds: float = BODY_GRACE_SECONDS):
        self.app = app
        self.limit = limit
        self.max_requests = max_requests
        self.upload_seconds = upload_seconds
        self.max_receiving = max_receiving
        self.min_rate = min_rate
        self.grace_seconds = grace_seconds
        self.in_flight = 0
        self.receiving = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.answered(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):
                return await self.refuse(send, 400, "the Content-Length header is not a number")
            if int(declared) > self.limit:
                return await self.refuse(send, 413, self.too_large(int(declared)))
        if self.receiving >= self.max_receiving:
            return await self.refuse(send, 503, f"{self.max_receiving} request bodies are arriving; retry shortly")
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as body:
            self.receiving += 1
            try:
                size = await self.receive_body(receive, send, body)
            finally:
                self.receiving -= 1
            if size is None:
                return
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

            return await self.answered(scope, replay, send)

    async def answered(self, scope, receive, send):
        """The application's answer, in one of the request slots (503 when all are taken)."""
        if self.in_flight >= self.max_requests:
            return await self.refuse(send, 503, f"the service is answering {self.max_requests} requests; retry shortly")
        self.in_flight += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def receive_body(self, receive, send, body) -> int | None:
        """The whole body into ``body``: its size, or ``None`` once the client is answered (or gone)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.upload_seconds
        size, more = 0, True
        while more:
            # the moment this body falls under the minimum rate, if no more of it arrives before then
            behind = started + self.grace_seconds + size / self.min_rate
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(deadline, behind) - loop.time()))
            except asyncio.TimeoutError:
                if behind < deadline:
                    await self.refuse(send, 408, f"the request body arrives at under {self.min_rate / 1024:g} KiB/s; "
                                                 "send it at once")
                else:
                    await self.refuse(send, 408, f"the request body did not arrive within "
                                                 f"{self.upload_seconds:g} s; send it at once")
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self.refuse(send, 413, self.too_large(size))
                return None
            body.write(chunk)
            more = message.get("more_body", False)
        return size

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
