"""A seeded fuzz campaign over the files users hand us: each is read or refused with one line, nothing else.

Model and database files (flipped bytes, truncation, wrong headers, rewritten metadata), CSV and
folder datasets, split lists and index id maps are generated from real ones. Every case must end in
either a result or a ReirError (for the commands: a non-zero exit and one ``error:`` line on
stderr), within ``CASE_SECONDS``, with every file that existed before unchanged.
"""

from __future__ import annotations

import collections
import contextlib
import copy
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


def junk(rng: random.Random):
    """A fresh copy of a junk value: one list or dict shared by two places would become a circular document
    once a later rewrite puts something inside it."""
    return copy.deepcopy(rng.choice(JUNK))


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
                target[key] = junk(rng)
            elif action == "delete":
                del target[key]
            else:
                target[odd_text(rng)] = junk(rng)
        elif isinstance(target, list) and target:
            position = rng.randrange(len(target))
            rng.choice([lambda: target.__setitem__(position, junk(rng)),  # noqa: B023 - called at once
                        lambda: target.pop(position),  # noqa: B023 - called at once
                        lambda: target.append(junk(rng))])()  # noqa: B023 - called at once


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
                lines = [line for line in err.splitlines() if line.strip() and "Embed" not in line]
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
    from reir.data.custom import read_csv, read_folder
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


def in_forked_child(function, seconds: int = CASE_SECONDS) -> str:
    """``function()``'s one-line answer, run in a forked child: a crash or a hang there is reported as such
    instead of taking the test process down."""
    import os

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer, then leave without running the parent's clean-up
        os.close(read)
        try:
            answer = function()
        except ReirError as exc:
            answer = "refused" if str(exc) and "\n" not in str(exc) else f"error: not one line {str(exc)!r:.120}"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the case
            answer = f"error: {type(exc).__name__}: {str(exc)[:160]}"
        os.write(write, answer.encode()[:4000])
        os._exit(0)
    os.close(write)
    import time

    ended = time.monotonic() + seconds
    while time.monotonic() < ended:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return f"error: no answer within {seconds} s"
    answer = os.read(read, 4000).decode(errors="replace")
    os.close(read)
    if os.WIFSIGNALED(status):
        return f"error: crashed with signal {os.WTERMSIG(status)}"
    return answer or "error: no answer"


def test_mutated_faiss_files_are_refused_or_searched_correctly(served_model, tmp_path, record_property):
    """Every mutated index file is opened and searched in a forked child: a one-line refusal or a well-formed
    search, never a crash, a hang or a traceback."""
    import faiss
    import torch

    from fuzz_inputs import crafted_pair, mutate_index
    from reir.retrieval.index import Index, id_map_path

    faiss.omp_set_num_threads(1)  # a forked child must not wait on the parent's OpenMP threads
    rng = random.Random(SEED)
    counts, outcomes, failures = collections.Counter(), collections.Counter(), []
    for factory in ("Flat", "HNSW8"):
        good = tmp_path / f"good_{factory}.faiss"
        index = Index.from_database(served_model.database, factory=factory)
        index.save(good)
        data, id_map = good.read_bytes(), id_map_path(good).read_bytes()
        queries = index.vectors()[:4] if index.exact else torch.as_tensor(index.faiss_index.reconstruct_n(0, 4))
        for n in range(45):
            case = tmp_path / f"case_{factory}_{n}.faiss"
            mutated = mutate_index(data, rng)
            case.write_bytes(mutated)
            id_map_path(case).write_bytes(crafted_pair(id_map, mutated))

            def open_and_search(case=case, queries=queries):
                opened = Index.load(case)
                scores, ids = opened.search(queries, 3)
                wellformed = (ids.shape == (4, 3) and bool(((ids >= -1) & (ids < len(opened))).all())
                              and bool(torch.isfinite(scores[ids >= 0]).all()))
                return "searched" if wellformed else f"error: malformed answer {ids.tolist()}"

            answer = in_forked_child(open_and_search)
            counts[factory] += 1
            outcomes[(factory, answer.split(":")[0])] += 1
            if answer.startswith("error"):
                failures.append(f"{factory} case {n}: {answer}")
            case.unlink()
            id_map_path(case).unlink()
    summary = "; ".join(f"{f} index files {counts[f]} (searched {outcomes[(f, 'searched')]}, refused "
                        f"{outcomes[(f, 'refused')]})" for f in counts)
    record_property("fuzz cases", f"FAISS index files: {sum(counts.values())} cases ({summary})")
    assert not failures, f"{len(failures)} index files broke a rule:\n" + "\n".join(failures[:20])
    assert all(outcomes[(f, "refused")] for f in counts), "every layout refuses something"


