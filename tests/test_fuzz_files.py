"""A seeded fuzz campaign over the files users hand us: each is read or refused with one line, nothing else.

Model and database files (flipped bytes, truncation, wrong headers, rewritten metadata), CSV and
folder datasets, split lists and index id maps are generated from real ones. Every case must end in
either a result or a ReirError (for the commands: a non-zero exit and one ``error:`` line on
stderr), within ``CASE_SECONDS``, with every file that existed before unchanged.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import random
import signal
import struct
from pathlib import Path

from fuzz_inputs import hostile_image, image_bytes, mutate, odd_text
from reir.errors import ReirError

SEED = 18
CASE_SECONDS = 20


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: int):
    def expire(*_):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder``: its content hash, or for files over 1 MiB (model copies) size and mtime."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            found[str(path.relative_to(folder))] = (f"{stat.st_size}:{stat.st_mtime_ns}" if stat.st_size > 2**20
                                                    else hashlib.sha1(path.read_bytes()).hexdigest())
    return found


def mutate_header(data: bytes, rng: random.Random) -> bytes:
    """Mutations aimed at a safetensors file's length prefix and JSON header, where the checks live."""
    header_length = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + header_length]
    kind = rng.choice(["flip", "truncate", "length", "json", "json", "json", "anywhere"])
    if kind == "flip":
        return data[:8] + mutate(header, rng) + data[8 + header_length:]
    if kind == "truncate":
        return data[: rng.randrange(8 + header_length + 64)]
    if kind == "length":
        return struct.pack("<Q", rng.choice([0, 1, header_length + 1, 2**40, 2**64 - 1])) + data[8:]
    if kind == "anywhere":
        return mutate(data, rng)
    document = json.loads(header)
    metadata = document.get("__metadata__", {})
    inner = json.loads(next(iter(metadata.values()))) if metadata else {}
    rewrite_json(inner, rng)
    key = next(iter(metadata), "reir")
    document["__metadata__"] = {key: json.dumps(inner) if rng.random() < 0.9 else odd_text(rng)}
    text = json.dumps(document).encode()
    # the tensors' offsets are relative to the header's end: a longer header keeps them valid
    return struct.pack("<Q", len(text)) + text + data[8 + header_length:]


JUNK = [None, 0, -1, 1.5, "", "x", "\u00b2", [], {}, [1, 2], {"a": 1}, True, 10**30, float("inf")]


def rewrite_json(value, rng: random.Random, depth: int = 0) -> None:
    """Replace, delete or add a few entries somewhere inside a JSON document (in place)."""
    for _ in range(rng.randint(1, 3)):
        target = value
        for _ in range(rng.randint(0, 3)):
            children = list(target.values()) if isinstance(target, dict) else target if isinstance(target, list) else []
            children = [c for c in children if isinstance(c, (dict, list)) and c]
            if not children:
                break
            target = rng.choice(children)
        if isinstance(target, dict) and target:
            key = rng.choice(list(target))
            action = rng.choice(["replace", "replace", "delete", "add"])
            if action == "replace":
                target[key] = rng.choice(JUNK)
            elif action == "delete":
                del target[key]
            else:
                target[odd_text(rng)] = rng.choice(JUNK)
        elif isinstance(target, list) and target:
            position = rng.randrange(len(target))
            rng.choice([lambda: target.__setitem__(position, rng.choice(JUNK)), lambda: target.pop(position),
                        lambda: target.append(rng.choice(JUNK))])()


