"""Train a REIR ensemble: ``train(config)`` from Python (the command is :mod:`reir.cli.train`).

Read top to bottom: ``train_one_epoch`` -> ``evaluate_splits`` -> ``train``. The flags
are the fields of :class:`reir.training.config.TrainConfig`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from reir import distributed
from reir.data.images import ImageList, build_transform
from reir.data.sampling import RankSampler, ReplayableSampler, SeededItems, class_sampler, make_loader
from reir.data.sources import load_dataset
from reir.data.splits import SplitList
from reir.devices import training_devices
from reir.errors import UsageError
from reir.fileio import OutputLock, atomic_write, claim_output, ensure_dir, write_json
from reir.model.branches import resolve_batching
from reir.model.embedding import embed
from reir.model.files import save_model
from reir.model.meta_labels import assign_meta_labels, check_sizes, grouping_room, ids_path, load_ids, save_ids
from reir.model.network import REIRNet, create_model
from reir.model.sharding import describe
from reir.plots.curves import plot_statistics
from reir.retrieval.collection_files import ROOT_KEY, recorded_root
from reir.retrieval.database import SUFFIX as DATABASE_SUFFIX
from reir.retrieval.database import Database, shared_label_ids
from reir.retrieval.metrics import evaluate_embeddings, format_metrics
from reir.training.checkpoint import EpochProgress, TrainingState, checkpoint_path, find_checkpoint, save_checkpoint
from reir.training.config import TrainConfig
from reir.training.losses import PairTerm, pair_term
from reir.training.memory import check_fits, estimate, processes_on_this_host
from reir.training.precision import Precision, precision_for
from reir.training.recipe import recipe_for
from reir.training.rng import fresh_seed, seed_everything
from reir.training.signals import StopRequest, TrainingStopped
from reir.training.tensorboard import TensorBoardWriter

log = logging.getLogger(__name__)

IMAGES_PER_CLASS = 300
# Redraw progress bars often on a terminal, rarely in a log file.
PROGRESS_INTERVAL = 0.5 if sys.stdout.isatty() else 30.0


@dataclass(frozen=True)
class Event:
    """A point a run has reached, handed to every callback of :func:`train`.

    ``step``: an optimizer step finished (``step`` counts the steps of ``epoch``), on every rank;
    ``eval_batch``: an evaluation batch was embedded; ``epoch``: the epoch's statistics ``row`` was
    written (losses, learning rate, every metric). Evaluation events come from the main rank only.
    """

    kind: str
    epoch: int
    step: int = 0
    row: dict | None = None


Callback = Callable[[Event], None]


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run's outputs are, and its resolved configuration (the seed drawn included)."""

    config: TrainConfig
    best_recall: float
    statistics: Path
    model: Path
    database: Path


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer, meta_labels: torch.Tensor,
                    device: torch.device, epoch: int, num_epochs: int,
                    progress: EpochProgress | None = None,
                    precision: Precision | None = None,
                    after_step: Callable[[EpochProgress], None] | None = None,
                    extra_loss: PairTerm | None = None) -> tuple[float, float]:
    """One pass (or its rest, after ``progress``); returns mean loss and meta-class accuracy over all branches.

    ``extra_loss(logits, targets)`` is added to the cross-entropy (``pair_loss``)."""
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
            if extra_loss is not None:
                loss = loss + extra_loss(logits, targets)
        precision.step(loss, optimizer)
        total_loss += loss.item() * len(images)
        total_correct += (logits.argmax(-1) == meta_targets).sum().item()
        total_seen += len(images)
        progress.after_step(total_loss, total_correct, total_seen)
        if after_step is not None:
            after_step(progress)
        # shown with the bar's next update: refreshing here would print a stale step count (0/N) every step
        bar.set_postfix_str(f"loss {total_loss / total_seen:.4f} acc "
                            f"{100 * total_correct / (total_seen * meta_targets.shape[1]):.2f}%", refresh=False)
    bar.close()
    return total_loss / max(total_seen, 1), total_correct / max(total_seen * meta_labels.shape[0], 1)


