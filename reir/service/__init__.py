"""The HTTP search service and web page over a model and an index (``reir serve`` starts it).

Built on FastAPI (Starlette underneath) served by uvicorn: both are widely used, actively
maintained, asynchronous (many idle connections cost nothing while the model runs in a worker
thread) and small; python-multipart, Starlette's own form parser, reads uploads. Endpoints:

- ``POST /search``: an image (multipart field ``image``, or the raw body with an ``image/*``
  content type) or a database id (form field ``id``) -> the top-k database images as JSON;
- ``GET /images/<id>``: a database image by its id (ids only, never a path), only an image file under the
  collection root (:mod:`reir.retrieval.collection_files`);
- ``GET /``: a self-contained page to drop or pick an image and browse the results.

Every bad request gets a 4xx answer ``{"error": "<one line>"}``; bodies and images are
bounded (bytes before parsing, pixels before decoding, decoded pixels as one budget shared by all
requests), bodies are spooled to a temporary file (memory up to ``SPOOL_BYTES``, then disk) at a
minimum rate and within a time limit before the request takes a slot, and the number of requests
in flight is capped (beyond it a 503 with ``Retry-After``), so no client can take the service down.
With a key (``KeyRequired``), every request but the page must carry it.
Queries that arrive together go through the network together (``QueryBatcher``). Answers name
database images by id and by path relative to the collection root, never the server's file layout
unless ``expose_paths`` asks for it.
"""

from reir.service.app import BATCH_SIZE, BATCH_WINDOW_MS, DEFAULT_K, MAX_K, create_app
from reir.service.batcher import Busy, QueryBatcher
from reir.service.limits import MAX_BODY_BYTES, MAX_REQUESTS, SPOOL_BYTES, UPLOAD_SECONDS, BodyLimit
from reir.service.searcher import MAX_PIXELS, BadRequest, Searcher

__all__ = ["BATCH_SIZE", "BATCH_WINDOW_MS", "DEFAULT_K", "MAX_K", "create_app", "Busy", "QueryBatcher",
           "MAX_BODY_BYTES", "MAX_REQUESTS", "SPOOL_BYTES", "UPLOAD_SECONDS", "BodyLimit", "MAX_PIXELS",
           "BadRequest", "Searcher"]
