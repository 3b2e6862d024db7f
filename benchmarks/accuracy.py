"""REIR, its branch-head variants and the best peer losses on unseen classes, at equal budget.

Same data, backbone (resnet18 from random initialisation, or from the state dict ``--weights`` names),
image size, batch size, recipe and epochs for every trained method; every (dataset, budget, seed,
method) is one run:

- raw pixels (cosine of the mean-centred pixels) and the untrained network (REIR's shape, random
  weights); with ``--weights``, the pretrained backbone's own features (its pooled 512-d output);
- REIR with the defaults ``reir train`` picks for ``--weights none``, and each variant of
  :data:`REIR_VARIANTS` (one ``reir train`` flag set each: cosine heads with a fixed or learned
  scale, twice the meta classes, a projection before the head, a MultiSimilarity term on the
  concatenated embedding); the best single branch of the default REIR;
- peers: a softmax classifier over all training classes (its normalised logits as the embedding),
  a normalized softmax (cosine classifier with temperature 0.05 over a 512-d normalised
  embedding), and pytorch-metric-learning's ProxyAnchor and MultiSimilarity (+ its miner) with their
  published defaults, a 512-d linear head and an m-per-class sampler.

Every trained method is evaluated on the test classes after every epoch and reports its best epoch
(the original's protocol, optimistic alike for all); the last epoch's R@1 is printed beside it. The
tables give mean ± standard deviation over the seeds. Runs are appended to ``--results`` (JSON
lines) as they finish; a rerun with the same file skips the runs it holds, so an interrupted grid
continues where it stopped.

    python benchmarks/accuracy.py --results runs.jsonl --markdown tables.md --jobs 2
    python benchmarks/accuracy.py --weights pretrained.safetensors ...   # every method from that backbone

Datasets (``--datasets``): ``glyphs`` (look-alike characters: the classes with the lowest code points
from U+0100 on, Latin letters with diacritics), ``fonts`` (reir/data/fonts.py: test characters *and*
test typefaces unseen in training, from matplotlib's fonts), ``typefaces`` (reir/data/typefaces.py: the same
question with 300 + 300 classes, tested in Debian's Liberation fonts: ``apt-get install -y fonts-liberation``)
and ``fashion-mnist`` (Debian's package, classes 0-4 train, 5-9 test:
``apt-get install -y dataset-fashion-mnist``, files under /usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gzip
import hashlib
import io
import itertools
import json
import multiprocessing
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from reir.cli.train import get_args_parser as train_parser
from reir.cli.train import given_flags
from reir.data.custom import load_custom
from reir.data.fonts import prepare_fonts
from reir.data.glyphs import SPLIT_SEED, prepare_glyphs, write_subset_csv
from reir.data.images import ImageList, build_transform
from reir.data.splits import Split
from reir.data.typefaces import prepare_typefaces
from reir.errors import ReirError
from reir.fileio import atomic_write
from reir.model.network import ModelConfig, build_backbone
from reir.retrieval.baselines import label_ids, network_features, raw_pixel_features, untrained_features
from reir.retrieval.database import load_database
from reir.retrieval.metrics import retrieval_metrics
from reir.training.config import TrainConfig
from reir.training.recipe import RECIPES, recipe_for
from reir.training.train import train

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
RECALLS = (1, 2, 4, 8)
PRETRAINED = "pretrained features"
BASELINES = ("raw pixels", "untrained network", PRETRAINED)
# Baselines that no seed changes: measured once, as seed 0.
SEEDLESS = ("raw pixels", PRETRAINED)
# ``reir train`` flags of each REIR row; "{m}" is the m-per-class of the dataset, "{meta2}" twice its meta
# classes (at most one less than its training classes).
REIR_VARIANTS = {
    "REIR": (),
    "REIR cosine scale 16": ("--head", "cosine", "--head_scale", "16"),
    "REIR cosine learned scale": ("--head", "cosine", "--learn_scale"),
    "REIR meta classes x2": ("--meta_class_size", "{meta2}"),
    "REIR projection 64": ("--projection", "64"),
    "REIR + MultiSimilarity": ("--pair_loss", "multisimilarity", "--samples_per_class", "{m}"),
    "REIR random labels": ("--label_type", "random"),
    "REIR original recipe": ("--recipe", "original"),
    "REIR original recipe batch 10": ("--recipe", "original", "--batch_size", "10"),
    "REIR scratch recipe": ("--recipe", "scratch"),
    # The meta-class count as a function of the training classes (the original: 12 for ~100 classes,
    # 192 for 3,997, 512 for 11,318).
    "REIR meta classes = classes/16": ("--meta_class_size", "{classes/16}"),
    "REIR meta classes = classes/8": ("--meta_class_size", "{classes/8}"),
    "REIR meta classes = classes/4": ("--meta_class_size", "{classes/4}"),
    # REIR as the original builds it: branches that own their deeper stages (fewer of them: each costs a
    # network's worth of those stages).
    "REIR layer3 x8": ("--share_type", "layer3", "--ensemble_size", "8"),
    "REIR layer2 x4": ("--share_type", "layer2", "--ensemble_size", "4"),
    "REIR layer1 x4": ("--share_type", "layer1", "--ensemble_size", "4"),
}
# Rows run only when named in --methods: settled earlier, or costly.
OPT_IN = ("REIR random labels", "REIR original recipe", "REIR original recipe batch 10", "REIR scratch recipe",
          "REIR meta classes = classes/16",
          "REIR meta classes = classes/8", "REIR meta classes = classes/4", "REIR layer3 x8", "REIR layer2 x4",
          "REIR layer1 x4")
PEERS = ("softmax", "normalized softmax", "ProxyAnchor", "MultiSimilarity")
BEST_BRANCH = "REIR best single branch"
METHODS = BASELINES + tuple(REIR_VARIANTS) + (BEST_BRANCH,) + PEERS
# The grid the 24 + 24 class tables report: every method but the opt-in rows.
DEFAULT_METHODS = tuple(m for m in METHODS if m not in OPT_IN)
ENSEMBLE_SIZES = (1, 2, 4, 8, 16, 48)
EMBEDDING_SIZE = 512
SAMPLES_PER_CLASS = 4
# Proxy Anchor's paper trains the proxies at 1e-2 (100 times its network's rate).
PROXY_LEARNING_RATE = 1e-2
# "Classification is a strong baseline" (Zhai & Wu): temperature 0.05 on the cosine logits.
NORMALIZED_SOFTMAX_TEMPERATURE = 0.05


def glyphs_source(work: Path, data_path: Path, args) -> Path:
    """A CSV over some glyph classes: the lowest code points from ``--glyph_from`` on (a block of
    look-alikes), or a fixed random choice."""
    glyphs = prepare_glyphs(data_path)
    start = int(args.glyph_from.removeprefix("U+"), 16)
    kept = {name: Split(*zip(*[(path, label) for path, label in zip(split.paths, split.labels)
                               if int(label[2:], 16) >= start]))
            for name, split in glyphs.splits.items()}
    return write_subset_csv(dataclasses.replace(glyphs, splits=kept), work / "glyphs.csv", args.train_classes,
                            args.test_classes, None if args.glyph_classes == "lowest" else SPLIT_SEED)


def fonts_source(work: Path, data_path: Path, args) -> Path:
    """A CSV over a fixed random choice of the unseen-typeface set's classes."""
    return write_subset_csv(prepare_fonts(data_path), work / "fonts.csv", args.train_classes, args.test_classes,
                            SPLIT_SEED)


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_source(work: Path, data_path: Path, args) -> Path:
    """Folders ``train/<class>`` (classes 0-4 of the training file) and ``test/<class>`` (5-9 of the test file)."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"error: Fashion-MNIST not found in {FASHION_MNIST}; "
                         "install it with `apt-get install -y dataset-fashion-mnist`")
    root = work / "fashion-mnist"
    for split, prefix, classes, count in (("train", "train", range(5), args.train_images),
                                          ("test", "t10k", range(5, 10), args.test_images)):
        images = read_idx(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz")
        for label in classes:
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for index in np.flatnonzero(labels == label)[:count]:
                Image.fromarray(images[index]).save(folder / f"{index:05d}.png")
    return root


def typefaces_source(work: Path, data_path: Path, args) -> Path:
    """A CSV over a fixed random choice of the many-class unseen-typeface set's classes."""
    try:
        built = prepare_typefaces(data_path)
    except ReirError as error:  # its test fonts are a Debian package, often not installed
        raise SystemExit(f"error: {error}") from None
    return write_subset_csv(built, work / "typefaces.csv", args.train_classes, args.test_classes, SPLIT_SEED)


