"""A seeded fuzz campaign against a running ``reir serve``: thousands of generated requests, no 5xx, no hang.

Requests are built here byte by byte (multipart bodies, raw bodies, content types, headers, ids, k,
broken and huge images) and sent over plain sockets to a real server on 127.0.0.1. Every answer must
be below 500 and, for a 4xx, a one-line JSON error; no request may take longer than ``HANG_SECONDS``;
afterwards a valid search is still answered and the server's peak RSS stays within ``RSS_BUDGET_MIB``
of its RSS before the campaign.
"""

from __future__ import annotations

import collections
import http.client
import json
import random
import re
import threading
import urllib.parse
import uuid
from pathlib import Path

import pytest

from fuzz_inputs import hostile_image, image_bytes, mutate, odd_text
from test_serve import index_file, start_server  # noqa: F401 - the module's index fixture

SEED = 18
REQUESTS = 2000
SENDERS = 4
HANG_SECONDS = 30
MAX_BODY_MB = 1
MAX_PIXELS = 1_000_000
RSS_BUDGET_MIB = 250


def multipart(parts: list[tuple[str, str | None, str | None, bytes]], boundary: str) -> bytes:
    """``(field, filename, content type, payload)`` parts as a multipart/form-data body."""
    body = b""
    for field, filename, content_type, payload in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode("utf-8", "replace")
        if content_type:
            body += f"Content-Type: {content_type}\r\n".encode("utf-8", "replace")
        body += b"\r\n" + payload + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def field_value(rng: random.Random, field: str) -> bytes:
    valid = {"k": str(rng.randint(1, 100)), "id": str(rng.randint(0, 30)), "label": str(rng.randint(0, 9))}
    return (valid.get(field, "x") if rng.random() < 0.3 else odd_text(rng)).encode("utf-8", "surrogatepass")


def token(rng: random.Random, length: int = 8) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-_") for _ in range(rng.randint(1, length)))


def header_text(rng: random.Random) -> str:
    """A header value h11 accepts (visible ASCII, spaces, obs-text) but the application may not expect."""
    alphabet = [chr(c) for c in range(0x21, 0x7F)] + [" ", "\u00e9", "\u00ff"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))).strip()


def case_multipart(rng):
    boundary = rng.choice([uuid.uuid4().hex, token(rng, 70), "a" * 70, "-"])
    parts = []
    if rng.random() < 0.8:
        data, _ = hostile_image(rng) if rng.random() < 0.7 else (image_bytes(rng, "PNG"), "plain")
        parts.append((rng.choice(["image", "image", "image", "img", ""]), rng.choice(["q.png", "", "..\\x.jpg", None]),
                      rng.choice(["image/png", "image/jpeg", "text/plain", "", None]), data))
    for field in rng.sample(["k", "id", "label", token(rng)], rng.randint(0, 3)):
        filename = "f.txt" if rng.random() < 0.1 else None
        parts.append((field, filename, None, field_value(rng, field)))
    body = multipart(parts, boundary)
    if rng.random() < 0.3:
        body = mutate(body, rng)
    content_type = rng.choice([f"multipart/form-data; boundary={boundary}"] * 6 + [
        "multipart/form-data", "multipart/form-data; boundary=", f"multipart/form-data; boundary=x{boundary}",
        "application/x-www-form-urlencoded", f"multipart/form-data; boundary=\"{boundary}\"; charset=\u00e9"])
    return "POST", "/search", {"Content-Type": content_type}, body


def case_raw(rng):
    data, _ = hostile_image(rng)
    content_type = rng.choice(["image/png", "image/jpeg", "image/webp", "application/octet-stream", "image/",
                               "text/plain", "application/json", "", header_text(rng)])
    return "POST", f"/search?k={rng.randint(1, 100)}", {"Content-Type": content_type}, data


def case_id(rng):
    text = str(rng.randint(-5, 40)) if rng.random() < 0.3 else odd_text(rng)
    if rng.random() < 0.5:
        quoted = urllib.parse.quote(text.encode("utf-8", "surrogatepass"), safe="")
        return rng.choice(["GET", "HEAD"]), f"/images/{quoted}", {}, None
    body = urllib.parse.urlencode({"id": text.encode("utf-8", "surrogatepass")}).encode()
    return "POST", "/search", {"Content-Type": "application/x-www-form-urlencoded"}, body


