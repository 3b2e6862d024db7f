"""REIR next to its alternatives on unseen classes: same data, backbone, image size and epochs.

Methods (resnet18 from random initialisation everywhere):

- raw pixels: cosine of the mean-centred pixels; the untrained network (REIR's shape, random weights);
- REIR with fixed and with random meta labels, and the best single branch of the fixed one;
- REIR (fixed) with the original's recipe (Adam 1e-4), to show why ``--weights none`` gets its own;
- a softmax classifier over all training classes (REIR with one branch and one meta class per class,
  which ``reir train`` refuses, so trained here with the same recipe), its logits as the embedding;
- pytorch-metric-learning's ProxyAnchor and MultiSimilarity (+ its miner) losses with their published
  default hyperparameters, a 512-d linear head and an m-per-class sampler.

Every trained method uses the same recipe (reir.training.recipe, the one ``--weights none`` selects), batch
size and number of epochs, is evaluated on the test classes after every epoch and reports its best
epoch, as train.py does (the original's protocol; optimistic in the same way for every method); the
last epoch's R@1 is printed beside it. REIR trains through ``reir train``'s entry point.
The ensemble-size table evaluates the first 1, 2, 4, ... branches of the trained fixed-label REIR.

    python benchmarks/accuracy.py                            # glyphs and, if installed, Fashion-MNIST
    python benchmarks/accuracy.py --datasets glyphs --markdown out.md --plot ensemble.png

Fashion-MNIST comes from Debian's package (classes 0-4 train, 5-9 test):
``apt-get install -y dataset-fashion-mnist`` (files under /usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from reir import cli  # noqa: E402
from reir.data.custom import load_custom  # noqa: E402
from reir.data.glyphs import prepare_glyphs, write_subset_csv  # noqa: E402
from reir.data.images import ImageList, build_transform  # noqa: E402
from reir.model.network import ModelConfig, build_backbone  # noqa: E402
from reir.retrieval.baselines import label_ids, network_features, raw_pixel_features, untrained_features  # noqa: E402
from reir.retrieval.database import load_database  # noqa: E402
from reir.retrieval.metrics import retrieval_metrics  # noqa: E402
from reir.training.recipe import SCRATCH  # noqa: E402

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
RECALLS = (1, 2, 4, 8)
METHODS = ("raw pixels", "untrained network", "REIR fixed", "REIR random", "REIR best single branch",
           "REIR fixed (original recipe)", "softmax", "ProxyAnchor", "MultiSimilarity")
ENSEMBLE_SIZES = (1, 2, 4, 8, 16, 48)
EMBEDDING_SIZE = 512
SAMPLES_PER_CLASS = 4
# Proxy Anchor's paper trains the proxies at 1e-2 (100 times its network's rate).
PROXY_LEARNING_RATE = 1e-2


def glyphs_source(work: Path, data_path: Path, args) -> Path:
    """A CSV over some glyph classes: the demo's block of look-alikes, or a seeded random choice."""
    return write_subset_csv(prepare_glyphs(data_path), work / "glyphs.csv", args.train_classes, args.test_classes,
                            None if args.glyph_classes == "lowest" else args.seed)


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


SOURCES = {"glyphs": glyphs_source, "fashion-mnist": fashion_source}