def mutate_json_text(text: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.6:
        document = json.loads(text)
        rewrite_json(document, rng)
        return json.dumps(document).encode()
    return mutate(text, rng)


class Campaign:
    """Runs cases of one surface, counting outcomes and collecting the ones that broke a rule."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.counts = collections.Counter()
        self.accepted = collections.Counter()
        self.failures: list[str] = []
        self.kept = set(snapshot(folder))  # the originals every case is made from

    def call(self, surface: str, number: int, function, *args):
        """Run one case on the files now in the folder."""
        before = snapshot(self.folder)
        self.counts[surface] += 1
        try:
            with deadline(CASE_SECONDS):
                function(*args)
            self.accepted[surface] += 1
        except ReirError as exc:
            if not str(exc) or "\n" in str(exc):
                self.failures.append(f"{surface} case {number}: error is not one line: {str(exc)!r:.200}")
        except Hang as exc:
            self.failures.append(f"{surface} case {number}: {exc}")
        except Exception as exc:  # noqa: BLE001 - anything but a ReirError would reach the user as a traceback
            self.failures.append(f"{surface} case {number}: {type(exc).__name__}: {str(exc)[:200]}")
        after = snapshot(self.folder)
        changed = [p for p in set(before) | set(after) if before.get(p) != after.get(p)]
        if changed:
            self.failures.append(f"{surface} case {number}: changed or added {sorted(changed)[:3]}")

    def clean(self) -> None:
        """Remove the last case's files, keeping the originals."""
        for path in set(snapshot(self.folder)) - self.kept:
            (self.folder / path).unlink()

    def command(self, surface: str, number: int, main, argv: list[str], capsys):
        """A CLI main in process: exit 0, or non-zero with exactly one ``error:`` line on stderr."""
        def run():
            capsys.readouterr()
            code = main(argv)
            err = capsys.readouterr().err
            if code:
                lines = [l for l in err.splitlines() if l.strip() and "Embed" not in l]
                if "Traceback" in err or not lines or not lines[-1].startswith("error: "):
                    raise AssertionError(f"exit {code} with stderr {err[-300:]!r}")
                raise ReirError(lines[-1])
        self.call(surface, number, run)

    def summary(self) -> str:
        return "; ".join(f"{s} {n} (read {self.accepted[s]}, refused {n - self.accepted[s]})"
                         for s, n in self.counts.items())


def test_user_files_are_read_or_refused_in_one_line(served_model, tmp_path, capsys, record_property):
    import reir
    from reir.cli.embed import main as embed_main
    from reir.data.custom import read_folder, read_csv
    from reir.data.splits import load_split_list
    from reir.retrieval.database import load_database
    from reir.retrieval.index import Index, id_map_path

    rng = random.Random(SEED)
    inputs = tmp_path / "inputs"
    images = inputs / "images"
    images.mkdir(parents=True)
    for n in range(4):
        (images / f"{n}.png").write_bytes(image_bytes(rng, "PNG", (16, 16)))
    model_bytes = served_model.model.read_bytes()
    database_bytes = served_model.database.read_bytes()
    Index.from_database(served_model.database).save(inputs / "good.faiss")
    id_map_bytes = id_map_path(inputs / "good.faiss").read_bytes()
    id_map_path(inputs / "good.faiss").unlink()
    split_bytes = (served_model.data_path / "digits" / "splits_uncropped.json").read_bytes()
    csv_text = "path,label,split\n" + "".join(f"images/{n}.png,{n % 2},{'train' if n < 2 else 'test'}\n"
                                                  for n in range(4))
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    campaign = Campaign(inputs)  # made after the originals, so only they are kept between cases

    def write(name: str, data: bytes) -> Path:
        path = inputs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    for n in range(40):
        path = write(f"model_{n}.safetensors", mutate_header(model_bytes, rng))
        campaign.call("model files", n, reir.load_model, path)
        campaign.clean()
    for n in range(120):
        path = write(f"database_{n}.safetensors", mutate_header(database_bytes, rng))
        campaign.call("database files", n, load_database, path)
        campaign.clean()
    for n in range(150):
        path = write(f"splits_{n}/splits_uncropped.json", mutate_json_text(split_bytes, rng))
        campaign.call("split lists", n, load_split_list, path)
        campaign.clean()
    for n in range(150):
        write("good.faiss.ids.json", mutate_json_text(id_map_bytes, rng))
        campaign.call("index id maps", n, Index.load, inputs / "good.faiss")
        campaign.clean()
    for n in range(150):
        text = csv_text.encode()
        text = mutate(text, rng) if rng.random() < 0.5 else rng.choice([
            b"", b"\xff\xfe\x00p", "path,label,split\n\u00b2.png,\u00b2,test\n".encode(), b'path,label\n"a.png,1\n',
            b"path,label,split\n../../../etc/passwd,1,train\n", b"path\n" + b"x" * 200_000 + b"\n",
            "path,label,split,x1,y1,x2,y2\nimages/0.png,1,train,\u0663,0,1,1\n".encode()])
        path = write(f"list_{n}.csv", text)
        campaign.call("CSV datasets", n, read_csv, path)
        if n % 10 == 0:
            campaign.command("CSV datasets (reir embed)", n, embed_main,
                             ["--model", str(served_model.model), "--images", str(path), "--output",
                              str(outputs / f"csv_{n}_data_base.safetensors"), "--num_workers", "0"], capsys)
        campaign.clean()
    for n in range(60):
        root = inputs / f"folder_{n}"
        for split in rng.sample(["train", "test", "query", "gallery", "\u00b2", ".hidden"], rng.randint(0, 4)):
            for _ in range(rng.randint(0, 3)):
                label = odd_text(rng).replace("/", "_").replace("\x00", "_").strip(". ")[:60] or "c"
                data, _ = hostile_image(rng)
                suffix = rng.choice([".png", ".jpg", ".webp", ".txt", ""])
                path = root / split / label / f"{rng.randrange(10**6)}{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data if len(data) < 2**20 else data[:2**20])
        root.mkdir(exist_ok=True)
        campaign.call("folder datasets", n, read_folder, root)
        if n % 6 == 0:
            campaign.command("folder datasets (reir embed)", n, embed_main,
                             ["--model", str(served_model.model), "--images", str(root), "--labels_from_folders",
                              "--output", str(outputs / f"folder_{n}_data_base.safetensors"), "--num_workers", "0"],
                             capsys)
        campaign.clean()
    record_property("fuzz cases", f"files: {sum(campaign.counts.values())} cases ({campaign.summary()})")
    assert not campaign.failures, f"{len(campaign.failures)} cases broke a rule:\n" + "\n".join(campaign.failures[:25])
    assert all(campaign.counts[s] > campaign.accepted[s] for s in campaign.counts), "every surface refuses something"
