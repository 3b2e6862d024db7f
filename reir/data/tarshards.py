"""WebDataset tar shards as an image collection: each sample is an image and, optionally, its label.

A WebDataset shard is a plain tar file whose members are grouped into samples by the name
before the first dot (``000123.jpg`` + ``000123.cls`` = sample ``000123``). Collections that
outgrow loose files are kept this way; shards are named with brace ranges
(``shards/{000000..000099}.tar``) and are the natural unit to split work by. Reading goes
through the ``webdataset`` package's tar iterator (no shuffling, no node splitting: the
caller decides which shard each process reads).
"""

from __future__ import annotations

import functools
import glob
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from reir.errors import ReirError

IMAGE_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
IMAGE_KEYS = tuple(IMAGE_TYPES)
MEMBER_SEPARATOR = "::"  # a sample's path: <tar file>::<sample key>


def is_shard_pattern(text: str) -> bool:
    """Whether a collection's ``images`` names tar shards (one file, a brace range or a glob), not a folder or CSV."""
    return text.rstrip("}").endswith(".tar") or (".tar" in text and any(c in text for c in "{*?["))


def expand_shards(pattern: str) -> list[Path]:
    """The tar files a pattern names, in order: brace ranges as WebDataset writes them, then globs."""
    import braceexpand

    files: list[Path] = []
    for name in braceexpand.braceexpand(pattern):
        matches = sorted(glob.glob(name)) if any(c in name for c in "*?[") else [name]
        files += [Path(m) for m in matches]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ReirError(f"`images` {pattern}: shard {missing[0]} does not exist"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                        + "; check the brace range or glob")
    if not files:
        raise ReirError(f"`images` {pattern} names no tar file; give e.g. 'shards/{{000000..000099}}.tar'")
    return files


def sample_label(sample: dict) -> str:
    """``cls`` (a class id as text) or ``json`` (its ``label`` or ``cls`` field); ``""`` when absent."""
    if "cls" in sample:
        return sample["cls"].decode("utf-8").strip()
    if "json" in sample:
        try:
            record = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            return ""
        if isinstance(record, dict):
            value = record.get("label", record.get("cls", ""))
            return "" if value is None else str(value)
    return ""


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB image; unreadable bytes raise :class:`ReirError` naming why."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError:
        raise ReirError("too many pixels to decode safely") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ReirError(f"cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def iter_samples(shard: Path) -> Iterator[tuple[str, Image.Image | None, str, str]]:
    """``(path, image, label, error)`` per sample of one shard, in tar order; ``image`` is ``None`` on error.

    A sample without an image, or whose image cannot be decoded, is reported with its error;
    a tar that breaks off midway reports the break as one error after the samples before it.
    """
    import webdataset

    broken: list[str] = []

    def note(exc: Exception) -> bool:
        broken.append(f"{shard} is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
        return False  # stop reading this tar

    stream = open(shard, "rb")  # noqa: SIM115 - the reader takes it inside a dict; closed in the finally below
    source = [{"url": str(shard), "stream": stream}]
    try:
        for sample in webdataset.tariterators.group_by_keys(
                webdataset.tariterators.tar_file_expander(source, handler=note), handler=note):
            path = f"{shard}{MEMBER_SEPARATOR}{sample['__key__']}"
            data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            if data is None:
                yield path, None, "", f"sample {path} has no {'/'.join(IMAGE_KEYS)} image"
                continue
            try:
                yield path, decode_image(data), sample_label(sample), ""
            except ReirError as exc:
                yield path, None, "", f"sample {path} {exc}"
    finally:
        stream.close()
    for error in broken:
        yield str(shard), None, "", error


def shard_fingerprint(shards: list[Path]) -> list:
    """What identifies the shards' content for resuming: path, size and modification time of each."""
    return [[str(s.resolve()), os.stat(s).st_size, os.stat(s).st_mtime_ns] for s in shards]


def is_sample_path(path: str | os.PathLike) -> bool:
    """Whether a database path names a sample inside a tar shard (``<tar file>::<key>``) rather than a file
    (a file of that very name wins)."""
    shard, separator, _ = str(path).rpartition(MEMBER_SEPARATOR)
    return bool(separator) and shard.endswith(".tar") and not os.path.exists(path)


@functools.lru_cache(maxsize=16)
def _image_members(shard: str, size: int, mtime_ns: int) -> dict[str, tuple[int, int, str]]:
    """``key -> (offset, size, extension)`` of a tar's image members, read once per version of the file."""
    from webdataset.tariterators import base_plus_ext  # the key rule the reader groups samples by

    table: dict[str, tuple[int, int, str]] = {}
    with tarfile.open(shard, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, extension = base_plus_ext(member.name)
            if key is not None and extension.lower() in IMAGE_KEYS and key not in table:
                table[key] = (member.offset_data, member.size, extension.lower())
    return table


def sample_image_bytes(path: str | os.PathLike, max_bytes: int | None = None) -> tuple[bytes, str]:
    """The image bytes of the sample ``<tar file>::<key>`` and their extension (``jpg``, ``png`` ...), read
    straight from the tar; a missing tar or key raises ``FileNotFoundError``, a broken tar or a member over
    ``max_bytes`` (read by nobody) ``OSError``."""
    shard, _, key = str(path).rpartition(MEMBER_SEPARATOR)
    stat = os.stat(shard)
    try:
        members = _image_members(shard, stat.st_size, stat.st_mtime_ns)
    except tarfile.TarError as exc:
        raise OSError(f"{shard} is not a readable tar ({exc})") from None
    if key not in members:
        raise FileNotFoundError(f"{shard} holds no image for sample {key}")
    offset, size, extension = members[key]
    if max_bytes is not None and size > max_bytes:
        raise OSError(f"sample {key} of {shard} is {size:,} bytes, over {max_bytes:,}")
    with open(shard, "rb") as file:
        file.seek(offset)
        data = file.read(size)
    if len(data) != size:
        raise OSError(f"{shard} ends inside sample {key}")
    return data, extension
