"""Atomic, pickle-free file I/O, and the rules every output obeys.

Every file REIR writes goes through :func:`atomic_write`: a temporary file in the
destination folder, fsync, then rename, so a crash never leaves a truncated file
under the final name and a failed run never replaces an earlier good one.

Before a command does any work it claims its outputs with :func:`claim_output`: an output that
is one of its inputs, or an existing file the command did not write itself (its recorded format,
:func:`recorded_format`, is not one the command writes), is refused unless the caller passes
``overwrite``. A command that runs for long holds :class:`OutputLock` on its output, so a second
run on the same output refuses at once instead of mixing its files with the first one's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from reir.errors import ReirError, UsageError

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
        raise ReirError(f"cannot create folder {path}: {exc.strerror}; choose a writable `output_dir`") from None
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
    with (_temporary_sibling(path, f".{path.name}.", ".tmp") as (fd, _),
          os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8",
                    newline=None if "b" in mode else "") as handle):
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
def atomic_files(main: str | os.PathLike, record: str | None = None) -> Iterator[Path]:
    """For a writer that puts companions beside ``main`` (ONNX with its external weights, its JSON record).

    It writes to the yielded path, in a hidden folder beside ``main``, and may add files that
    name each other as siblings. On success each is fsynced and renamed into place: the companions,
    then ``main``, then the file named ``record`` (which describes the others), so ``main`` never
    names a companion that is not there yet; on failure nothing is replaced. Companions must not reuse
    the names of an earlier artifact's companions (name them by their content), or a crash between two
    renames would pair the old ``main`` with new companions.
    """
    main = Path(main)
    folder = ensure_dir(main.parent)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{main.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise ReirError(f"cannot write in {folder}: {exc.strerror}; choose a writable folder") from None
    try:
        yield staging / main.name
        files = sorted(staging.iterdir(), key=lambda f: (f.name == record, f.name == main.name))
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


def replace(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename ``source`` (a finished file or folder) onto ``target`` in one step and make the rename durable."""
    try:
        os.replace(source, target)
    except OSError as exc:
        raise ReirError(f"cannot write {target}: {exc.strerror}; free space or choose another folder") from None
    _fsync_dir(Path(target).parent)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# The largest JSON record read to learn a file's format; REIR's records are far smaller, anything
# larger is not one of them.
RECORD_BYTES = 64 * 2**20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The PNG text chunk in which REIR records the format of a picture it drew.
FORMAT_CHUNK = "reir-format"
# How a REIR HTML page records its format, in its first kilobytes.
HTML_FORMAT = re.compile(rb'<meta name="reir-format" content="([^"]+)"')


def recorded_format(path: str | os.PathLike) -> str | None:
    """The format REIR recorded in an existing output, or ``None`` when it recorded none.

    Each container keeps it in its own place: a safetensors file in its REIR metadata, a JSON file
    in its ``format`` key, a folder in its ``manifest.json``, a PNG in its ``reir-format`` text chunk,
    an HTML page in its ``reir-format`` meta tag. Files of other formats (a FAISS index, an ONNX
    graph) are described by a JSON record beside them, which their writer names to :func:`claim_output`.
    """
    path = Path(path)
    if path.is_dir():
        return recorded_format(path / "manifest.json") if (path / "manifest.json").is_file() else None
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        return None
    found: Any = None
    if head.startswith(PNG_SIGNATURE):
        from PIL import Image, UnidentifiedImageError

        with contextlib.suppress(OSError, UnidentifiedImageError, ValueError), Image.open(path) as image:
            found = image.info.get(FORMAT_CHUNK)
    elif (match := HTML_FORMAT.search(head)) is not None:
        found = match.group(1).decode("ascii", "replace")
    elif len(head) >= 9 and head[8:9] == b"{":  # a safetensors header
        with contextlib.suppress(SafetensorError, OSError, ValueError), safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get(METADATA_KEY, "null"))
            found = meta.get("format") if isinstance(meta, dict) else None
    elif head.lstrip()[:1] == b"{" and size <= RECORD_BYTES:
        with contextlib.suppress(OSError, UnicodeDecodeError, ValueError, RecursionError):
            record = json.loads(path.read_text(encoding="utf-8"))
            found = record.get("format") if isinstance(record, dict) else None
    return found if isinstance(found, str) else None


def claim_output(output: str | os.PathLike, formats: Iterable[str], *, inputs: Iterable[str | os.PathLike] = (),
                 overwrite: bool = False, record: str | os.PathLike | None = None,
                 setting: str = "overwrite") -> Path:
    """Refuse, before any work, an output that would destroy something the command did not make.

    ``output`` may not be one of ``inputs`` (the same file, by inode, or the same folder) nor lie
    inside an input folder, whatever ``overwrite`` says. An existing ``output`` is the command's own
    when its recorded format (read from ``record``, by default the output itself) is one of
    ``formats``; anything else (a file of another kind, a user's notes) is replaced only with
    ``overwrite``. ``setting`` is how the caller's user sets ``overwrite``, named in the error.
    """
    output = Path(output)
    target = Path(os.path.abspath(output))
    for source in inputs:
        source = Path(source)
        if not source.exists():
            continue
        same = output.exists() and os.path.samefile(output, source)
        inside = source.is_dir() and Path(os.path.realpath(target)).is_relative_to(os.path.realpath(source))
        if same or inside:
            where = "is" if same else "lies inside"
            raise UsageError(f"output {output} {where} the input {source}; choose an output outside the inputs")
    record = Path(record) if record is not None else output
    if (output.exists() or record.exists()) and not overwrite:
        found = recorded_format(record) if record.exists() else None
        if found not in set(formats):
            kind = f"a {found} file" if found else "not a file this command wrote"
            raise UsageError(f"{output} already exists and is {kind}; set {setting} to replace it "
                             "or choose another output")
    return output


class OutputLock:
    """An exclusive ``flock`` on ``path`` while a command writes one output; the kernel drops it if the process dies.

    A second writer is refused at once, with the process id the holder recorded in the lock file. The
    file is removed on release, and so are the folders taking it made if the run left them empty (a run
    refused early leaves nothing behind); a writer that locked a file removed meanwhile locks the new one.
    """

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None
        self._made: list[Path] = []

    def __enter__(self) -> OutputLock:
        self._made = [folder for folder in [self.path.parent, *self.path.parent.parents] if not folder.exists()]
        ensure_dir(self.path.parent)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ReirError(f"cannot lock {self.path}: {exc.strerror}; choose a writable folder") from None
                self._remove_made_folders()
                raise UsageError(f"{self.what} is being written by another process (pid {holder}, holding "
                                 f"{self.path}); wait for it to finish or choose another output") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and removed it between our open and lock: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            _remove_quietly(str(self.path))
            os.close(self._fd)
            self._fd = None
            self._remove_made_folders()

    def _remove_made_folders(self) -> None:
        for folder in self._made:  # deepest first; one that holds anything stays, and so do those above it
            try:
                folder.rmdir()
            except OSError:
                return


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
        header[key] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
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
    return tensor.reshape(-1).view(torch.uint8).numpy().data


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