def test_crafted_databases_serve_only_collection_images(served_model, tmp_path, record_property):
    """Databases naming outside files, relative paths, symlinks in and out, non-images, folders, and
    recording roots from the collection to ``/``: the service refuses a machine-wide or system root at start,
    and otherwise serves only image files whose real path lies under its root; with the collection recorded
    as the root, never the secret beside it (reached by symlinks or ``..``) nor /etc/passwd."""
    import os

    import torch

    from reir.model.files import load_model
    from reir.retrieval.database import Database
    from reir.retrieval.index import Index
    from reir.service import BadRequest, Searcher

    rng = random.Random(SEED)
    model = load_model(served_model.model)
    collection, private = tmp_path / "collection", tmp_path / "private"
    (collection / "sub").mkdir(parents=True)
    private.mkdir()
    planted = {}
    for n in range(4):
        path = collection / ("sub" if n % 2 else "") / f"{n}.png"
        path.write_bytes(image_bytes(rng, "PNG", (8, 8)))
        planted[str(path)] = path.read_bytes()
    secret = private / "secret.png"
    secret.write_bytes(image_bytes(rng, "PNG", (9, 9)))
    (collection / "notes.png").write_text("not an image")
    (collection / "out.png").symlink_to(secret)
    (collection / "passwd.png").symlink_to("/etc/passwd")
    (collection / "in.png").symlink_to(collection / "0.png")
    (collection / "private_dir").symlink_to(private)
    candidates = [str(p) for p in planted] + [
        "/etc/passwd", str(secret), "../private/secret.png", "collection/0.png", "0.png", "sub/1.png",
        str(collection / "notes.png"), str(collection / "out.png"), str(collection / "passwd.png"),
        str(collection / "in.png"), str(collection / "private_dir" / "secret.png"), str(collection / "sub"),
        str(collection / "missing.png"), str(collection / ".." / "private" / "secret.png"), "", "/",
        f"{collection / 'x.tar'}::key", "\x00", str(collection) + "/../../../../etc/passwd"]
    roots = [None, str(collection), str(collection / "sub"), "collection", "/", "/etc", "/usr/share", "/tmp",
             str(tmp_path), "", "..", str(collection / "private_dir")]
    ensemble, meta = model.embedding_shape
    counts, failures = collections.Counter(), []
    for n in range(80):
        paths = [rng.choice(candidates) for _ in range(rng.randint(1, 8))]
        root = rng.choice(roots)
        home = rng.choice([tmp_path, collection])
        database = home / f"db_{n}.safetensors"
        info = {"collection_root": root} if root is not None else {}
        Database({"test": torch.nn.functional.normalize(torch.randn(len(paths), ensemble, meta), dim=-1)},
                 {"test": {"paths": paths, "labels": [""] * len(paths)}}, model.run_config, info).save(database)
        try:
            searcher = Searcher(model, Index.from_database(database), source=database)
        except ReirError as exc:
            counts["refused at start"] += 1
            if "\n" in str(exc):
                failures.append(f"case {n}: not one line: {exc}")
            database.unlink()
            continue
        for image_id in range(len(paths)):
            counts["image requests"] += 1
            try:
                data, content_type = searcher.database_image(str(image_id))
            except BadRequest as exc:
                counts["answered 404"] += 1
                if exc.status != 404 or str(tmp_path) in str(exc) or "/etc" in str(exc):
                    failures.append(f"case {n} id {image_id}: {exc.status} {exc}")
                continue
            counts["served"] += 1
            owners = [p for p, content in {**planted, str(secret): secret.read_bytes()}.items() if content == data]
            under_root = [p for p in owners if os.path.realpath(p).startswith(searcher.root + "/")]
            leaked = root in (str(collection), str(collection / "sub")) and data == secret.read_bytes()
            if not under_root or leaked or content_type != "image/png":
                failures.append(f"case {n} id {image_id}: served {len(data)} bytes ({content_type}) from "
                                f"{paths[image_id]!r} under root {searcher.root}")
        database.unlink()
    record_property("fuzz cases", f"crafted databases: 80 cases ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    assert not failures, f"{len(failures)} cases broke a rule:\n" + "\n".join(failures[:20])
    assert counts["refused at start"] and counts["answered 404"] and counts["served"]


def test_crafted_model_headers_are_refused_before_allocation(served_model, tmp_path, record_property):
    """Model configurations claiming other sizes than the tensors stored: refused in one line, the process
    growing by no more than a small multiple of the file."""
    import resource

    from reir.fileio import load_tensors, save_tensors
    from reir.model.files import load_model

    rng = random.Random(SEED)
    state, meta = load_tensors(served_model.model)
    state = {k: t.clone() for k, t in state.items()}
    fields = {"ensemble_size": [0, 1, 5, 2**20, -3], "meta_class_size": [1, 2, 2**20, 2**31, 10**12],
              "projection": [1, 10**6, 10**12, -1], "head_scale": [0.0, -1.0, 1e308],
              "share_type": ["layer4", "nothing", ""], "head": ["cosine", "linear", "x"],
              "model_type": ["resnet50", "vgg", ""], "learn_scale": [True], "with_random": [True]}
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counts, failures = collections.Counter(), []
    for n in range(60):
        crafted = dict(meta["model"])
        for name in rng.sample(sorted(fields), rng.randint(1, 3)):
            crafted[name] = rng.choice(fields[name])
        path = tmp_path / f"model_{n}.safetensors"
        save_tensors(path, state, dict(meta, model=crafted))
        counts["cases"] += 1
        try:
            with deadline(CASE_SECONDS):
                load_model(path)
            counts["loaded"] += 1
        except ReirError as exc:
            counts["refused"] += 1
            if "\n" in str(exc):
                failures.append(f"case {n}: not one line: {exc}")
        except Exception as exc:  # noqa: BLE001 - a traceback for the user
            failures.append(f"case {n} {crafted}: {type(exc).__name__}: {str(exc)[:160]}")
        path.unlink()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    record_property("fuzz cases", f"crafted model headers: {counts['cases']} cases (loaded {counts['loaded']}, "
                                  f"refused {counts['refused']}; peak memory grew {grown_mib:.0f} MiB)")
    assert not failures, f"{len(failures)} cases broke a rule:\n" + "\n".join(failures[:20])
    assert counts["refused"] and grown_mib < 200