def scores(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return retrieval_metrics(features, labels, RECALLS)


class Run:
    """One method's result: metrics of its best epoch (by R@1), last epoch's R@1, wall and CPU seconds."""

    def __init__(self, metrics: dict[str, float], seconds: float, last_recall: float | None = None,
                 cpu_seconds: float | None = None):
        self.metrics, self.seconds, self.last_recall, self.cpu_seconds = metrics, seconds, last_recall, cpu_seconds

    @classmethod
    def timed(cls, metrics) -> "Run":
        start, cpu = time.perf_counter(), time.process_time()
        values = metrics()
        return cls(values, time.perf_counter() - start, cpu_seconds=time.process_time() - cpu)


def train_cli(source: Path, output: Path, args, *options: str) -> tuple[Run, Path]:
    """``reir train`` (in this process); the best epoch's row of its statistics and its database."""
    argv = ["train", "--data_name", "custom", "--data_path", str(source), "--output_dir", str(output),
            "--weights", "none", "--image_size", str(args.image_size), "--batch_size", str(args.batch_size),
            "--num_epochs", str(args.epochs), "--num_workers", "0", "--seed", str(args.seed), "--device", "cpu",
            "--nmi_every", "0", *options]
    log = io.StringIO()
    start, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = cli.main(argv)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if code:
        raise SystemExit(f"error: reir {' '.join(argv)} failed:\n{log.getvalue()[-3000:]}")
    (statistics,) = (output / "statistics").glob("*_results.csv")
    with open(statistics, newline="") as handle:
        rows = list(csv.DictReader(handle))
    best = max(rows, key=lambda row: float(row["test_recall@1"]))  # first of equals, as train.py keeps
    metrics = {key[len("test_"):]: float(value) for key, value in best.items()
               if key.startswith("test_") and value not in ("", None) and key != "test_nmi"}
    (database,) = (output / "results").glob("*_data_base.safetensors")
    return Run(metrics, seconds, float(rows[-1]["test_recall@1"]), cpu), database


class Embedder(nn.Module):
    """resnet18 with its classifier replaced by a linear embedding head."""

    def __init__(self, size: int):
        super().__init__()
        self.backbone = build_backbone("resnet18", "none")
        self.backbone.fc = nn.Linear(self.backbone.fc.in_features, size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)[:, None]  # one "branch" of REIR's [batch, ensemble, size] shape


def samples_per_class(num_classes: int, batch_size: int) -> int:
    """The m of the m-per-class sampler: 4 where the classes allow, more for few classes."""
    m = SAMPLES_PER_CLASS
    while m < batch_size and (m * num_classes < batch_size or batch_size % m):
        m += 1
    return m


def train_embedder(split_list, method: str, args) -> Run:
    """softmax, ProxyAnchor or MultiSimilarity on resnet18 with a linear head, REIR's scratch recipe."""
    from pytorch_metric_learning import losses, miners, samplers

    start, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(args.seed)
    train_set = ImageList(split_list, "train", build_transform(args.image_size, split_list.mean, split_list.std,
                                                               train=True))
    classes = len(train_set.classes)
    # softmax: one logit per training class, embedded as REIR embeds a branch (its logits L2-normalised).
    model = Embedder(classes if method == "softmax" else EMBEDDING_SIZE)
    groups = [{"params": model.parameters()}]
    miner, sampler = None, None
    if method == "softmax":
        loss_fn = lambda logits, targets, _: nn.functional.cross_entropy(logits, targets)  # noqa: E731
    elif method == "ProxyAnchor":
        loss_fn = losses.ProxyAnchorLoss(classes, EMBEDDING_SIZE)
        groups.append({"params": loss_fn.parameters(), "lr": PROXY_LEARNING_RATE, "weight_decay": 0.0})
    else:
        loss_fn, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()
    if method != "softmax":
        sampler = samplers.MPerClassSampler(train_set.targets.numpy(), samples_per_class(classes, args.batch_size),
                                            args.batch_size, length_before_new_iter=len(train_set))
    optimizer, scheduler = SCRATCH.optimizer(groups, args.epochs)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                         shuffle=sampler is None, drop_last=True)
    labels = label_ids(split_list, "test")
    best, last = None, None
    for _ in range(args.epochs):
        model.train()
        for images, batch_targets in loader:
            embeddings = model(images)[:, 0]
            pairs = miner(embeddings, batch_targets) if miner else None
            loss = loss_fn(embeddings, batch_targets, pairs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        last = scores(network_features(model, split_list, "test", args.image_size), labels)
        if best is None or last["recall@1"] > best["recall@1"]:
            best = last
    return Run(best, time.perf_counter() - start, last["recall@1"], time.process_time() - cpu)


def branch_subsets(features: torch.Tensor, labels: torch.Tensor) -> tuple[list[tuple[int, dict]], list[dict]]:
    """Metrics of the first n branches for each size in ENSEMBLE_SIZES, and of every branch alone."""
    size = features.shape[1]
    counts = sorted({n for n in ENSEMBLE_SIZES if n < size} | {size})
    subsets = [(n, scores(features[:, :n], labels)) for n in counts]
    singles = [scores(features[:, b:b + 1], labels) for b in range(size)]
    return subsets, singles


def measure(method: str, name: str, source: Path, work: Path, split_list, args) -> tuple[Run, list, list]:
    """One method's run; for REIR fixed also its ensemble-size rows and every branch alone."""
    print(f"[{name}] {method} ...", file=sys.stderr, flush=True)
    if args.jobs > 1:
        torch.set_num_threads(1)  # the methods share the cores
    labels = label_ids(split_list, "test")
    reir_options = ["--share_type", args.share_type, "--ensemble_size", str(args.ensemble_size),
                    "--meta_class_size", str(args.meta_class_size)]
    if method == "raw pixels":
        return Run.timed(lambda: scores(raw_pixel_features(split_list, "test", args.image_size), labels)), [], []
    if method == "untrained network":
        config = ModelConfig("resnet18", args.share_type, args.ensemble_size, args.meta_class_size)
        return Run.timed(lambda: scores(untrained_features(config, args.seed, split_list, "test", args.image_size),
                                        labels)), [], []
    if method in ("REIR fixed", "REIR random"):
        label_type = method.split()[1]
        run, database = train_cli(source, work / f"{name}-{label_type}", args, "--label_type", label_type,
                                  *reir_options)
        if label_type == "random":
            return run, [], []
        return (run, *branch_subsets(load_database(database).features["test"], labels))
    if method == "REIR fixed (original recipe)":
        return train_cli(source, work / f"{name}-original", args, "--recipe", "original", *reir_options)[0], [], []
    return train_embedder(split_list, method, args), [], []


def run_dataset(name: str, work: Path, data_path: Path, args) -> tuple[dict[str, Run], list, list, str]:
    source = SOURCES[name](work, data_path, args)
    split_list = load_custom(source, "uncropped")
    train_classes = len(split_list.splits["train"].classes)
    if args.meta_class_size is None:  # 12 as the original, fewer where there are few classes
        args.meta_class_size = 12 if train_classes >= 24 else max(2, train_classes // 2)
    methods = [m for m in args.methods if m != "REIR best single branch"]
    if "REIR best single branch" in args.methods and "REIR fixed" not in methods:
        methods.append("REIR fixed")
    context = (name, source, work, split_list, args)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = dict(zip(methods, pool.map(measure, methods, *([value] * len(methods) for value in context))))
    else:
        results = {method: measure(method, *context) for method in methods}
    runs = {method: run for method, (run, _, _) in results.items()}
    subsets, singles = results["REIR fixed"][1:] if "REIR fixed" in results else ([], [])
    if "REIR best single branch" in args.methods:
        best = max(singles, key=lambda values: values["recall@1"])
        runs["REIR best single branch"] = Run(best, runs["REIR fixed"].seconds, cpu_seconds=None)
    counts = {split: (len(s), len(s.classes)) for split, s in split_list.splits.items()}
    described = (f"{name}: train {counts['train'][0]} images in {counts['train'][1]} classes, test "
                 f"{counts['test'][0]} images in {counts['test'][1]} unseen classes; resnet18 from random init, "
                 f"{args.image_size} px, {args.epochs} epochs, batch {args.batch_size}, seed {args.seed}; REIR "
                 f"{args.ensemble_size} branches x {args.meta_class_size} meta classes, share_type {args.share_type}; "
                 f"{args.jobs} method(s) at a time")
    return runs, subsets, singles, described


def method_table(runs: dict[str, Run]) -> str:
    lines = ["| method | R@1 | R@2 | R@4 | R@8 | MAP@R | last-epoch R@1 | seconds | CPU seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        if method not in runs:
            continue
        run = runs[method]
        cells = [f"{100 * run.metrics[f'recall@{k}']:.1f}" for k in RECALLS] + [f"{100 * run.metrics['map@r']:.1f}"]
        last = "" if run.last_recall is None else f"{100 * run.last_recall:.1f}"
        if method == "REIR best single branch":
            seconds = "(in REIR fixed) | "
        else:
            seconds = f"{run.seconds:.0f} | {run.cpu_seconds:.0f}"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {last} | {seconds} |")
    return "\n".join(lines)


def ensemble_table(subsets, singles) -> str:
    if not subsets:
        return ""
    recalls = [100 * s["recall@1"] for s in singles]
    lines = ["| branches | R@1 | MAP@R |", "|---|---|---|"]
    lines += [f"| first {n} | {100 * v['recall@1']:.1f} | {100 * v['map@r']:.1f} |" for n, v in subsets]
    lines.append(f"| each branch alone (min / mean / max) | {min(recalls):.1f} / {np.mean(recalls):.1f} / "
                 f"{max(recalls):.1f} | {100 * np.mean([s['map@r'] for s in singles]):.1f} (mean) |")
    return "\n".join(lines)


def plot_ensemble(results: dict[str, tuple], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.2), dpi=100)
    for name, (subsets, singles) in results.items():
        if not subsets:
            continue
        sizes = [n for n, _ in subsets]
        line, = axis.plot(sizes, [100 * v["recall@1"] for _, v in subsets], marker="o", label=f"{name}: first n")
        recalls = [100 * s["recall@1"] for s in singles]
        axis.fill_between(sizes, min(recalls), max(recalls), color=line.get_color(), alpha=0.15,
                          label=f"{name}: single branches (range)")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("branches in the embedding")
    axis.set_ylabel("R@1 on unseen classes (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="glyphs,fashion-mnist",
                        help="comma-separated: glyphs, fashion-mnist (skipped with a note when not installed)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument("--data_path", default=None, help="where glyphs is generated (default: a scratch folder)")
    parser.add_argument("--train_classes", type=int, default=300, help="glyphs: training classes used")
    parser.add_argument("--test_classes", type=int, default=300, help="glyphs: test classes used")
    parser.add_argument("--glyph_classes", choices=("lowest", "random"), default="lowest",
                        help="glyphs: the classes with the lowest code points (the demo's look-alikes, where raw "
                             "pixels are weak) or a seeded random choice (easier: raw pixels near the ceiling)")
    parser.add_argument("--train_images", type=int, default=150, help="fashion-mnist: images per training class")
    parser.add_argument("--test_images", type=int, default=150, help="fashion-mnist: images per test class")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--ensemble_size", type=int, default=48)
    parser.add_argument("--meta_class_size", type=int, default=None,
                        help="REIR meta classes (default: 12, or 2 with fewer than 12 training classes)")
    parser.add_argument("--share_type", default="layer4", help="REIR's last shared module")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1,
                        help="methods measured at a time, each in its own process with one thread "
                             "(results unchanged; seconds then measure a shared machine)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--plot", type=Path, default=None, help="write the ensemble-size plot (PNG) here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(METHODS)}")
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if "fashion-mnist" in names and not FASHION_MNIST.is_dir() and args.datasets == get_args_parser().get_default(
            "datasets"):
        print(f"note: Fashion-MNIST not installed ({FASHION_MNIST}); skipped. "
              "Install: apt-get install -y dataset-fashion-mnist", file=sys.stderr)
        names.remove("fashion-mnist")
    report, ensembles = [], {}
    with tempfile.TemporaryDirectory(prefix="reir-accuracy-") as scratch:
        for name in names:
            if name not in SOURCES:
                raise SystemExit(f"error: unknown dataset {name!r}; choose glyphs or fashion-mnist")
            work = Path(scratch) / name
            work.mkdir()
            data_path = Path(args.data_path) if args.data_path else Path(scratch) / "data"
            dataset_args = argparse.Namespace(**vars(args))
            runs, subsets, singles, described = run_dataset(name, work, data_path, dataset_args)
            ensembles[name] = (subsets, singles)
            section = [f"### {name}", "", described, "", method_table(runs)]
            if subsets:
                section += ["", f"Ensemble size ({name}, REIR fixed, best epoch):", "", ensemble_table(subsets, singles)]
            report.append("\n".join(section))
            print(report[-1] + "\n", flush=True)
    if args.markdown:
        args.markdown.write_text("\n\n".join(report) + "\n", encoding="utf-8")
    if args.plot and any(subsets for subsets, _ in ensembles.values()):
        plot_ensemble(ensembles, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
