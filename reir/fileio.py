"""Atomic, pickle-free file I/O.

Every file REIR writes goes through :func:`atomic_write`: a temporary file in the
destination folder, fsync, then rename, so a crash never leaves a truncated file
under the final name and a failed run never replaces an earlier good one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from reir.errors import ReirError

METADATA_KEY = "reir"
# The safetensors layout: an 8-byte little-endian header length, a JSON header, then the tensors' bytes.
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
          torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
# mkstemp creates files only the owner can read; finished files get the usual permissions.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def ensure_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReirError(f"cannot create folder {path}: {exc.strerror}; choose a writable --output_dir") from None
    return path


@contextlib.contextmanager
def _temporary_sibling(path: Path, prefix: str, suffix: str) -> Iterator[tuple[int, str]]:
    """A new temporary file beside ``path``, renamed onto it when the block succeeds.

    On any failure the temporary file is removed and ``path`` is left as it was.
    """
    folder = ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    except OSError as exc:
        raise ReirError(f"cannot write in {folder}: {exc.strerror}; choose a writable folder") from None
    try:
        yield fd, tmp
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise ReirError(f"cannot write {path}: {exc.strerror}; free space or choose another folder") from None
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(folder)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of ``path``; on success fsync and rename it into place."""
    path = Path(path)
    with _temporary_sibling(path, f".{path.name}.", ".tmp") as (fd, _):
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as handle:
            os.fchmod(handle.fileno(), FILE_MODE)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    with atomic_open(path, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def atomic_write_with(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """For libraries that only write to a filename (PIL, matplotlib): write to a temp name, then rename."""
    path = Path(path)
    with _temporary_sibling(path, f".{path.stem}.", path.suffix) as (fd, tmp):
        os.close(fd)
        os.chmod(tmp, FILE_MODE)
        writer(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
    return path


@contextlib.contextmanager
def atomic_files(main: str | os.PathLike) -> Iterator[Path]:
    """For a writer that puts companions beside ``main`` (ONNX with its external weights).

    It writes to the yielded path, in a hidden folder beside ``main``, and may add files that
    name each other as siblings. On success each is fsynced and renamed into place, ``main`` last,
    so ``main`` never names a companion that is not there yet; on failure nothing is replaced.
    """
    main = Path(main)
    folder = ensure_dir(main.parent)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{main.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise ReirError(f"cannot write in {folder}: {exc.strerror}; choose a writable folder") from None
    try:
        yield staging / main.name
        files = sorted(staging.iterdir(), key=lambda f: f.name == main.name)
        for file in files:
            os.chmod(file, FILE_MODE)
            with open(file, "rb+") as handle:
                os.fsync(handle.fileno())
        for file in files:
            os.replace(file, folder / file.name)
        _fsync_dir(folder)
    except OSError as exc:
        raise ReirError(f"cannot write {main}: {exc.strerror}; free space or choose another folder") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise ReirError(f"{what} {path} does not exist; check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReirError(f"{what} {path} is not valid JSON ({exc}); regenerate it") from None
    except RecursionError:
        raise ReirError(f"{what} {path} nests its JSON deeper than any REIR file does; regenerate it") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: Any) -> Path:
    """A safetensors file whose JSON metadata travels inside it, streamed tensor by tensor.

    The header is computed from shapes alone; each tensor's bytes then go to the file straight
    from its own storage (a device tensor is copied to the host one at a time), so writing costs
    no second copy of the state, however large.
    """
    header: dict[str, Any] = {"__metadata__": {METADATA_KEY: json.dumps(metadata)}}
    offset = 0
    for key, tensor in tensors.items():
        if tensor.dtype not in DTYPES:
            raise TypeError(f"cannot store {tensor.dtype} tensor {key!r} in a safetensors file")
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
    with atomic_open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded)
        for tensor in tensors.values():
            if tensor.numel():
                handle.write(_raw_bytes(tensor.detach().cpu().contiguous()))
    return Path(path)


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying them."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def load_tensors(path: str | os.PathLike, what: str = "file") -> tuple[dict[str, torch.Tensor], Any]:
    """Load a file written by :func:`save_tensors`; anything else (a pickle included) is refused.

    The tensors are private memory maps of the file: pages are read when touched and copied only
    when written, so a resume does not hold the file in memory beside the tensors built from it.
    """
    path = Path(path)
    if not path.is_file():
        raise ReirError(f"{what} {path} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
            tensors = handle.get_tensors()
    except (SafetensorError, OSError, ValueError) as exc:
        raise ReirError(f"{what} {path} is not a REIR safetensors file ({str(exc).splitlines()[0]}); "
                        "only safetensors files written by REIR are loaded") from None
    if raw is None:
        raise ReirError(f"{what} {path} has no REIR metadata; only files written by REIR are loaded")
    try:
        return tensors, json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ReirError(f"{what} {path} has damaged REIR metadata ({reason}); only files written by REIR "
                        "are loaded") from None


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
