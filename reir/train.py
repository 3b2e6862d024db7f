"""Train a REIR ensemble: the original's ``train.py``, flag for flag.

Read top to bottom: ``get_args_parser`` -> ``train_one_epoch`` -> ``evaluate`` -> ``main``.
"""

from __future__ import annotations

import csv
import io
import random
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import killpoints
from .checkpoint import (EpochProgress, ReplayableSampler, SeededItems, StopRequest, TrainingState, TrainingStopped,
                         checkpoint_for_resume, checkpoint_path, loader_options, save_checkpoint)
from . import distributed, recipe
from .branches import BATCHING_MODES, resolve_batching
from .cliutil import ArgumentParser, csv_ints, gpu_id_list, non_negative_int, positive_int, reports_errors
from .data import DATA_NAMES
from .data.images import CappedClassSampler, ImageList, build_transform
from .data.sources import load_dataset
from .database import SUFFIX as DATABASE_SUFFIX, Database
from .errors import ReirError
from .fileio import atomic_write, ensure_dir, save_tensors
from .labels import LABEL_TYPES, assign_meta_labels, check_sizes, ids_path, load_ids, save_ids
from .metrics import evaluate_embeddings, format_metrics
from .model import MODEL_TYPES, SHARE_TYPES, ModelConfig, REIRNet, create_model, embedding_from_logits
from .plot import plot_statistics
from .precision import AMP_DTYPES, Precision, precision_for
from .sharding import describe, shard_devices

IMAGES_PER_CLASS = 300
# Redraw progress bars often on a terminal, rarely in a log file.
PROGRESS_INTERVAL = 0.5 if sys.stdout.isatty() else 30.0


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    parser = ArgumentParser(prog="train.py", add_help=add_help,
                            description="Train a REIR model (Randomized Ensembles for Image Retrieval).")
    original = parser.add_argument_group("flags of the original train.py")
    original.add_argument("--data_name", default="car", choices=DATA_NAMES, help="dataset name")
    original.add_argument("--crop_type", default="uncropped", choices=["uncropped", "cropped"],
                          help="crop to the bounding box (car, cub and custom only)")
    original.add_argument("--label_type", default="fixed", choices=LABEL_TYPES,
                          help="meta labels: fixed (distinct code words) or random")
    original.add_argument("--recalls", default="1,2,4,8", type=csv_ints, help="selected recalls")
    original.add_argument("--model_type", default="resnet18", choices=MODEL_TYPES, help="backbone type")
    original.add_argument("--share_type", default="layer1", choices=SHARE_TYPES, help="last shared module")
    original.add_argument("--with_random", action="store_true", help="random branch weights in training")
    original.add_argument("--load_ids", action="store_true", help="reuse saved meta-class ids")
    original.add_argument("--batch_size", default=10, type=positive_int, help="train batch size")
    original.add_argument("--num_epochs", default=20, type=positive_int, help="train epochs number")
    original.add_argument("--ensemble_size", default=48, type=positive_int, help="ensemble model size")
    original.add_argument("--meta_class_size", default=12, type=positive_int, help="meta class size")
    original.add_argument("--gpu_ids", default="0,1", type=gpu_id_list, help="selected GPUs")
    extra = parser.add_argument_group("REIR extras")
    extra.add_argument("--weights", default="imagenet",
                       help="backbone init: imagenet, none (random) or a state-dict file")
    extra.add_argument("--seed", default=None, type=non_negative_int,
                       help="random seed (default: drawn at random and recorded)")
    extra.add_argument("--image_size", default=256, type=positive_int, help="images are resized to this square")
    extra.add_argument("--data_path", default="data", help="folder holding the prepared datasets")
    extra.add_argument("--output_dir", default=".", help="statistics/, epochs/ and results/ go here")
    extra.add_argument("--num_workers", default=4, type=non_negative_int, help="data loader processes")
    extra.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    extra.add_argument("--resume", default=None, metavar="PATH|auto",
                       help="continue from a checkpoint; auto: this save name's, if any (docs/RELIABILITY.md)")
    extra.add_argument("--nmi_every", default=1, type=non_negative_int,
                       help="compute NMI (k-means) every N epochs and at the last; 0 = never (slow on SOP on CPU)")
    recipe.add_arguments(extra)
    speed = parser.add_argument_group("speed and scale-out (none changes what is computed in fp32)")
    speed.add_argument("--amp", default="off", choices=list(AMP_DTYPES),
                       help="autocast precision: bf16, fp16 (with loss scaling) or off (fp32)")
    speed.add_argument("--channels_last", action="store_true", help="NHWC memory layout for convolutions")
    speed.add_argument("--compile", action="store_true", help="compile the model with torch.compile")
    speed.add_argument("--branch_batching", default="auto", choices=BATCHING_MODES,
                       help="run branches one by one (loop) or as grouped convolutions; auto picks the "
                            "measured faster one for the device")
    return parser