def embed_split(model: REIRNet, loader: DataLoader, device: torch.device, desc: str,
                precision: Precision | None = None, after_batch: Callable[[], None] | None = None) -> torch.Tensor:
    """A split's embeddings through the one embedding path, under a progress bar shown on a terminal only."""
    total = len(loader.dataset) if isinstance(loader.dataset, Sized) else None
    with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, file=sys.stdout, leave=False,
              disable=not sys.stdout.isatty()) as bar:
        return embed(model, loader, device, precision, bar, after_batch=after_batch)


def evaluate_splits(model: REIRNet, loaders: dict[str, DataLoader], recalls: list[int], device: torch.device,
                    with_nmi: bool = True, precision: Precision | None = None,
                    after_batch: Callable[[], None] | None = None
                    ) -> tuple[dict[str, float | None], dict[str, torch.Tensor]]:
    """Every metric on the evaluation splits: test against itself, or query against gallery.

    The search runs in fp32 whatever ``precision`` is, so the numbers are those ``reir eval``
    computes from the saved database.
    """
    features = {name: embed_split(model, loader, device, f"Embed {name}", precision, after_batch)
                for name, loader in loaders.items()}
    if "query" in features:
        query_labels, gallery_labels = shared_label_ids(_labels(loaders["query"]), _labels(loaders["gallery"]))
        values = evaluate_embeddings(features["query"], query_labels, recalls, features["gallery"], gallery_labels,
                                     with_nmi=with_nmi, device=device)
    else:
        (test_labels,) = shared_label_ids(_labels(loaders["test"]))
        values = evaluate_embeddings(features["test"], test_labels, recalls, with_nmi=with_nmi, device=device)
    return values, features


def write_statistics(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())


@runtime_checkable
class LabelledImages(Protocol):
    """An evaluation dataset: the class name of every image, in order."""

    labels: list[str]


def _labels(loader: DataLoader) -> list[str]:
    if not isinstance(loader.dataset, LabelledImages):
        raise TypeError(f"an evaluation loader's dataset lists its labels; {type(loader.dataset).__name__} does not")
    return loader.dataset.labels


def meta_labels_for(config: TrainConfig, classes: list[str]) -> np.ndarray:
    """The meta labels of a new run: loaded with ``load_ids``, else drawn from the seed and saved."""
    check_sizes(len(classes), config.ensemble_size, config.meta_class_size, config.label_type)
    room = grouping_room(len(classes), config.ensemble_size, config.meta_class_size)
    if room:
        log.warning("%s", room)
    path = ids_path(config.output_dir, config.data_name, config.crop_type, config.ensemble_size,
                    config.meta_class_size)
    if config.load_ids:
        codes, distance = load_ids(path, classes, config.ensemble_size, config.meta_class_size, config.label_type)
        log.info("Loaded %s meta-class ids from %s", config.label_type, path)
    else:
        codes, distance = assign_meta_labels(len(classes), config.ensemble_size, config.meta_class_size,
                                             config.label_type, seed=config.seed)
        save_ids(path, codes, classes, config.label_type, distance)
        log.info("Saved %s meta-class ids to %s", config.label_type, path)
    unique = len({tuple(col) for col in codes.T})
    log.info("Meta labels: %d classes, %d distinct code words, min Hamming distance %d of %d branches",
             len(classes), unique, distance, config.ensemble_size)
    return codes


def train_transform(config: TrainConfig, split_list: SplitList):
    """The augmentation of training images."""
    return build_transform(config.image_size, split_list.mean, split_list.std, True)


def describe_weights(origin: dict) -> str:
    """``origin`` (:func:`reir.model.network.load_backbone`'s record) in one line."""
    if origin.get("weights") == "none":
        return "random"
    source = f"torchvision {origin['torchvision']} from " if "torchvision" in origin else ""
    digest = f" (SHA-256 {origin['sha256'][:16]}...)" if "sha256" in origin else ""
    return f"{source}{origin.get('file', origin.get('weights'))}{digest}"


