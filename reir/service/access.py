"""The ASGI wrapper that admits only requests carrying the service's key (``Authorization: Bearer <key>``).

A service reachable beyond this machine answers whoever can reach it, so it holds a key. The key is
compared in constant time (``hmac.compare_digest``) on every request, so the answer's timing tells
nothing of how much of a guess was right. The page itself (``GET /``) holds no data and is served to
anyone: it asks for the key (or takes it from the address's fragment, ``#key=...``, which browsers never
send to the server) and sends it with every request it makes.
"""

import hmac
import ipaddress
import json

# Shorter keys are guessable; a key file holds one line of at least this many characters.
MIN_KEY_CHARACTERS = 16
OPEN_PATHS = ("/",)


class KeyRequired:
    """ASGI wrapper: a request without the key gets 401 and a one-line JSON error, and never reaches ``app``."""

    def __init__(self, app, key: str):
        if len(key) < MIN_KEY_CHARACTERS:
            raise ValueError(f"the key has {len(key)} characters; use at least {MIN_KEY_CHARACTERS}")
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope["method"] in ("GET", "HEAD") and scope["path"] in OPEN_PATHS):
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
        if not hmac.compare_digest(given, self.expected):
            payload = json.dumps({"error": "this service needs its key: send the header "
                                           "'Authorization: Bearer <key>'"}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode()),
                                    (b"www-authenticate", b'Bearer realm="reir"')]})
            await send({"type": "http.response.body", "body": payload})
            return
        return await self.app(scope, receive, send)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is an address of this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that resolves elsewhere, or to every interface
