"""Which files a database or an index may hand out: images of its collection, and nothing else.

Databases and id maps are files people download and share, so the paths they hold are untrusted.
A stored path is resolved against the folder of the database or index file (never the working
directory), symlinks are followed to the file they reach, and the file is handed out only when
that real file lies under the collection root recorded when the database was written and it
opens as an image. The root itself is checked once, at start: a root of ``/`` or a system folder
would make every file of the machine "part of the collection", so it is refused with the reason.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from reir.data.tarshards import MEMBER_SEPARATOR, is_sample_path, sample_image_bytes
from reir.errors import ReirError
from reir.retrieval.index_common import ROOT_KEY, common_folder

# A collection root at or below one of these is the machine's own files, never a collection.
SYSTEM_TREES = ("/etc", "/proc", "/sys", "/dev", "/boot", "/run", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
                "/usr", "/root", "/var/lib", "/var/log", "/var/run", "/snap")
# A collection root equal to one of these holds everyone's files, not a collection.
SHARED_FOLDERS = ("/", "/home", "/tmp", "/var", "/mnt", "/media", "/opt", "/srv", "/Users", "/private")
# Files larger than this are not handed out whole (no image of a collection is near it).
MAX_FILE_BYTES = 64 * 2**20


def recorded_root(paths: list[str]) -> str:
    """The root to record for a collection of absolute paths: their deepest common folder, symlinks resolved
    in the folder itself only (a symlinked image pointing elsewhere does not widen it)."""
    folders = [p.rpartition(MEMBER_SEPARATOR)[0] if is_sample_path(p) else p for p in paths]
    root = common_folder(folders)
    return os.path.realpath(root) if root else ""


def root_problem(root: str) -> str | None:
    """Why ``root`` (not empty) cannot be a collection root, or ``None`` when it can."""
    real = os.path.realpath(root)
    if real in SHARED_FOLDERS or root in SHARED_FOLDERS:
        return f"its collection root is {real}, a folder of the whole machine"
    for tree in SYSTEM_TREES:
        if any(candidate == tree or candidate.startswith(tree + "/") for candidate in (real, root)):
            return f"its collection root {real} is a system folder"
    return None


class CollectionFiles:
    """The images a database or an index may hand out, by stored path.

    ``base`` is the folder of the database or index file (relative stored paths are resolved
    against it; without one they are refused), ``root`` the recorded collection root (when none is
    recorded, as in files written before roots were recorded, the common folder of the stored
    paths; when they share none, nothing is handed out). A root that is ``/`` or a system folder raises
    :class:`ReirError`.
    """

    def __init__(self, paths: Sequence[str], root: str | None, base: str | os.PathLike | None, what: str = "the index"):
        self.base = os.path.realpath(base) if base is not None else None
        if isinstance(root, str) and root:
            chosen = self.absolute(root) or ""
        else:
            chosen = common_folder(p for p in (self.absolute(s) for s in paths) if p)
        problem = root_problem(chosen) if chosen else None
        if problem:
            raise ReirError(f"{what} cannot be served: {problem}; rebuild it from a folder of images "
                            "(reir embed `images` FOLDER, then reir index)")
        # no root at all (no paths, or paths sharing no folder): no image is handed out
        self.root = os.path.realpath(chosen) if chosen else None

    def absolute(self, stored: str) -> str | None:
        """A stored path made absolute against the base folder, symlinks not yet followed; ``None`` if relative
        without a base."""
        if not isinstance(stored, str) or not stored or "\0" in stored:
            return None
        if os.path.isabs(stored):
            return os.path.normpath(stored)
        return os.path.normpath(os.path.join(self.base, stored)) if self.base else None

    def inside(self, real: str) -> bool:
        return self.root is not None and real.startswith(self.root.rstrip("/") + "/")

    def image(self, stored: str) -> tuple[bytes, str] | None:
        """``(bytes, content type)`` of a stored path's image, or ``None`` when it is outside the collection,
        missing, too large or not an image (the caller says only "not found")."""
        data: bytes | None
        path = self.absolute(stored)
        if path is None:
            return None
        if is_sample_path(path):
            shard, _, key = path.rpartition(MEMBER_SEPARATOR)
            if not self.inside(os.path.realpath(shard)):
                return None
            try:
                data = sample_image_bytes(os.path.realpath(shard) + MEMBER_SEPARATOR + key, MAX_FILE_BYTES)[0]
            except OSError:
                return None
        else:
            data = self.read_inside(path)
        if data is None:
            return None
        content_type = image_type(data)
        return (data, content_type) if content_type else None

    def read_inside(self, path: str) -> bytes | None:
        """The bytes of the file at ``path`` if the file opened (after every symlink) lies under the root."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return None
        try:
            # the file actually opened, so a symlink swapped in between a check and the open cannot escape
            opened = f"/proc/self/fd/{fd}"
            real = os.readlink(opened) if os.path.islink(opened) else os.path.realpath(path)
            found = os.fstat(fd)
            if not self.inside(real) or not stat.S_ISREG(found.st_mode) or found.st_size > MAX_FILE_BYTES:
                return None
            with os.fdopen(os.dup(fd), "rb") as file:
                return file.read(MAX_FILE_BYTES + 1)[:MAX_FILE_BYTES]
        except OSError:
            return None
        finally:
            os.close(fd)


def image_type(data: bytes) -> str | None:
    """The content type of ``data`` from the image format it decodes as, or ``None`` when it is no image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            return Image.MIME.get(image.format)
    except Exception:  # noqa: BLE001 - whatever PIL raises on a non-image, the answer is "not an image"
        return None


def collection_files(paths: Sequence[str], info: dict, source: str | os.PathLike | None, what: str) -> CollectionFiles:
    """The files of a database or an index read from ``source`` (its file or sharded folder, whose parent
    folder relative paths are resolved against)."""
    base = Path(source).absolute().parent if source is not None else None
    return CollectionFiles(paths, info.get(ROOT_KEY), base, what)