def save_name(args) -> str:
    """The original's file stem, so its inference/ablation defaults keep their meaning."""
    randomness = "random" if args.with_random else "unrandom"
    return (f"{args.data_name}_{args.crop_type}_{args.label_type}_{randomness}_{args.share_type}_"
            f"{args.model_type}_{args.ensemble_size}_{args.meta_class_size}")


def resolve_device(requested: str | None, gpu_ids: list[int]) -> torch.device:
    """cuda when available; GPU ids that do not exist are dropped with a one-line note."""
    if requested is not None:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise ReirError(f"--device {requested!r} is not a device; use cpu, cuda or cuda:N", 2) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ReirError("--device cuda requested but no CUDA GPU is available; use --device cpu", 2)
        if device.type != "cuda":
            return device
    elif not torch.cuda.is_available():
        return torch.device("cpu")
    present = [i for i in gpu_ids if i < torch.cuda.device_count()]
    if len(present) < len(gpu_ids):
        absent = sorted(set(gpu_ids) - set(present))
        print(f"note: GPU ids {absent} do not exist; using {present or [0]}", file=sys.stderr)
    return torch.device("cuda", present[0] if present else 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_loader(dataset, batch_size: int, num_workers: int, device: torch.device, sampler=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=False, **loader_options())


def train_one_epoch(model: REIRNet, loader: DataLoader, optimizer, meta_labels: torch.Tensor,
                    device: torch.device, epoch: int, num_epochs: int,
                    progress: EpochProgress | None = None,
                    precision: Precision | None = None) -> tuple[float, float]:
    """One pass (or its rest, after ``progress``); returns mean loss and meta-class accuracy over all branches."""
    precision = precision or precision_for("off", device)
    model.train()
    progress = progress or EpochProgress()
    total_loss, total_correct, total_seen = progress.totals()
    bar = tqdm(loader, desc=f"Train {epoch}/{num_epochs}", dynamic_ncols=True, file=sys.stdout,
                mininterval=PROGRESS_INTERVAL)
    for images, targets in bar:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        meta_targets = meta_labels[:, targets].T  # [batch, ensemble]
        with precision.autocast():
            logits = model(images)  # [batch, ensemble, meta]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), meta_targets.flatten())
        precision.step(loss, optimizer)
        total_loss += loss.item() * len(images)
        total_correct += (logits.argmax(-1) == meta_targets).sum().item()
        total_seen += len(images)
        progress.after_step(total_loss, total_correct, total_seen)
        bar.set_postfix_str(f"loss {total_loss / total_seen:.4f} acc "
                            f"{100 * total_correct / (total_seen * meta_targets.shape[1]):.2f}%")
    bar.close()
    return total_loss / max(total_seen, 1), total_correct / max(total_seen * meta_labels.shape[0], 1)


@torch.no_grad()
def embed(model: REIRNet, loader: DataLoader, device: torch.device, desc: str) -> torch.Tensor:
    """Embeddings ``[N, ensemble, meta]``, every branch L2-normalised."""
    model.eval()
    chunks = []
    for images, _ in tqdm(loader, desc=desc, dynamic_ncols=True, file=sys.stdout, leave=False,
                          disable=not sys.stdout.isatty()):
        chunks.append(embedding_from_logits(model(images.to(device, non_blocking=True))).cpu())
        killpoints.reached("eval_batch")
    return torch.cat(chunks)


def evaluate(model: REIRNet, loaders: dict[str, DataLoader], recalls: list[int],
             device: torch.device, with_nmi: bool = True) -> tuple[dict[str, float | None], dict[str, torch.Tensor]]:
    """Every metric on the evaluation splits: test against itself, or query against gallery."""
    features = {name: embed(model, loader, device, f"Embed {name}") for name, loader in loaders.items()}
    if "query" in features:
        query_labels, gallery_labels = _shared_label_ids(loaders["query"].dataset, loaders["gallery"].dataset)
        values = evaluate_embeddings(features["query"], query_labels, recalls, features["gallery"], gallery_labels,
                                     with_nmi=with_nmi, device=device)
    else:
        (test_labels,) = _shared_label_ids(loaders["test"].dataset)
        values = evaluate_embeddings(features["test"], test_labels, recalls, with_nmi=with_nmi, device=device)
    return values, features


def _shared_label_ids(*datasets: ImageList) -> list[torch.Tensor]:
    vocabulary = {name: i for i, name in enumerate(sorted({l for d in datasets for l in d.labels}))}
    return [torch.tensor([vocabulary[l] for l in d.labels]) for d in datasets]


def write_statistics(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())


def meta_labels_for(args, classes: list[str]) -> tuple[np.ndarray, int]:
    check_sizes(len(classes), args.ensemble_size, args.meta_class_size, args.label_type)
    path = ids_path(args.output_dir, args.data_name, args.crop_type, args.ensemble_size, args.meta_class_size)
    if args.load_ids:
        codes, distance = load_ids(path, classes, args.ensemble_size, args.meta_class_size, args.label_type)
        print(f"Loaded {args.label_type} meta-class ids from {path}")
    else:
        codes, distance = assign_meta_labels(len(classes), args.ensemble_size, args.meta_class_size,
                                             args.label_type, seed=args.seed)
        save_ids(path, codes, classes, args.label_type, distance)
        print(f"Saved {args.label_type} meta-class ids to {path}")
    unique = len({tuple(col) for col in codes.T})
    print(f"Meta labels: {len(classes)} classes, {unique} distinct code words, "
          f"min Hamming distance {distance} of {args.ensemble_size} branches")
    return codes, distance


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    context, device = distributed.setup(args.device)
    try:
        with StopRequest().installed() as stop:
            code = train(args, stop, context, device or resolve_device(args.device, args.gpu_ids))
        distributed.barrier(context)  # the other ranks wait for rank 0's last evaluation and saving
        return code
    finally:
        distributed.cleanup(context)


def train(args, stop: StopRequest, context: distributed.Context, device: torch.device) -> int:
    name = save_name(args)
    resumed = checkpoint_for_resume(args, name)
    if args.seed is None:
        args.seed = int(np.random.SeedSequence().entropy % 2**31)
    args.seed = distributed.broadcast(args.seed, context)
    seed_everything(args.seed)
    output = Path(args.output_dir)

    split_list = load_dataset(args.data_name, args.data_path, args.crop_type, args.image_size)
    train_set = ImageList(split_list, "train", build_transform(args.image_size, split_list.mean, split_list.std, True))
    check_sizes(len(train_set.classes), args.ensemble_size, args.meta_class_size, args.label_type)
    # The model before the ids: bad --weights must fail before the ids file is written.
    config = ModelConfig(args.model_type, args.share_type, args.ensemble_size, args.meta_class_size, args.with_random)
    model = create_model(config, weights=args.weights)
    model.shard([device] if context.enabled else shard_devices(device, args.gpu_ids))
    model.branch_batching = resolve_batching(args.branch_batching, device)
    if args.channels_last:
        model.use_channels_last()
    train_model = distributed.wrap(model, context, device)
    train_model = torch.compile(train_model) if args.compile else train_model
    precision = precision_for(args.amp, device)
    if resumed:
        codes = resumed.meta_labels(train_set.classes)
    else:
        codes = meta_labels_for(args, train_set.classes)[0] if context.is_main else None
    meta_labels = torch.as_tensor(distributed.broadcast(codes, context), device=device)
    eval_transform = build_transform(args.image_size, split_list.mean, split_list.std, False)
    eval_loaders = {split: make_loader(ImageList(split_list, split, eval_transform), args.batch_size,
                                       args.num_workers, device) for split in split_list.eval_splits}
    # Per-image seeds follow the global order, so every rank of a DDP run flips the same images
    # a single process would; a resume skips whole global batches.
    replay = ReplayableSampler(CappedClassSampler(train_set.targets, IMAGES_PER_CLASS, seed=args.seed),
                               args.seed, args.batch_size * context.world_size)
    sampler = distributed.RankSampler(replay, args.batch_size, context) if context.enabled else replay
    train_loader = make_loader(SeededItems(train_set), args.batch_size, args.num_workers, device, sampler)

    training = recipe.recipe_for(args.recipe, args.weights)
    optimizer, scheduler = training.optimizer(model.parameters(), args.num_epochs)
    for folder in ("statistics", "epochs", "results"):
        ensure_dir(output / folder)
    run_config = {**vars(args), "save_name": name, "num_train_classes": len(train_set.classes)}
    run_config.pop("resume")  # a resumed run writes the same files as an uninterrupted one
    print(f"{name}: {len(train_set)} train images in {len(train_set.classes)} classes, {training.name} recipe, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, "
          + describe(model, args.amp, context.world_size))

    state = resumed.restore(model, optimizer, scheduler) if resumed else TrainingState()
    replay.resume_at(state.epoch + 1, state.progress.step)
    ckpt = checkpoint_path(output, name)
    rows, best_recall = state.rows, state.best_recall
    stop.arm(state.progress)
    for epoch in range(state.epoch + 1, args.num_epochs + 1):
        sampler.set_epoch(epoch)
        try:
            train_loss, train_accuracy = train_one_epoch(train_model, train_loader, optimizer, meta_labels, device,
                                                         epoch, args.num_epochs, state.progress, precision)
        except TrainingStopped:
            if context.is_main:
                save_checkpoint(ckpt, model, optimizer, scheduler, state, meta_labels, train_set.classes, run_config)
            raise stop.error(ckpt, f"in epoch {epoch} after step {state.progress.step}") from None
        train_loss = distributed.mean_over_ranks(train_loss, len(sampler), context, device)
        train_accuracy = distributed.mean_over_ranks(train_accuracy, len(sampler), context, device)
        scheduler.step()
        if not context.is_main:
            continue
        with_nmi = args.nmi_every > 0 and (epoch % args.nmi_every == 0 or epoch == args.num_epochs)
        with precision.autocast():
            metrics, features = evaluate(model, eval_loaders, args.recalls, device, with_nmi)
        rows.append({"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
                     **{f"test_{k}": v for k, v in metrics.items()}})
        write_statistics(output / "statistics" / f"{name}_results.csv", rows)
        print(f"Epoch {epoch}/{args.num_epochs}: loss {train_loss:.4f} acc {100 * train_accuracy:.2f}% | "
              + format_metrics(metrics))
        if metrics[f"recall@{args.recalls[0]}"] > best_recall:
            best_recall = metrics[f"recall@{args.recalls[0]}"]
            train_eval = make_loader(ImageList(split_list, "train", eval_transform, train_set.classes),
                                     args.batch_size, args.num_workers, device)
            with precision.autocast():
                features["train"] = embed(model, train_eval, device, "Embed train")
            info = {"data_name": args.data_name, "crop_type": args.crop_type, "mean": split_list.mean,
                    "std": split_list.std, "image_size": args.image_size, "epoch": epoch, "metrics": metrics,
                    "classes": train_set.classes, "meta_labels": meta_labels.cpu().tolist(),
                    "model_file": str(output / "epochs" / f"{name}_model.safetensors")}
            splits = {split: {"paths": split_list.absolute(split), "labels": split_list.splits[split].labels}
                      for split in features}
            save_tensors(output / "epochs" / f"{name}_model.safetensors", model.state_dict(),
                         {"format": "reir-model/1", "config": run_config, "model": asdict(config), "info": info})
            Database(features, splits, run_config, info).save(output / "results" / f"{name}{DATABASE_SUFFIX}")
        state.epoch_done(epoch, best_recall)
        save_checkpoint(ckpt, model, optimizer, scheduler, state, meta_labels, train_set.classes, run_config)
        if stop.signum is not None and epoch < args.num_epochs:
            raise stop.error(ckpt, f"after epoch {epoch}")
    if not context.is_main:
        return 0
    plot_statistics(output / "statistics" / f"{name}_results.csv")
    print(f"Best R@{args.recalls[0]}: {100 * best_recall:.2f}%. Outputs: {output / 'statistics' / (name + '_results.csv')}, "
          f"{output / 'epochs' / (name + '_model.safetensors')}, {output / 'results' / (name + DATABASE_SUFFIX)}")
    return 0