def build_optimizer(config: TrainConfig, model: torch.nn.Module):
    """The recipe's optimiser and scheduler: the original's with pretrained weights, reir/training/recipe.py's
    from scratch."""
    return recipe_for(config.recipe, config.weights).optimizer(model.parameters(), config.num_epochs)


def run_files(config: TrainConfig) -> dict[str, Path]:
    """The files a run writes under its output folder, by what they hold."""
    output, name = Path(config.output_dir), config.save_name
    return {"record": output / "statistics" / f"{name}_config.json",
            "statistics": output / "statistics" / f"{name}_results.csv",
            "model": output / "epochs" / f"{name}_model.safetensors",
            "database": output / "results" / f"{name}{DATABASE_SUFFIX}"}


def claim_run_outputs(config: TrainConfig, overwrite: bool = False, setting: str = "overwrite") -> None:
    """Refuse, before any work, a run whose files would replace its inputs or another run's files.

    The files of a save name are this run's own when its record (``statistics/<name>_config.json``)
    holds the same seed, or when the run resumes (the checkpoint then checks that it is the same
    run); a run of another seed, or one drawing a new seed, replaces them only with ``overwrite``.
    ``setting`` is how the caller's user sets ``overwrite``, named in the error.
    """
    files = run_files(config)
    # The dataset's own folder (a custom dataset's CSV or folder), not the folder holding every dataset.
    dataset = config.data_path if config.data_name == "custom" else Path(config.data_path) / config.data_name
    inputs = [dataset, *([config.weights] if Path(config.weights).is_file() else [])]
    for path in files.values():  # an input is never replaced, whatever overwrite says
        claim_output(path, (), inputs=inputs, overwrite=True)
    resuming = config.resume not in (None, "auto") or (
        config.resume == "auto" and checkpoint_path(config.output_dir, config.save_name).is_file())
    if overwrite or resuming or not any(path.exists() for path in files.values()):
        return
    try:
        recorded = json.loads(files["record"].read_text(encoding="utf-8")).get("seed")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        recorded = None
    if config.seed is None or recorded != config.seed:
        this = f"seed {config.seed}" if config.seed is not None else "a new random seed"
        earlier = f"seed {recorded}" if isinstance(recorded, int) else "no recorded seed"
        raise UsageError(f"{config.output_dir} already holds the run {config.save_name} ({earlier}; this run has "
                         f"{this}); resume it, set {setting} to replace it or choose another output folder")


