"""A FAISS index file's own claims (dimension, vector count, array lengths) checked against its size and its
id map before FAISS reads it.

FAISS trusts the lengths a file states: it allocates what a length field claims and only then finds
the file shorter, so a 941-byte file claiming a 2**28-float array costs 1 GiB before the refusal.
Index files are shared like any other, so their claims are checked here first. The walk covers the
layouts REIR writes whole (Flat, HNSW over Flat); any other layout has its header checked (dimension
and count against the id map and the file size), its arrays then being FAISS's to read.
"""

from __future__ import annotations

import struct

from reir.errors import ReirError

FLAT = (b"IxFI", b"IxF2", b"IxFl")
HNSW_FLAT = (b"IHNf",)
MAX_DIM = 1 << 16


class _Cursor:
    def __init__(self, data: bytes, path):
        self.data, self.position, self.path = data, 0, path

    def take(self, size: int) -> bytes:
        if size < 0 or self.position + size > len(self.data):
            self.refuse(f"it ends {self.position + size - len(self.data)} bytes early" if size >= 0
                        else "a length is negative")
        chunk = self.data[self.position:self.position + size]
        self.position += size
        return chunk

    def unpack(self, form: str):
        return struct.unpack("<" + form, self.take(struct.calcsize("<" + form)))[0]

    def array(self, element: int, expected: int | None = None, what: str = "an array") -> int:
        """Skips an array (its length, then its elements): its length, refused when the file cannot hold it."""
        length = self.unpack("Q")
        if length * element > len(self.data) - self.position:
            self.refuse(f"{what} claims {length:,} elements, more than the {len(self.data):,}-byte file holds")
        if expected is not None and length != expected:
            self.refuse(f"{what} holds {length:,} elements where its header implies {expected:,}")
        self.position += length * element
        self.last = (self.position - length * element, length)
        return length

    def last_ints(self):
        """The elements of the array just skipped, as int32 (no copy)."""
        import numpy as np

        start, length = self.last
        return np.frombuffer(self.data, dtype="<i4", count=length, offset=start)

    def refuse(self, reason: str):
        raise ReirError(f"index {self.path} is damaged or not written by REIR ({reason}); rebuild it with reir index")


def check_faiss_layout(data: bytes, dim: int, count: int, path) -> None:
    """Refuses ``data`` (a FAISS index file) unless its dimension and vector count are the id map's and every
    array it states fits in the file; nothing is allocated on its claims."""
    _check_index(_Cursor(data, path), dim, count)


def _check_index(cursor: _Cursor, dim: int, count: int) -> None:
    fourcc = cursor.take(4)
    d, ntotal = cursor.unpack("i"), cursor.unpack("q")
    cursor.take(8 + 8 + 1)  # two unused fields and is_trained
    if cursor.unpack("i") > 1:  # a metric with an argument
        cursor.take(4)
    if not 0 < d <= MAX_DIM or d != dim:
        cursor.refuse(f"dimension {d}, where its id map says {dim}")
    if ntotal != count:
        cursor.refuse(f"{ntotal:,} vectors, where its id map lists {count:,}")
    if fourcc in FLAT:
        cursor.array(4, d * ntotal, "the vector array")
    elif fourcc in HNSW_FLAT:
        cursor.array(8, None, "the level probabilities")
        cursor.array(4, None, "the neighbours per level")
        cursor.array(4, ntotal, "the levels")
        cursor.array(8, ntotal + 1, "the offsets")
        cursor.array(4, None, "the neighbours")
        neighbours = cursor.last_ints()
        if len(neighbours) and not (int(neighbours.min()) >= -1 and int(neighbours.max()) < ntotal):
            cursor.refuse(f"its graph links to vectors outside 0..{ntotal - 1}")
        entry_point = cursor.unpack("i")
        if not -1 <= entry_point < max(ntotal, 1):
            cursor.refuse(f"its graph's entry point {entry_point} is not one of its {ntotal:,} vectors")
        cursor.take(4 * 4)  # top level, efConstruction, efSearch, an unused field
        _check_index(cursor, dim, count)