def case_k(rng):
    text = odd_text(rng) if rng.random() < 0.8 else str(rng.randint(-10, 200))
    data = image_bytes(rng, "PNG", (8, 8))
    if rng.random() < 0.5:
        query = urllib.parse.quote(text.encode("utf-8", "surrogatepass"), safe="")
        return "POST", f"/search?k={query}", {"Content-Type": "image/png"}, data
    boundary = uuid.uuid4().hex
    body = multipart([("image", "q.png", "image/png", data), ("k", None, None, text.encode("utf-8", "surrogatepass"))],
                     boundary)
    return "POST", "/search", {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body


def case_headers(rng):
    method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    path = rng.choice(["/", "/search", "/info", "/images/1", "/images/", f"/{token(rng)}", "/search/",
                       "//search", "/search?" + token(rng) + "=" + token(rng)])
    headers = {token(rng, 20).title(): header_text(rng) for _ in range(rng.randint(0, 6))}
    headers["Content-Type"] = rng.choice(["image/png", "multipart/form-data; boundary=b", header_text(rng)])
    for name in rng.sample(["Accept", "Accept-Encoding", "Content-Encoding", "Expect", "Range", "Origin"],
                           rng.randint(0, 3)):
        headers[name] = header_text(rng)
    body = image_bytes(rng, "PNG", (8, 8)) if method in ("POST", "PUT", "PATCH") and rng.random() < 0.7 else None
    return method, path, headers, body


def case_oversize(rng):
    size = MAX_BODY_MB * 2**20 + rng.randint(1, 300_000)
    return "POST", "/search", {"Content-Type": rng.choice(["image/png", "multipart/form-data; boundary=b"])}, \
        b"\x89PNG" + bytes(size)


SURFACES = {"multipart bodies": (case_multipart, 0.33), "raw bodies and content types": (case_raw, 0.2),
            "ids": (case_id, 0.15), "k": (case_k, 0.1), "methods, paths and headers": (case_headers, 0.17),
            "bodies over the limit": (case_oversize, 0.05)}


def generate(seed: int, count: int) -> list[tuple[str, tuple]]:
    rng = random.Random(seed)
    names = list(SURFACES)
    weights = [SURFACES[n][1] for n in names]
    return [(name, SURFACES[name][0](rng)) for name in rng.choices(names, weights, k=count)]


def send(port: int, request) -> tuple[int | None, bytes, str | None]:
    """``(status, body, transport error)``; a request the server cut short while it was sent has no status."""
    method, path, headers, body = request
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_SECONDS)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read(), None
    except TimeoutError:
        return None, b"", "timeout"
    except (ConnectionError, http.client.HTTPException) as exc:
        return None, b"", type(exc).__name__
    finally:
        connection.close()


def memory_kib(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))


@pytest.fixture(scope="module")
def fuzzed_server(index_file):
    process, _, port = start_server(index_file, "--max_body_mb", str(MAX_BODY_MB), "--max_pixels", str(MAX_PIXELS),
                                    "--upload_seconds", "10")
    yield process, port
    process.terminate()
    process.wait(timeout=30)


def valid_search(port: int) -> dict:
    boundary = uuid.uuid4().hex
    body = multipart([("image", "q.png", "image/png", image_bytes(random.Random(0), "PNG", (16, 16)))], boundary)
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, payload, error = send(port, ("POST", "/search?k=3", headers, body))
    assert status == 200, (status, payload[:200], error)
    return json.loads(payload)


def test_generated_requests_never_get_a_5xx_or_hang(fuzzed_server, record_property):
    process, port = fuzzed_server
    expected = valid_search(port)
    idle_kib = memory_kib(process.pid, "VmRSS")
    cases = generate(SEED, REQUESTS)
    outcomes, failures, lock = collections.Counter(), [], threading.Lock()
    pending = iter(enumerate(cases))

    def worker():
        while True:
            with lock:
                item = next(pending, None)
            if item is None:
                return
            number, (surface, request) = item
            status, body, error = send(port, request)
            problem = None
            if status is None:
                # the server may close a connection whose body is over the limit before it is all sent
                if not (surface == "bodies over the limit" and error != "timeout"):
                    problem = f"no answer ({error})"
            elif status >= 500:
                problem = f"HTTP {status}: {body[:160]!r}"
            elif status >= 400 and request[0] != "HEAD":
                try:
                    message = json.loads(body)["error"]
                    if not message or "\n" in message:
                        problem = f"HTTP {status} with a bad error line {message!r}"
                except (ValueError, KeyError, TypeError):
                    problem = f"HTTP {status} without a JSON error: {body[:160]!r}"
            with lock:
                outcomes[(surface, status if status is not None else error)] += 1
                if problem:
                    failures.append(f"case {number} ({surface}, {request[0]} {request[1][:60]}): {problem}")

    threads = [threading.Thread(target=worker) for _ in range(SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    per_surface = collections.Counter(surface for surface, _ in cases)
    summary = ", ".join(f"{surface} {count}" for surface, count in per_surface.items())
    statuses = collections.Counter()
    for (_, status), count in outcomes.items():
        statuses[status] += count
    peak_kib = memory_kib(process.pid, "VmHWM")
    record_property("fuzz cases", f"HTTP: {len(cases)} requests ({summary}); answers "
                    f"{dict(sorted(statuses.items(), key=str))}; server RSS {idle_kib / 1024:.0f} MiB before, "
                    f"peak {peak_kib / 1024:.0f} MiB")
    assert not failures, f"{len(failures)} of {len(cases)} requests failed:\n" + "\n".join(failures[:20])
    assert sum(outcomes.values()) == REQUESTS
    assert valid_search(port)["results"] == expected["results"]
    assert peak_kib - idle_kib <= RSS_BUDGET_MIB * 1024, \
        f"server RSS grew from {idle_kib / 1024:.0f} MiB to a peak of {peak_kib / 1024:.0f} MiB"
    assert process.poll() is None
