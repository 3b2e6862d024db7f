"""Seeded generators of hostile and careless inputs: mutated bytes, broken images, odd text."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import random
import struct
import zlib

import numpy as np
from PIL import Image

# Text that looks like a number to str.isdigit or int() but is no ASCII decimal, and other traps.
ODD_TEXT = ["\u00b2", "\u2460", "\u0663", "\uff13", "3\u00b2", "-1", "+3", " 3", "3 ", "0x10", "1e3", "3.0",
            "", "00000000000000000000000000000000000001", "9" * 400, "NaN", "\x00", "3\x00", "../../etc/passwd",
            "%2e%2e", "\u202e3", "true", "[]", "{}", "null", "\ud7ff", "\U0001d7d1"]


def flip_bits(data: bytes, rng: random.Random, flips: int | None = None) -> bytes:
    """``data`` with a few random bits flipped."""
    if not data:
        return data
    mutated = bytearray(data)
    for _ in range(flips or rng.randint(1, 8)):
        position = rng.randrange(len(mutated))
        mutated[position] ^= 1 << rng.randrange(8)
    return bytes(mutated)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))] if data else data


def overwrite(data: bytes, rng: random.Random) -> bytes:
    """A random stretch replaced by random bytes (a wrong header when it hits the start)."""
    if not data:
        return data
    start = rng.choice([0, rng.randrange(len(data))])
    length = rng.randint(1, min(64, len(data) - start))
    return data[:start] + rng.randbytes(length) + data[start + length:]


def mutate(data: bytes, rng: random.Random) -> bytes:
    return rng.choice([flip_bits, truncate, overwrite])(data, rng)


def image_bytes(rng: random.Random, fmt: str, size: tuple[int, int] | None = None) -> bytes:
    width, height = size or (rng.randint(1, 48), rng.randint(1, 48))
    pixels = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but holds one short compressed row: a bomb claim."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def compression_bomb(rng: random.Random) -> bytes:
    """A real, complete PNG of thousands of pixels a side, one colour: a small file, a large decode."""
    return _blank_png(rng.choice([3000, 5000]))


@functools.cache
def _blank_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def hostile_image(rng: random.Random) -> tuple[bytes, str]:
    """``(bytes, description)``: a broken, huge or plain image in PNG, JPEG or WebP."""
    fmt = rng.choice(["PNG", "JPEG", "WEBP"])
    kind = rng.choice(["plain", "flipped", "flipped", "truncated", "truncated", "overwritten", "huge header",
                       "bomb", "empty", "random"])
    if kind == "huge header":
        width, height = rng.choice([2**31 - 1, 100_000, 65_535, 0]), rng.choice([2**31 - 1, 100_000, 1, 0])
        return png_header_only(width, height), kind
    if kind == "bomb":
        return compression_bomb(rng), kind
    if kind == "empty":
        return b"", kind
    if kind == "random":
        return rng.randbytes(rng.randint(1, 4096)), kind
    data = image_bytes(rng, fmt)
    if kind == "flipped":
        data = flip_bits(data, rng)
    elif kind == "truncated":
        data = truncate(data, rng)
    elif kind == "overwritten":
        data = overwrite(data, rng)
    return data, f"{kind} {fmt}"


def odd_text(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(ODD_TEXT)
    alphabet = "0123456789-+. /%\\\u00b2\u0663\u2460abc\u00e9\u4e00"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))


def claim_length(data: bytes, rng: random.Random) -> bytes:
    """A FAISS file with one 8-byte field (a length, a count) at an 8-aligned or header position made huge
    or negative: what a crafted index says to make its reader allocate."""
    if len(data) < 16:
        return data
    position = rng.choice([8, 37, 45, rng.randrange(0, len(data) - 8)])
    value = rng.choice([2**28, 2**40, 2**63 - 1, 2**64 - 1, rng.randrange(2**32)])
    return data[:position] + struct.pack("<Q", value) + data[position + 8:]


def mutate_index(data: bytes, rng: random.Random) -> bytes:
    return rng.choice([flip_bits, truncate, overwrite, claim_length, claim_length])(data, rng)


def crafted_pair(id_map: bytes, index_data: bytes) -> bytes:
    """The id map re-bound to ``index_data`` (its checksum and size recomputed), as someone crafting both files
    would write it: what is left to refuse the index is the check of its own layout."""
    document = json.loads(id_map)
    document["index_sha256"], document["index_bytes"] = hashlib.sha256(index_data).hexdigest(), len(index_data)
    return json.dumps(document).encode()