SOURCES = {"glyphs": glyphs_source, "fonts": fonts_source, "typefaces": typefaces_source,
           "fashion-mnist": fashion_source}


def scores(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return retrieval_metrics(features, labels, RECALLS)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class EpochClock:
    """Process CPU seconds a ``reir train`` run spends in its training steps, from its ``step`` events: a
    step costs the gap since the step before it; an epoch's first step, whose gap also holds the previous
    epoch's evaluation and saving, is counted at the mean step. The rest of the run is evaluation and saving."""

    def __init__(self):
        self.last, self.train, self.timed_steps, self.first_steps = time.process_time(), 0.0, 0, 0

    def __call__(self, event) -> None:
        now = time.process_time()
        if event.kind == "step":
            if event.step == 1:
                self.first_steps += 1
            else:
                self.train += now - self.last
                self.timed_steps += 1
        self.last = now

    def train_seconds(self) -> float:
        return self.train * (1 + self.first_steps / max(self.timed_steps, 1))


def train_cli(source: Path, output: Path, args, *options: str) -> tuple[dict, Path]:
    """``reir train`` (its parser and :func:`reir.training.train.train`, in this process); the best epoch's
    row of its statistics, its database and the CPU seconds of its training steps."""
    argv = ["--data_name", "custom", "--data_path", str(source), "--output_dir", str(output),
            "--weights", args.weights, "--recipe", args.recipe, "--image_size", str(args.image_size),
            "--batch_size", str(args.batch_size),
            "--num_epochs", str(args.epochs), "--num_workers", "0", "--seed", str(args.seed), "--device", "cpu",
            "--nmi_every", "0", *options]
    parser = train_parser()
    config = TrainConfig.from_args(parser.parse_args(argv), given_flags(parser, argv))
    log, clock = io.StringIO(), EpochClock()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            train(config, callbacks=[clock])
    except ReirError as error:
        raise SystemExit(f"error: reir train {' '.join(argv)} failed: {error}\n{log.getvalue()[-3000:]}") from None
    (statistics,) = (output / "statistics").glob("*_results.csv")
    with open(statistics, newline="") as handle:
        rows = list(csv.DictReader(handle))
    best = max(rows, key=lambda row: float(row["test_recall@1"]))  # first of equals, as train.py keeps
    metrics = {key[len("test_"):]: float(value) for key, value in best.items()
               if key.startswith("test_") and value not in ("", None) and key != "test_nmi"}
    (database,) = (output / "results").glob("*_data_base.safetensors")
    return {"metrics": metrics, "last_recall": float(rows[-1]["test_recall@1"]),
            "train_cpu_seconds": clock.train_seconds()}, database


class Embedder(nn.Module):
    """resnet18 (random or ``weights``) with its classifier replaced by a linear embedding head, or by
    nothing (``size`` 0: the backbone's pooled features)."""

    def __init__(self, size: int, weights: str = "none"):
        super().__init__()
        self.backbone = build_backbone("resnet18", weights)
        self.backbone.fc = nn.Linear(self.backbone.fc.in_features, size) if size else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)[:, None]  # one "branch" of REIR's [batch, ensemble, size] shape


