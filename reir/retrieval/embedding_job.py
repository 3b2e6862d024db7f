"""A model and a collection of images -> a feature database, resumable and shardable (``reir embed``).

The collection is a folder, a CSV (``path[,label]``), a prepared dataset or WebDataset tar
shards (``'shards/{000000..000099}.tar'``). Work is cut into fixed shards (``shard_size``
images, or one tar file each); each finished shard is written atomically under
``<output>.parts/`` as a database shard, so a killed run started again skips what is done and
ends with the same database as an uninterrupted one; started again with other arguments
(:class:`JobArguments`: model, inputs, splits, labels, image size, shard and batch size) it starts
afresh, so a database never mixes two jobs. Under ``torchrun`` rank ``r`` embeds shards
``r, r + W, ...``. At the end rank 0 either concatenates the shards into one file or, with
``shard_output`` or when one file would pass ``max_file_gb``, writes a manifest and moves the
folder of shards into place: then no process ever holds more than one shard. Images that cannot
be read are skipped, counted and listed, never fatal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from reir import distributed
from reir.errors import ReirError, UsageError
from reir.fileio import OutputLock, atomic_write, file_sha256, replace
from reir.model.files import Model
from reir.retrieval.collection_files import ROOT_KEY
from reir.retrieval.database import (
    MANIFEST,
    Database,
    gather,
    read_shard,
    read_shard_metadata,
    save_shard,
    write_manifest,
)

LISTED_FAILURES = 10  # unreadable images printed; the rest are in the database and a text file
# The first line of that text file: what tells a later job the file is its own to replace.
SKIPPED_HEADER = "# images reir embed could not read (path, tab, reason)\n"


@dataclass(frozen=True)
class JobArguments:
    """Everything a finished shard depends on, declared once: recorded in ``<output>.parts/job.json``, hashed
    into every shard's fingerprint and compared field by field when a job starts. A rerun with other arguments
    starts afresh (the earlier job's shards are removed and the differences printed), so a database never mixes
    shards of two jobs."""

    model: str  # the model file, resolved
    model_file: tuple[int, int]  # its size and modification time: a model retrained in place is another model
    image_size: int
    inputs: str  # the folder, CSV, dataset or tar pattern
    splits: tuple[str, ...]
    labelled: bool | None  # whether labels were read (None: tar samples carry their own)
    images: str = field(metadata={"digest": True})  # every image's split, path and label, or the tar files
    shard_size: int
    batch_size: int

    @classmethod
    def of(cls, model: Model, collection, shard_size: int, batch_size: int) -> JobArguments:
        stat = model.file().stat()
        described = collection.job_arguments()
        return cls(model=str(model.file().resolve()), model_file=(stat.st_size, stat.st_mtime_ns),
                   image_size=model.image_size, inputs=described["inputs"], splits=tuple(described["splits"]),
                   labelled=described["labelled"], images=described["images"], shard_size=shard_size,
                   batch_size=batch_size)

    def record(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples as the lists JSON gives back

    @property
    def key(self) -> str:
        """The fingerprint of a finished shard of this job."""
        return hashlib.sha256(json.dumps(self.record(), separators=(",", ":")).encode()).hexdigest()[:16]

    def differences(self, recorded: dict) -> list[str]:
        """Each argument that differs from ``recorded`` (a ``job.json``'s), as ``name was (now value)``."""
        now = self.record()
        changed = [f for f in fields(self) if recorded.get(f.name) != now[f.name]]
        return [f"{f.name} changed" if f.metadata.get("digest") else
                f"{f.name} {recorded.get(f.name)!r} (now {now[f.name]!r})" for f in changed]


def parts_folder(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.safetensors"


def finished(parts: Path, shard: int, key: str) -> bool:
    meta = read_shard_metadata(parts / shard_name(shard)) if (parts / shard_name(shard)).is_file() else None
    return meta is not None and meta.get("fingerprint") == key


def prepare_parts(parts: Path, arguments: JobArguments) -> None:
    """Keep finished shards of this very job; shards of a job with other arguments are removed, saying why."""
    marker = parts / "job.json"
    if parts.is_dir():
        try:
            recorded = json.loads(marker.read_text())
            same = recorded["fingerprint"] == arguments.key
            changed = arguments.differences(recorded["arguments"])
        except (OSError, ValueError, KeyError, TypeError):
            same, changed = False, ["arguments not recorded"]
        if not same:
            foreign = sorted(entry.name for entry in parts.iterdir()
                             if not entry.name.lstrip(".").startswith(("shard-", "job.", "manifest.")))
            if foreign:
                raise ReirError(f"{parts} holds {foreign[0]}, which reir embed did not write; move it away "
                                "(that folder is where a job keeps its finished shards)")
            if any(parts.glob("shard-*")):
                print(f"Starting afresh: {parts} holds shards of another job ({'; '.join(changed)}); "
                      "they are removed", flush=True)
            shutil.rmtree(parts)
    atomic_write(marker, json.dumps({"fingerprint": arguments.key, "arguments": arguments.record()}))


def embed_shards(model: Model, collection, parts: Path, key: str, shard_size: int, batch_size: int,
                 num_workers: int, context: distributed.Context) -> tuple[int, int]:
    """Embed this rank's unfinished shards; returns (shards done now, shards skipped as finished)."""
    from tqdm import tqdm

    shard_count = collection.shard_count(shard_size)
    if context.is_main:  # the one rank that prints counts every rank's finished shards
        kept = sum(finished(parts, s, key) for s in range(shard_count))
        if kept:
            print(f"Resuming: {kept} finished shard(s) of {shard_count} kept", flush=True)
    mine = range(context.rank, shard_count, context.world_size)
    todo = [s for s in mine if not finished(parts, s, key)]
    skipped = len(mine) - len(todo)
    images = sum(collection.shard_images(s, shard_size) for s in todo) or None
    with tqdm(total=images, unit="img", desc="Embed", file=sys.stderr, dynamic_ncols=True,
              disable=not context.is_main, mininterval=0.5 if sys.stderr.isatty() else 10.0) as bar:
        for shard in todo:
            done = collection.embed_shard(model, shard, shard_size, batch_size, num_workers, bar)
            save_shard(parts / shard_name(shard), done["features"], done["splits"],
                       {"fingerprint": key, "failed": done["failed"], "embedding_shape": list(model.embedding_shape)})
    return len(todo), skipped


def database_info(model: Model, collection, skipped: list[list], counts: dict[str, int]) -> dict:
    """What the database holds: the images embedded (their dataset, where they are, how many per split),
    beside the data the model was trained on, which is often another (a glyph model embedding a folder)."""
    return {"model_file": str(model.file().resolve()), "image_size": model.image_size,
            "mean": model.mean, "std": model.std, "source": collection.source,
            ROOT_KEY: collection.root,
            "data_name": collection.data_name,
            "images": {"data_name": collection.data_name, "source": collection.source, "count": dict(counts)},
            "model_data": {"data_name": model.run_config.get("data_name"),
                           "data_path": model.run_config.get("data_path")},
            "skipped": skipped}


def shard_summary(parts: Path, shard_count: int) -> tuple[dict[str, int], list[list]]:
    """Images per split and the ``[path, error]`` of skipped images, from the shards' headers alone."""
    counts: dict[str, int] = {}
    skipped: list[list] = []
    for shard in range(shard_count):
        meta = read_shard_metadata(parts / shard_name(shard))
        if meta is None:
            raise ReirError(f"{parts / shard_name(shard)} is not a database shard; delete {parts} and embed again")
        for split, listing in meta["splits"].items():
            counts[split] = counts.get(split, 0) + len(listing["paths"])
        skipped += meta["failed"]
    return counts, skipped


def merge(model: Model, collection, parts: Path, shard_count: int, skipped: list[list],
          counts: dict[str, int]) -> Database:
    """All shards, in order, into one in-memory database (for outputs under ``max_file_gb``)."""

    def slices():
        for shard in range(shard_count):
            features, meta = read_shard(parts / shard_name(shard))
            for split, tensor in features.items():
                yield split, tensor, meta["splits"][split]["paths"], meta["splits"][split]["labels"]

    return Database(*gather(slices()), model.run_config, database_info(model, collection, skipped, counts))


def publish_sharded(model: Model, collection, parts: Path, output: Path, shard_count: int, skipped: list[list],
                    counts: dict[str, int]) -> None:
    """Make the finished shards the sharded database ``output``; its manifest is the one commit.

    A new database: the manifest is written into the parts folder, which one rename then puts in
    place. Over an earlier sharded database: the shards move into its folder under names its
    manifest does not use (their checksum is in the name), then the new manifest replaces the old
    one, and only then are the old shards removed. A crash or a full disk at any step leaves either
    the old manifest, whose shards are all still there, or the new one, whose shards are all there.
    """
    info = database_info(model, collection, skipped, counts)
    if not output.exists():
        write_manifest(parts, [shard_name(s) for s in range(shard_count)], model.run_config, info)
        (parts / "job.json").unlink()
        replace(parts, output)
        return
    if not output.is_dir():
        raise UsageError(f"`output` {output} is a single-file database; remove it or write the sharded one elsewhere")
    names = []
    for shard in range(shard_count):
        name = f"shard-{shard:06d}-{file_sha256(parts / shard_name(shard))[:16]}.safetensors"
        replace(parts / shard_name(shard), output / name)
        names.append(name)
    write_manifest(output, names, model.run_config, info)
    for stale in output.glob("shard-*.safetensors"):
        if stale.name not in names:
            stale.unlink()


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


def run(model: Model, collection, output: Path, context: distributed.Context, **settings) -> int:
    """Embed ``collection`` into the database ``output`` (on every rank; rank 0 publishes it).

    Rank 0 holds :func:`lock_path` throughout, so a second job onto the same output is refused at
    once instead of sharing its parts folder (see :func:`_run` for ``settings``).
    """
    lock = OutputLock(lock_path(output), f"database {output}") if context.is_main else contextlib.nullcontext()
    with lock:
        return _run(model, collection, output, context, **settings)


def _run(model: Model, collection, output: Path, context: distributed.Context, *, shard_size: int, batch_size: int,
         num_workers: int, shard_output: bool, max_file_gb: float) -> int:
    parts = parts_folder(output)
    arguments = JobArguments.of(model, collection, shard_size, batch_size)
    key = arguments.key
    if context.is_main:
        prepare_parts(parts, arguments)
    distributed.barrier(context)
    shard_count = collection.shard_count(shard_size)
    count = sum(collection.shard_images(s, shard_size) for s in range(shard_count))
    print(f"Embedding {f'{count} images' if count else f'{shard_count} tar shard(s)'} from {collection.source} "
          f"with {model.path} on {model.device} ({shard_count} shard(s)"
          + (f" of {shard_size}" if count else "") + (f", {context.world_size} ranks" if context.enabled else "")
          + ")", flush=True)
    embed_shards(model, collection, parts, key, shard_size, batch_size, num_workers, context)
    distributed.barrier(context)
    if not context.is_main:
        return 0
    counts, skipped = shard_summary(parts, shard_count)
    if not counts:
        raise ReirError(f"none of the {count or len(skipped)} images could be read"
                        + (f" (e.g. {skipped[0][1]})" if skipped else "") + "; check the collection")
    ensemble, meta = model.embedding_shape
    sharded = shard_output or sum(counts.values()) * ensemble * meta * 4 > max_file_gb * 2**30
    if sharded:
        publish_sharded(model, collection, parts, output, shard_count, skipped, counts)
    else:
        if output.is_dir():
            raise UsageError(f"`output` {output} is a sharded database; pass `shard_output` to replace it")
        merge(model, collection, parts, shard_count, skipped, counts).save(output)
    listing = output.with_name(output.name + ".skipped.txt")
    ours = not listing.exists() or _is_skipped_listing(listing)
    if ours:
        listing.unlink(missing_ok=True)
    if skipped:
        if ours:
            atomic_write(listing, SKIPPED_HEADER + "".join(f"{path}\t{error}\n" for path, error in skipped))
        where = f"all listed in {listing}" if ours else f"not listed: {listing} exists and reir embed did not write it"
        print(f"Skipped {len(skipped)} unreadable image(s) ({where}):", file=sys.stderr)
        for _path, error in skipped[:LISTED_FAILURES]:
            print(f"  {error}", file=sys.stderr)
        if len(skipped) > LISTED_FAILURES:
            print(f"  ... and {len(skipped) - LISTED_FAILURES} more", file=sys.stderr)
    shutil.rmtree(parts, ignore_errors=True)
    sizes = ", ".join(f"{split} {n}" for split, n in counts.items())
    form = f"a sharded database of {shard_count} shard(s) and {MANIFEST}" if sharded else "one file"
    print(f"Wrote {output} ({form}): {sizes} images, embeddings {(ensemble, meta)}")
    return 0


def _is_skipped_listing(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline() == SKIPPED_HEADER
    except (OSError, UnicodeDecodeError):
        return False