def train(config: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train, evaluate after every epoch, keep the best epoch's model and database.

    Every problem the user can fix raises :class:`reir.errors.ReirError`. Under ``torchrun`` each
    process calls this with the same configuration. In the main thread SIGINT/SIGTERM stop the run
    after the current step with a checkpoint; ``resume="auto"`` continues it. The main process holds
    a lock on the save name in the output folder, so a second run of it there is refused at once.
    """
    context, rank_device = distributed.setup(config.device)
    try:
        devices = [rank_device] if rank_device is not None else training_devices(config.device, config.gpu_ids)
        lock = (OutputLock(Path(config.output_dir) / f".{config.save_name}.lock",
                           f"the run {config.save_name} in {config.output_dir}")
                if context.is_main else contextlib.nullcontext())
        with lock, StopRequest().installed() as stop:
            result = _run(config, stop, context, devices, list(callbacks))
        distributed.barrier(context)  # the other ranks wait for rank 0's last evaluation and saving
        return result
    finally:
        distributed.cleanup(context)


def _run(config: TrainConfig, stop: StopRequest, context: distributed.Context, devices: list[torch.device],
         callbacks: list[Callback]) -> TrainResult:
    device, name, output = devices[0], config.save_name, Path(config.output_dir)
    resumed = find_checkpoint(config.resume, output, name, config, remove_temporaries=context.is_main)
    needs = estimate(config.model, config.image_size, config.batch_size, config.recipe, config.weights,
                     resolve_batching(config.branch_batching, device), len(devices))
    log.info("%s: %s", name, needs.describe())
    check_fits(needs, devices, processes_on_this_host())
    seed = config.seed if config.seed is not None else resumed.seed if resumed else fresh_seed()
    seed = distributed.broadcast(seed, context)
    config = config.replace(seed=seed)
    seed_everything(seed)

    split_list = distributed.main_rank_first(
        lambda: load_dataset(config.data_name, config.data_path, config.crop_type, config.image_size), context)
    train_set = ImageList(split_list, "train", train_transform(config, split_list))
    check_sizes(len(train_set.classes), config.ensemble_size, config.meta_class_size, config.label_type)
    # The model before the ids: bad --weights must fail before the ids file is written. A resumed
    # run's weights are the checkpoint's: nothing is downloaded or read for them.
    model = create_model(config.model, weights="none" if resumed else config.weights)
    model.shard(devices)
    model.branch_batching = resolve_batching(config.branch_batching, device)
    if config.channels_last:
        model.use_channels_last()
    train_model = distributed.wrap(model, context, device)
    if config.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]  # a module in, a module out; stub: Callable
    precision = precision_for(config.amp, device)
    codes: np.ndarray | None
    if resumed:
        codes = resumed.meta_labels(train_set.classes)
    else:
        codes = meta_labels_for(config, train_set.classes) if context.is_main else None
    meta_labels = torch.as_tensor(distributed.broadcast(codes, context), device=device)
    eval_transform = build_transform(config.image_size, split_list.mean, split_list.std, False)
    eval_loaders = {split: make_loader(ImageList(split_list, split, eval_transform), config.batch_size,
                                       config.num_workers, device) for split in split_list.eval_splits}
    # Per-image seeds follow the global order, so every rank of a DDP run flips the same images
    # a single process would; a resume skips whole global batches.
    replay = ReplayableSampler(class_sampler(train_set.targets, IMAGES_PER_CLASS, seed, config.samples_per_class),
                               seed, config.batch_size * context.world_size)
    sampler = (RankSampler(replay, config.batch_size, context.rank, context.world_size) if context.enabled
               else replay)
    train_loader = make_loader(SeededItems(train_set), config.batch_size, config.num_workers, device, sampler)
    optimizer, scheduler = build_optimizer(config, model)
    extra_loss = pair_term(config.pair_loss, config.pair_weight)
    if extra_loss is not None and not config.samples_per_class:
        log.warning("`pair_loss` %s sees few positive pairs in batches of random images; add `samples_per_class` 4",
                    config.pair_loss)

    for folder in ("statistics", "epochs", "results"):
        ensure_dir(output / folder)
    statistics = output / "statistics" / f"{name}_results.csv"
    model_file = output / "epochs" / f"{name}_model.safetensors"
    database_file = output / "results" / f"{name}{DATABASE_SUFFIX}"
    # Where the backbone's starting weights came from; a resumed run's are those its checkpoint recorded.
    initial_weights = (resumed.meta["config"].get("initial_weights", {"weights": config.weights}) if resumed
                       else model.initial_weights)
    log.info("%s: initial weights %s", name, describe_weights(initial_weights))
    run_config = {**config.to_dict(), "save_name": name, "num_train_classes": len(train_set.classes),
                  "initial_weights": initial_weights}
    run_config.pop("resume")  # a resumed run writes the same files as an uninterrupted one
    tensorboard = TensorBoardWriter(output / "tensorboard" / name) if config.tensorboard and context.is_main else None
    if tensorboard:
        callbacks.append(tensorboard)
    log.info("%s: %d train images in %d classes, %s recipe, %s parameters, %s", name, len(train_set),
             len(train_set.classes), recipe_for(config.recipe, config.weights).name,
             f"{sum(p.numel() for p in model.parameters()):,}", describe(model, config.amp, context.world_size))

    def notify(event: Event) -> None:
        for callback in callbacks:
            callback(event)

    state = resumed.restore(model, optimizer, scheduler, precision.scaler) if resumed else TrainingState()
    replay.resume_at(state.epoch + 1, state.progress.step)
    ckpt = checkpoint_path(output, name)
    rows, best_recall = state.rows, state.best_recall
    stop.arm()
    for epoch in range(state.epoch + 1, config.num_epochs + 1):
        sampler.set_epoch(epoch)
        learning_rate = optimizer.param_groups[0]["lr"]

        def after_step(progress: EpochProgress, epoch=epoch) -> None:
            notify(Event("step", epoch, progress.step))
            stop.check()

        try:
            train_loss, train_accuracy = train_one_epoch(train_model, train_loader, optimizer, meta_labels, device,
                                                         epoch, config.num_epochs, state.progress, precision,
                                                         after_step, extra_loss)
        except TrainingStopped:
            if context.is_main:
                save_checkpoint(ckpt, model, optimizer, scheduler, precision.scaler, state, meta_labels,
                                train_set.classes, run_config)
            raise stop.error(ckpt, f"in epoch {epoch} after step {state.progress.step}") from None
        train_loss = distributed.mean_over_ranks(train_loss, len(sampler), context, device)
        train_accuracy = distributed.mean_over_ranks(train_accuracy, len(sampler), context, device)
        scheduler.step()
        if not context.is_main:
            continue
        with_nmi = config.nmi_every > 0 and (epoch % config.nmi_every == 0 or epoch == config.num_epochs)

        def after_eval_batch(epoch=epoch) -> None:
            notify(Event("eval_batch", epoch))

        metrics, features = evaluate_splits(model, eval_loaders, config.recalls, device, with_nmi, precision,
                                            after_eval_batch)
        rows.append({"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
                     "learning_rate": learning_rate, **{f"test_{k}": v for k, v in metrics.items()}})
        write_statistics(statistics, rows)
        # Beside the statistics it produced; not before, so a run that fails early replaces nothing.
        write_json(output / "statistics" / f"{name}_config.json", config.to_dict())
        notify(Event("epoch", epoch, row=dict(rows[-1])))
        log.info("Epoch %d/%d: loss %.4f acc %.2f%% | %s", epoch, config.num_epochs, train_loss,
                 100 * train_accuracy, format_metrics(metrics))
        recall = metrics[f"recall@{config.recalls[0]}"]
        if recall is not None and recall > best_recall:
            best_recall = recall
            train_eval = make_loader(ImageList(split_list, "train", eval_transform, train_set.classes),
                                     config.batch_size, config.num_workers, device)
            features["train"] = embed_split(model, train_eval, device, "Embed train", precision)
            info = {"data_name": config.data_name, "crop_type": config.crop_type, "mean": split_list.mean,
                    "std": split_list.std, "image_size": config.image_size, "epoch": epoch, "metrics": metrics,
                    "classes": train_set.classes, "meta_labels": meta_labels.cpu().tolist(),
                    "model_file": os.path.abspath(model_file)}
            # Absolute paths: the database and the model work from any directory.
            splits = {split: {"paths": [os.path.abspath(p) for p in split_list.absolute(split)],
                              "labels": split_list.splits[split].labels} for split in features}
            info[ROOT_KEY] = recorded_root([p for split in splits.values() for p in split["paths"]])
            save_model(model_file, model.state_dict(), config.model, run_config, info)
            Database(features, splits, run_config, info).save(database_file)
        state.epoch_done(epoch, best_recall)
        save_checkpoint(ckpt, model, optimizer, scheduler, precision.scaler, state, meta_labels, train_set.classes,
                        run_config)
        if stop.requested and epoch < config.num_epochs:
            raise stop.error(ckpt, f"after epoch {epoch}")
    if tensorboard:
        tensorboard.close()
    if context.is_main:
        plot_statistics(statistics, overwrite=True)  # beside the run's statistics, which its claim covers
        log.info("Best R@%d: %.2f%%. Outputs: %s, %s, %s", config.recalls[0], 100 * best_recall, statistics,
                 model_file, database_file)
    return TrainResult(config, best_recall, statistics, model_file, database_file)