class NormalizedSoftmaxLoss(nn.Module):
    """Cross-entropy over cosine logits: normalised embedding against normalised class proxies, / temperature."""

    def __init__(self, classes: int, size: int, temperature: float = NORMALIZED_SOFTMAX_TEMPERATURE):
        super().__init__()
        self.proxies = nn.Parameter(torch.empty(classes, size))
        nn.init.kaiming_uniform_(self.proxies, a=5 ** 0.5)
        self.temperature = temperature

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, _pairs=None) -> torch.Tensor:
        logits = F.normalize(embeddings, dim=-1) @ F.normalize(self.proxies, dim=-1).T / self.temperature
        return F.cross_entropy(logits, targets)


def samples_per_class(num_classes: int, batch_size: int) -> int:
    """The m of the m-per-class sampler: 4 where the classes allow, more for few classes."""
    m = SAMPLES_PER_CLASS
    while m < batch_size and (m * num_classes < batch_size or batch_size % m):
        m += 1
    return m


def train_embedder(split_list, method: str, args) -> dict:
    """A peer on resnet18 with a linear head, with the recipe REIR's runs get (``--recipe``)."""
    from pytorch_metric_learning import losses, miners, samplers

    torch.manual_seed(args.seed)
    train_set = ImageList(split_list, "train", build_transform(args.image_size, split_list.mean, split_list.std,
                                                               train=True))
    classes = len(train_set.classes)
    # softmax: one logit per training class, embedded as REIR embeds a branch (its logits L2-normalised).
    model = Embedder(classes if method == "softmax" else EMBEDDING_SIZE, args.weights)
    groups = [{"params": model.parameters()}]
    miner, sampler = None, None
    if method == "softmax":
        loss_fn = lambda logits, targets, _: F.cross_entropy(logits, targets)  # noqa: E731 - one arm of the loss choice
    elif method == "normalized softmax":
        loss_fn = NormalizedSoftmaxLoss(classes, EMBEDDING_SIZE)
        groups.append({"params": loss_fn.parameters()})
    elif method == "ProxyAnchor":
        loss_fn = losses.ProxyAnchorLoss(classes, EMBEDDING_SIZE)
        groups.append({"params": loss_fn.parameters(), "lr": PROXY_LEARNING_RATE, "weight_decay": 0.0})
    else:
        loss_fn, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()
    if method in ("ProxyAnchor", "MultiSimilarity"):
        sampler = samplers.MPerClassSampler(train_set.targets.numpy(), samples_per_class(classes, args.batch_size),
                                            args.batch_size, length_before_new_iter=len(train_set))
    optimizer, scheduler = recipe_for(args.recipe, args.weights).optimizer(groups, args.epochs)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                         shuffle=sampler is None, drop_last=True)
    labels = label_ids(split_list, "test")
    best, last, train_seconds = None, None, 0.0
    for _ in range(args.epochs):
        started = time.process_time()
        model.train()
        for images, batch_targets in loader:
            embeddings = model(images)[:, 0]
            pairs = miner(embeddings, batch_targets) if miner else None
            loss = loss_fn(embeddings, batch_targets, pairs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        train_seconds += time.process_time() - started
        last = scores(network_features(model, split_list, "test", args.image_size), labels)
        if best is None or last["recall@1"] > best["recall@1"]:
            best = last
    return {"metrics": best, "last_recall": last["recall@1"], "train_cpu_seconds": train_seconds}


def branch_subsets(features: torch.Tensor, labels: torch.Tensor) -> tuple[list, list]:
    """Metrics of the first n branches for each size in ENSEMBLE_SIZES, and of every branch alone."""
    size = features.shape[1]
    counts = sorted({n for n in ENSEMBLE_SIZES if n < size} | {size})
    subsets = [(n, scores(features[:, :n], labels)) for n in counts]
    singles = [scores(features[:, b:b + 1], labels) for b in range(size)]
    return subsets, singles


def reir_options(method: str, args) -> list[str]:
    """The row's ``reir train`` flags, with the dataset's meta classes and m-per-class filled in."""
    classes = args.train_class_count
    fill = {"{meta2}": str(min(2 * args.meta_class_size, classes - 1)),
            "{m}": str(samples_per_class(classes, args.batch_size)),
            **{f"{{classes/{n}}}": str(max(2, classes // n)) for n in (4, 8, 16)}}
    options = ["--share_type", args.share_type, "--ensemble_size", str(args.ensemble_size),
               "--meta_class_size", str(args.meta_class_size)]
    return options + [fill.get(value, value) for value in REIR_VARIANTS[method]]


def measure(unit: dict, source: Path, work: Path, args) -> dict:
    """One run: ``unit`` names its dataset, epochs, seed and method; returns it with its results."""
    args = argparse.Namespace(**{**vars(args), "epochs": unit["epochs"], "seed": unit["seed"]})
    method = unit["method"]
    print(f"[{unit['dataset']} {unit['epochs']} epochs seed {unit['seed']}] {method} ...", file=sys.stderr,
          flush=True)
    if args.jobs > 1:
        torch.set_num_threads(1)  # the runs share the cores
    split_list = load_custom(source, "uncropped")
    labels = label_ids(split_list, "test")
    start, cpu = time.perf_counter(), time.process_time()
    extra = {}
    if method == "raw pixels":
        result = {"metrics": scores(raw_pixel_features(split_list, "test", args.image_size), labels)}
    elif method == "untrained network":
        config = ModelConfig("resnet18", args.share_type, args.ensemble_size, args.meta_class_size)
        result = {"metrics": scores(untrained_features(config, args.seed, split_list, "test", args.image_size),
                                    labels)}
    elif method == PRETRAINED:
        features = network_features(Embedder(0, args.weights), split_list, "test", args.image_size)
        result = {"metrics": scores(features, labels)}
    elif method in REIR_VARIANTS:
        output = work / f"{unit['epochs']}-{unit['seed']}-{slug(method)}"
        result, database = train_cli(source, output, args, *reir_options(method, args))
    else:
        result = train_embedder(split_list, method, args)
    # The run's cost: what follows is the benchmark's own analysis, not the method's.
    timing = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}
    if "train_cpu_seconds" in result:
        result["train_images"] = unit["epochs"] * len(split_list.splits["train"])
    if method in REIR_VARIANTS:
        if method == "REIR":
            subsets, singles = branch_subsets(load_database(database).features["test"], labels)
            extra = {"subsets": subsets, "singles": singles}
        shutil.rmtree(output)  # its model, database and checkpoint: ~0.2 GB a run, hundreds of runs
    return {**unit, **result, **extra, **timing}


def prepare_dataset(name: str, work: Path, data_path: Path, args) -> tuple[Path, argparse.Namespace, str]:
    """The dataset's source, the arguments its runs use (meta classes filled in) and its one-line description."""
    source = SOURCES[name](work, data_path, args)
    split_list = load_custom(source, "uncropped")  # prepared once here, so parallel runs only read it
    counts = {split: (len(s), len(s.classes)) for split, s in split_list.splits.items()}
    args = argparse.Namespace(**vars(args), train_class_count=counts["train"][1])
    if args.meta_class_size is None:  # 12 as the original, or about 4 classes per meta class where there are fewer
        args.meta_class_size = max(2, min(12, counts["train"][1] // 4))
    start = "random init"
    if args.weights != "none":  # the file's name and hash, and the recipe its runs get
        digest = hashlib.sha256(Path(args.weights).read_bytes()).hexdigest()
        recipe = recipe_for(args.recipe, args.weights).name
        start = f"{Path(args.weights).name} (SHA-256 {digest[:12]}), {recipe} recipe"
    described = (f"{name}: train {counts['train'][0]} images in {counts['train'][1]} classes, test "
                 f"{counts['test'][0]} images in {counts['test'][1]} unseen classes; resnet18 from {start}, "
                 f"{args.image_size} px, batch {args.batch_size}; REIR {args.ensemble_size} branches x "
                 f"{args.meta_class_size} meta classes, share_type {args.share_type}")
    return source, args, described


def units(names: list[str], args) -> list[dict]:
    """Every run of the grid, the cheapest budget first and there seed by seed, so a grid cut short is
    complete up to a budget and seed."""
    grid = []
    for epochs in args.epochs:
        for seed in args.seeds:
            for name in names:
                for method in args.methods:
                    if method == BEST_BRANCH:
                        continue
                    if method in BASELINES:  # no training: one per seed (seedless ones: one in all, as seed 0)
                        if epochs != args.epochs[0] or (method in SEEDLESS and seed != args.seeds[0]):
                            continue
                        grid.append({"dataset": name, "epochs": 0, "seed": 0 if method in SEEDLESS else seed,
                                     "method": method})
                        continue
                    grid.append({"dataset": name, "epochs": epochs, "seed": seed, "method": method})
    return grid


def unit_key(unit: dict, setting: str) -> tuple:
    return unit["dataset"], unit["epochs"], unit["seed"], unit["method"], setting


def load_results(path: Path | None) -> list[dict]:
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def mean_spread(values: list[float]) -> str:
    """``mean ± standard deviation`` in percent (the deviation over the seeds; none for one value)."""
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def cpu_seconds(value: float) -> str:
    """Whole seconds, or tenths below 10 (a tiny run's training)."""
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def method_table(records: list[dict], epochs: int, methods: list[str]) -> str:
    """One row per method: R@1 and MAP@R (mean ± std over seeds), last-epoch R@1, seeds, seconds."""
    lines = ["| method | R@1 | MAP@R | last-epoch R@1 | seeds | seconds | CPU seconds | training CPU s | "
             "training images / CPU s | other CPU s (evaluation, files) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        if method not in methods:
            continue
        if method == BEST_BRANCH:
            rows = [max(r["singles"], key=lambda s: s["recall@1"]) for r in records
                    if r["method"] == "REIR" and r["epochs"] == epochs]
            rows = [{"metrics": m} for m in rows]
        else:
            rows = [r for r in records if r["method"] == method and r["epochs"] in (epochs, 0)]
        if not rows:
            continue
        recall = mean_spread([r["metrics"]["recall@1"] for r in rows])
        map_r = mean_spread([r["metrics"]["map@r"] for r in rows])
        last = [r["last_recall"] for r in rows if r.get("last_recall") is not None]
        timing = (f"{np.mean([r['seconds'] for r in rows]):.0f} | {cpu_seconds(np.mean([r['cpu_seconds'] for r in rows]))}"
                  if "seconds" in rows[0] else "(in REIR) | ")
        trained = [r for r in rows if r.get("train_cpu_seconds")]
        # what a run spends beside its training steps: evaluation after every epoch, and what REIR's run writes
        timing += (f" | {cpu_seconds(np.mean([r['train_cpu_seconds'] for r in trained]))} | "
                   f"{np.mean([r['train_images'] / r['train_cpu_seconds'] for r in trained]):.0f} | "
                   f"{cpu_seconds(np.mean([r['cpu_seconds'] - r['train_cpu_seconds'] for r in trained]))}"
                   if trained else " | | | ")
        lines.append(f"| {method} | {recall} | {map_r} | {mean_spread(last) if last else ''} | {len(rows)} | "
                     f"{timing} |")
    return "\n".join(lines)


def ensemble_table(records: list[dict], epochs: int) -> str:
    """R@1 and MAP@R of the default REIR's first n branches and of each branch alone, mean over seeds."""
    runs = [r for r in records if r["method"] == "REIR" and r["epochs"] == epochs]
    if not runs:
        return ""
    lines = ["| branches | R@1 | MAP@R |", "|---|---|---|"]
    for position, (n, _) in enumerate(runs[0]["subsets"]):
        chosen = [r["subsets"][position][1] for r in runs]
        lines.append(f"| first {n} | {mean_spread([c['recall@1'] for c in chosen])} | "
                     f"{mean_spread([c['map@r'] for c in chosen])} |")
    recalls = [100 * s["recall@1"] for r in runs for s in r["singles"]]
    lines.append(f"| each branch alone (min / mean / max) | {min(recalls):.1f} / {np.mean(recalls):.1f} / "
                 f"{max(recalls):.1f} | {100 * np.mean([s['map@r'] for r in runs for s in r['singles']]):.1f} "
                 "(mean) |")
    return "\n".join(lines)


def mean_recall(records: list[dict], dataset: str, epochs: int, method: str) -> float | None:
    values = [r["metrics"]["recall@1"] for r in records
              if r["dataset"] == dataset and r["epochs"] == epochs and r["method"] == method]
    return 100 * float(np.mean(values)) if values else None


def keeps_grid_budget(method: str, args) -> bool:
    """The REIR row trains with the recipe and batch size the peers get, so a lead over them is at equal
    budget; read from the row's own flags, so a new variant needs no entry elsewhere."""
    flags = REIR_VARIANTS[method]
    grid = {"--recipe": recipe_for(args.recipe, args.weights).name, "--batch_size": str(args.batch_size)}
    chosen = {"--recipe": lambda value: recipe_for(value, args.weights).name, "--batch_size": str}
    return all(chosen[flag](value) == grid[flag] for flag, value in itertools.pairwise(flags) if flag in grid)


def summary_tables(records: list[dict], names: list[str], args) -> str:
    """Each REIR variant's mean R@1 minus the default REIR's, and the best REIR row against the best peer."""
    cells = [(name, epochs) for name in names for epochs in args.epochs]
    header = "| | " + " | ".join(f"{name}, {epochs} ep." for name, epochs in cells) + " |"
    rule = "|---" * (len(cells) + 1) + "|"
    variants = [m for m in REIR_VARIANTS if m != "REIR" and m in args.methods]
    lines = ["Mean R@1 of each REIR variant minus the default REIR's (points):", "", header, rule]
    for method in variants:
        row = []
        for name, epochs in cells:
            mine, default = (mean_recall(records, name, epochs, m) for m in (method, "REIR"))
            row.append("" if mine is None or default is None else f"{mine - default:+.1f}")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines += ["", "Best REIR row against the best peer, both with the grid's recipe and batch (mean R@1):", "",
              header, rule]
    best = {"best REIR": [m for m in REIR_VARIANTS if m in args.methods and keeps_grid_budget(m, args)],
            "best peer": [m for m in PEERS if m in args.methods]}
    rows = {label: [] for label in best}
    for name, epochs in cells:
        for label, methods in best.items():
            scored = [(mean_recall(records, name, epochs, m), m) for m in methods]
            scored = [(value, m) for value, m in scored if value is not None]
            rows[label].append(max(scored) if scored else None)
    for label, values in rows.items():
        lines.append(f"| {label} | " + " | ".join("" if v is None else f"{v[0]:.1f} ({v[1]})" for v in values) + " |")
    gaps = [("" if a is None or b is None else f"{a[0] - b[0]:+.1f}") for a, b in zip(rows["best REIR"],
                                                                                        rows["best peer"])]
    lines.append("| REIR minus peer | " + " | ".join(gaps) + " |")
    return "\n".join(lines)


def compute_table(records: list[dict]) -> str:
    """Every trained (method, epochs) of one dataset, cheapest training first: R@1 against the CPU seconds of
    training, so methods compare at equal training compute as well as at equal epochs."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for record in records:
        if record.get("train_cpu_seconds"):
            groups.setdefault((record["method"], record["epochs"]), []).append(record)
    if not groups:
        return ""
    lines = ["| method | epochs | training CPU s | R@1 | MAP@R | seeds |", "|---|---|---|---|---|---|"]
    for (method, epochs), rows in sorted(groups.items(), key=lambda item: np.mean(
            [r["train_cpu_seconds"] for r in item[1]])):
        lines.append(f"| {method} | {epochs} | {cpu_seconds(np.mean([r['train_cpu_seconds'] for r in rows]))} | "
                     f"{mean_spread([r['metrics']['recall@1'] for r in rows])} | "
                     f"{mean_spread([r['metrics']['map@r'] for r in rows])} | {len(rows)} |")
    return "\n".join(lines)


def report(records: list[dict], names: list[str], described: dict[str, str], args) -> str:
    sections = [summary_tables(records, names, args)]
    for name in names:
        mine = [r for r in records if r["dataset"] == name]
        compute = compute_table(mine)
        if compute:
            sections.append(f"### {name}: R@1 against training compute (every budget)\n\n{compute}")
        for epochs in args.epochs:
            seeds = sorted({r["seed"] for r in mine if r["epochs"] == epochs})
            sections.append("\n".join([f"### {name}, {epochs} epochs", "", f"{described[name]}; {epochs} epochs, "
                                       f"seeds {', '.join(map(str, seeds)) or 'none finished'}", "",
                                       method_table(mine, epochs, args.methods)]))
            ensemble = ensemble_table(mine, epochs)
            if ensemble:
                sections.append(f"Ensemble size ({name}, {epochs} epochs, default REIR, best epoch):\n\n{ensemble}")
    return "\n\n".join(sections)


def plot_ensemble(records: list[dict], names: list[str], epochs: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.2), dpi=100)
    for name in names:
        runs = [r for r in records if r["dataset"] == name and r["method"] == "REIR" and r["epochs"] == epochs]
        if not runs:
            continue
        sizes = [n for n, _ in runs[0]["subsets"]]
        recalls = [100 * np.mean([r["subsets"][i][1]["recall@1"] for r in runs]) for i in range(len(sizes))]
        line, = axis.plot(sizes, recalls, marker="o", label=f"{name}: first n")
        singles = [100 * s["recall@1"] for r in runs for s in r["singles"]]
        axis.fill_between(sizes, min(singles), max(singles), color=line.get_color(), alpha=0.15,
                          label=f"{name}: single branches (range)")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("branches in the embedding")
    axis.set_ylabel("R@1 on unseen classes (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more integers >= 0")
    return values


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="glyphs,fonts,fashion-mnist",
                        help="comma-separated: glyphs, fonts, typefaces, fashion-mnist (fashion-mnist skipped with a "
                             "note when not installed)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated subset of: {', '.join(METHODS)}")
    parser.add_argument("--epochs", type=int_list, default=[2, 10], help="the budgets, comma-separated")
    parser.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="comma-separated")
    parser.add_argument("--data_path", default=None, help="where glyphs, fonts and typefaces are generated (default: scratch)")
    parser.add_argument("--work", type=Path, default=None,
                        help="where runs write their outputs (default: a scratch folder, removed at the end)")
    parser.add_argument("--results", type=Path, default=None,
                        help="JSON lines of finished runs: appended to, and runs already there are skipped")
    parser.add_argument("--train_classes", type=int, default=24, help="glyphs, fonts and typefaces: training classes used")
    parser.add_argument("--test_classes", type=int, default=24, help="glyphs, fonts and typefaces: test classes used")
    parser.add_argument("--glyph_classes", choices=("lowest", "random"), default="lowest",
                        help="glyphs: the classes with the lowest code points from --glyph_from on (look-alikes, "
                             "where raw pixels are weak) or a fixed random choice (easier: raw pixels near the ceiling)")
    parser.add_argument("--glyph_from", default="U+0100",
                        help="glyphs: the first code point of --glyph_classes lowest (default: Latin Extended-A, "
                             "letters with diacritics; U+0000 is the demo's block)")
    parser.add_argument("--train_images", type=int, default=60, help="fashion-mnist: images per training class")
    parser.add_argument("--test_images", type=int, default=60, help="fashion-mnist: images per test class")
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--ensemble_size", type=int, default=48)
    parser.add_argument("--meta_class_size", type=int, default=None,
                        help="REIR meta classes (default: 12, or a quarter of the training classes where that is fewer, "
                             "at least 2)")
    parser.add_argument("--share_type", default="layer4", help="REIR's last shared module")
    parser.add_argument("--weights", default="none",
                        help="every method's starting backbone: none (random init) or a resnet18 state-dict file "
                             f"(e.g. benchmarks/pretrain.py's); a file adds the {PRETRAINED!r} baseline")
    parser.add_argument("--recipe", default="auto", choices=RECIPES,
                        help="every trained method's optimiser and schedule (reir/training/recipe.py); auto: "
                             "the original's with --weights, the scratch one without, as reir train picks")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each in its own process with one thread "
                             "(results unchanged; seconds then measure a shared machine)")
    parser.add_argument("--report_only", action="store_true",
                        help="run nothing: the tables of the runs already in --results")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write the ensemble-size plot (PNG, largest budget) here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if PRETRAINED in args.methods and args.weights == "none":
        if args.methods != list(DEFAULT_METHODS):
            raise SystemExit(f"error: {PRETRAINED!r} needs --weights (a pretrained state dict)")
        args.methods.remove(PRETRAINED)
    if args.weights != "none" and not Path(args.weights).is_file():
        raise SystemExit(f"error: --weights {args.weights} does not exist; pass a resnet18 state-dict file")
    if BEST_BRANCH in args.methods and "REIR" not in args.methods:
        args.methods.append("REIR")
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise SystemExit(f"error: unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
    if "fashion-mnist" in names and not FASHION_MNIST.is_dir() and args.datasets == get_args_parser().get_default(
            "datasets"):
        print(f"note: Fashion-MNIST not installed ({FASHION_MNIST}); skipped. "
              "Install: apt-get install -y dataset-fashion-mnist", file=sys.stderr)
        names.remove("fashion-mnist")
    started = time.perf_counter()
    records = load_results(args.results)
    with tempfile.TemporaryDirectory(prefix="reir-accuracy-") as scratch:
        work_root = args.work or Path(scratch)
        data_path = Path(args.data_path) if args.data_path else Path(scratch) / "data"
        prepared, described = {}, {}
        for name in names:
            work = work_root / name
            work.mkdir(parents=True, exist_ok=True)
            source, dataset_args, described[name] = prepare_dataset(name, work, data_path, args)
            prepared[name] = (source, work, dataset_args)
        done = {unit_key(r, r["setting"]) for r in records}
        todo = [u for u in units(names, args) if unit_key(u, described[u["dataset"]]) not in done]
        todo = [] if args.report_only else todo

        def finished(record: dict) -> None:
            records.append({**record, "setting": described[record["dataset"]]})
            if args.results:
                atomic_write(args.results, "".join(json.dumps(r) + "\n" for r in records))

        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(measure, u, *prepared[u["dataset"]]) for u in todo]
                for future in as_completed(futures):
                    finished(future.result())
        else:
            for unit in todo:
                finished(measure(unit, *prepared[unit["dataset"]]))
    current = [r for r in records if r["dataset"] in described and r["setting"] == described[r["dataset"]]]
    text = report(current, names, described, args)
    print(text + f"\n\nwhole run: {time.perf_counter() - started:.0f} s wall-clock, {len(todo)} runs", flush=True)
    if args.markdown:
        atomic_write(args.markdown, text + "\n")
    if args.plot:
        plot_ensemble(current, names, max(args.epochs), args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
