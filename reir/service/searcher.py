"""The searcher: an image (or a database id) -> ranked database images, and the client errors it raises."""

import contextlib
import functools
import io
import os
import threading

from PIL import Image

from reir.data.images import MAX_PIXELS, ImageError, read_image
from reir.errors import ReirError
from reir.model.embedding import embed
from reir.model.files import Model
from reir.retrieval.collection_files import collection_files
from reir.retrieval.database import UNLABELLED
from reir.retrieval.index_common import SearchIndex

# Pixels decoded at once by all requests together: an image holds about 7 bytes a pixel while it is
# decoded, converted to RGB and resized (up to 4 decoded, 3 RGB), so one budget of 40 MP keeps a
# server's decoding under about 300 MiB however many uploads arrive together.
PIXEL_BUDGET = 40_000_000
# After an image this large, freed memory is handed back to the system at once.
TRIM_PIXELS = 2_000_000
# How long an image waits for its pixels to fit the budget before the request is answered 503.
PIXEL_WAIT_SECONDS = 10.0


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


class PixelBudget:
    """Pixels of images being decoded, bounded as a total shared by every request.

    A request takes its image's pixels (read from the header) before decoding and gives them back
    when the full-size image is gone; one that cannot get them within ``PIXEL_WAIT_SECONDS`` is
    answered 503. An image never asks for more than the budget (``max_pixels`` is at most it).
    """

    def __init__(self, total: int, wait_seconds: float = PIXEL_WAIT_SECONDS):
        self.total = total
        self.free = total
        self.wait_seconds = wait_seconds
        self.changed = threading.Condition()

    @contextlib.contextmanager
    def claim(self):
        claim = PixelClaim(self)
        try:
            yield claim
        finally:
            if claim.pixels:
                with self.changed:
                    self.free += claim.pixels
                    self.changed.notify_all()
                if claim.pixels >= TRIM_PIXELS:
                    release_freed_memory()

    def acquire(self, pixels: int) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: self.free >= pixels, self.wait_seconds):
                raise BadRequest(503, f"the images being decoded fill the budget of {self.total / 1e6:g} "
                                      "megapixels; retry shortly")
            self.free -= pixels


class PixelClaim:
    """One request's share of a :class:`PixelBudget`; ``take(width, height)`` is the decode gate."""

    def __init__(self, budget: PixelBudget):
        self.budget = budget
        self.pixels = 0

    @contextlib.contextmanager
    def take(self, width: int, height: int):
        self.budget.acquire(width * height)
        self.pixels = width * height
        yield  # the pixels stay taken after the decode: the claim gives them back


def release_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps large freed buffers otherwise), so a burst of
    large uploads leaves the process near its idle size."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to trim


class Searcher:
    """The model and the index: an image (or a database id) -> ranked database images."""

    def __init__(self, model: Model, index: SearchIndex, max_pixels: int = MAX_PIXELS, expose_paths: bool = False,
                 source: str | os.PathLike | None = None):
        """``source`` is the index file or database the index was read from: relative stored paths are
        resolved against its folder (without one they are not served)."""
        self.model = model
        self.index = index
        self.max_pixels = max_pixels
        self.expose_paths = expose_paths
        self.files = collection_files(index.paths, index.info, source, "the index")
        self.root = self.files.root
        self.transform = model.transform
        self.pixels = PixelBudget(max(PIXEL_BUDGET, max_pixels))
        if index.dim != model.embedding_shape[0] * model.embedding_shape[1]:
            raise ReirError(f"the index holds vectors of dimension {index.dim} but the model embeds "
                            f"{model.embedding_shape[0] * model.embedding_shape[1]}; "
                            "serve the model the index was built from")

    def decode(self, data, gate=None) -> Image.Image:
        """Bytes, a binary file or a path -> RGB image, refusing empty, non-image, truncated and too-large uploads.

        ``gate(width, height)`` is held while the pixels are decoded (see :meth:`prepare`)."""
        source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        if hasattr(source, "seek") and source.seek(0, os.SEEK_END) == 0:
            raise BadRequest(400, "the upload is empty; send an image file")
        if hasattr(source, "seek"):
            source.seek(0)
        try:
            return read_image(source, self.max_pixels, gate=gate)
        except ImageError as exc:
            if exc.kind == "too_large" and exc.size:
                width, height = exc.size
                raise BadRequest(413, f"the image is {width}x{height} = {width * height / 1e6:.1f} megapixels; "
                                      f"the limit is {self.max_pixels / 1e6:g} megapixels") from None
            if exc.kind == "too_large":
                raise BadRequest(413, f"the image has too many pixels; the limit is {self.max_pixels / 1e6:g} "
                                      "megapixels") from None
            if exc.kind == "not_image":
                raise BadRequest(415, "the upload is not an image PIL can read (JPEG, PNG, WebP, ...)") from None
            raise BadRequest(400, f"the image cannot be decoded ({exc.reason}); it may be truncated") from None

    def database_id(self, text) -> int:
        """A database id from a client's text: ASCII decimal, within the index."""
        image_id = parse_decimal(text, "a database image id", status=404)
        if image_id >= len(self.index):
            raise BadRequest(404, f"no database image has id {str(text)[:20]!r}; ids are 0 to {len(self.index) - 1}")
        return image_id

    def database_image(self, text: str) -> tuple[bytes, str]:
        """``(bytes, content type)`` of a database image: only an image file under the collection root."""
        image_id = self.database_id(text)
        found = self.files.image(self.index.paths[image_id])
        if found is None:
            raise BadRequest(404, f"database image {image_id} cannot be served: it is not an image file "
                                  "inside the indexed collection (or no longer on disk)")
        return found

    def name(self, image_id: int) -> str:
        """What a client sees of a database image's path: relative to the collection root unless exposed."""
        path = self.index.paths[image_id]
        if self.expose_paths or not path:
            return path
        absolute = self.files.absolute(path) or path
        if self.root is None or not os.path.isabs(absolute):
            return os.path.basename(path)
        relative = os.path.relpath(absolute, self.root)
        return os.path.basename(path) if relative.startswith("..") else relative

    def prepare(self, data):
        """Decoded and transformed: ``(tensor [3, S, S], width, height)``.

        The image's pixels are taken from the shared budget once its header is read and given back only
        when the full-size image is gone, so the budget bounds every decoded pixel in memory."""
        with self.pixels.claim() as claim:
            image = self.decode(data, claim.take)
            width, height = image.size
            tensor = self.transform(image)
            del image
        return tensor, width, height

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
