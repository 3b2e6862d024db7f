"""Finding a query in a database and ranking the database for it: what ``reir search`` (the original's
``inference.py``) does before it draws."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from reir.data.images import MAX_PIXELS, ImageError, read_image
from reir.errors import ReirError
from reir.model.embedding import embed
from reir.model.files import find_model, load_model, model_candidates
from reir.model.original import convert_model_beside
from reir.retrieval.database import Database
from reir.retrieval.results import PAD, Results
from reir.retrieval.similarity import knn


def search_split(db: Database, data_type: str) -> str:
    """The split results come from: train, or the test set (the gallery when there is one)."""
    if data_type == "train":
        return "train"
    return db.eval_splits[-1]


def locate_query(db: Database, name: str, data_type: str) -> tuple[str, int] | None:
    """``(split, index)`` of the query in the database, or ``None`` when it is not there.

    Paths are compared as absolute paths. A name that is not an existing file (such as
    the original's ``data/car/uncropped/008055.jpg``) may also match the one database
    image with the same file name.
    """
    order = [search_split(db, data_type)] + [s for s in db.splits if s != search_split(db, data_type)]
    target = os.path.normpath(os.path.abspath(name))
    for split in order:
        for index, path in enumerate(db.paths(split)):
            if os.path.normpath(os.path.abspath(path)) == target:
                return split, index
    if Path(name).is_file():
        return None
    base = Path(name).name
    matches = [(s, i) for s in order for i, p in enumerate(db.paths(s)) if Path(p).name == base]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ReirError(f"query {name} does not exist and {len(matches)} database images are named {base}; "
                        "pass the full path of the image as stored in the database")
    raise ReirError(f"query {name} is neither an image file nor in the database; check `query_img_name`")


def model_path(db: Database, db_path: Path) -> Path:
    """The model file the database records, also looked for beside a moved output folder."""
    recorded = db.info.get("model_file")
    if not recorded:
        raise ReirError(f"database {db_path} records no model file, so it can only rank its own images; "
                        "retrain with the current train.py to query with other images")
    found = find_model(recorded, db_path)
    if found is not None:
        return found
    candidates = model_candidates(recorded, db_path)
    for candidate in candidates:  # the original's own model file, from a converted database
        original = candidate.with_name(candidate.name.removesuffix(".safetensors") + ".pth")
        if original.is_file():
            return convert_model_beside(original)
    raise ReirError(f"model file {recorded} of database {db_path} not found; put it back (or under "
                    f"{candidates[1].parent}) to query with images outside the database")


def embed_image(db: Database, db_path: Path, image_path: str, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """``[1, ensemble, meta]`` embedding of an image outside the database, as training embedded the rest.

    An image over ``max_pixels`` is refused from its header, before decoding (as the service does)."""
    try:
        image = read_image(image_path, max_pixels)
    except ImageError as exc:
        if exc.kind == "too_large":
            raise ReirError(f"{exc}; raise the limit with `max_pixels` if this image is wanted") from None
        raise
    features = embed(load_model(model_path(db, db_path)), [image])
    stored = next(iter(db.features.values())).shape[1:]
    if features.shape[1:] != stored:
        raise ReirError(f"model file of {db_path} embeds {tuple(features.shape[1:])} but the database holds "
                        f"{tuple(stored)}; the model was replaced after the database was written, retrain")
    return features


def rank(query: torch.Tensor, gallery: torch.Tensor, k: int, exclude: int | None = None) -> Results:
    """Top-``k`` gallery rows for one query; ``exclude`` (the query's own row) is never returned."""
    found = knn(query, gallery, k + (exclude is not None))
    return found.top(k, excluding=[PAD if exclude is None else exclude])
