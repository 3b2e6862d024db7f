"""Which images an epoch sees, in which order, with which augmentation seed: replayable on any machine.

Each training image's augmentation is seeded by ``(seed, epoch, image)`` (:class:`ReplayableSampler`
+ :class:`SeededItems`), so an epoch gives the same batches whatever ``num_workers`` is, can be
continued from any batch after a resume, and splits into the same global batches over DDP ranks
(:class:`RankSampler`).
"""

from __future__ import annotations

import itertools
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class CappedClassSampler(Sampler[int]):
    """Each epoch, at most ``cap`` randomly chosen images of every class, in random order.

    Deterministic given ``seed`` and the epoch set with :meth:`set_epoch`, so a resumed or
    distributed run draws the same images.
    """

    def __init__(self, targets: torch.Tensor, cap: int = 300, seed: int = 0):
        self.by_class = [np.flatnonzero(targets.numpy() == c) for c in np.unique(targets.numpy())]
        self.cap = cap
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        chosen = [rng.choice(members, size=min(self.cap, len(members)), replace=False) for members in self.by_class]
        picked = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
        return rng.permutation(picked).tolist()

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return sum(min(self.cap, len(m)) for m in self.by_class)


class ClassGroupedSampler(CappedClassSampler):
    """:class:`CappedClassSampler`'s images, ordered in runs of ``per_class`` images of one class.

    The runs are shuffled, so a batch holds about ``batch_size / per_class`` classes with
    ``per_class`` images each: the positive pairs a pairwise loss needs.
    """

    def __init__(self, targets: torch.Tensor, per_class: int, cap: int = 300, seed: int = 0):
        super().__init__(targets, cap, seed)
        self.per_class = per_class

    def indices(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        runs = []
        for members in self.by_class:
            chosen = rng.choice(members, size=min(self.cap, len(members)), replace=False)
            runs += [chosen[i:i + self.per_class] for i in range(0, len(chosen), self.per_class)]
        return [int(i) for r in rng.permutation(len(runs)) for i in runs[r]]


def class_sampler(targets: torch.Tensor, cap: int, seed: int, per_class: int = 0) -> CappedClassSampler:
    """Random order (``per_class`` 0), or runs of ``per_class`` images of one class."""
    if per_class:
        return ClassGroupedSampler(targets, per_class, cap, seed)
    return CappedClassSampler(targets, cap, seed)


class ReplayableSampler(Sampler):
    """Yields ``(sample_seed, index)``: the wrapped sampler's order, each image with its own seed.

    ``resume_at(epoch, batch)`` makes that epoch start after its first ``batch`` batches.
    """

    def __init__(self, sampler, seed: int, batch_size: int):
        self.sampler, self.seed, self.batch_size = sampler, seed, batch_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def resume_at(self, epoch: int, batch: int) -> None:
        self._resume = (epoch, batch)

    def _skip(self) -> int:
        return self._resume[1] * self.batch_size if self._resume and self._resume[0] == self.epoch else 0

    def __iter__(self):
        skip = self._skip()
        self._resume = None
        seeds = np.random.SeedSequence([self.seed, self.epoch]).generate_state(len(self.sampler), np.uint64)
        pairs = zip((int(s) >> 1 for s in seeds), self.sampler)
        return itertools.islice(pairs, skip, None)

    def indices(self) -> list:
        """The epoch's ``(seed, index)`` pairs, for samplers that split them (DDP ranks)."""
        return list(iter(self))

    def __len__(self) -> int:
        return len(self.sampler) - self._skip()


class SeededItems(Dataset):
    """``dataset[index]`` with torch's RNG seeded per item, so augmentation is replayable anywhere."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        sample_seed, index = item
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed)  # CPU only: CUDA's RNG stays the run's
            return self.dataset[index]


class RankSampler(Sampler[int]):
    """One DDP rank's share of another sampler's epoch, cut so the ranks' batches together form the
    single-process batch of ``batch_size * world_size``.

    Global batch ``k`` is ``indices[k*G:(k+1)*G]``; rank ``r`` takes its ``r``-th piece of it. A last,
    short global batch is split as evenly as possible; when it has fewer images than ranks it is
    dropped, so every rank runs the same number of steps (DDP needs that).
    """

    def __init__(self, sampler, batch_size: int, rank: int, world_size: int):
        self.sampler = sampler
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def indices(self) -> list[int]:
        everything = list(self.sampler.indices())
        world, rank, size = self.world_size, self.rank, self.batch_size
        step = size * world
        full = len(everything) // step * step
        mine = [i for start in range(0, full, step)
                for i in everything[start + rank * size:start + (rank + 1) * size]]
        rest = everything[full:]
        if len(rest) >= world:
            base, extra = divmod(len(rest), world)
            start = rank * base + min(rank, extra)
            mine += rest[start:start + base + (1 if rank < extra else 0)]
        return mine

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        total = len(self.sampler)
        step = self.batch_size * self.world_size
        rest = total % step
        own_rest = 0 if rest < self.world_size else rest // self.world_size + (
            1 if self.rank < rest % self.world_size else 0)
        return total // step * self.batch_size + own_rest


def ignore_sigint_in_worker(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group; only the main process decides how to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, batch_size: int, num_workers: int, device: torch.device, sampler=None) -> DataLoader:
    """A DataLoader that leaves the global RNG untouched and keeps its workers quiet on Ctrl-C.

    A training epoch one image over a multiple of ``batch_size`` drops that image: batch norm cannot
    train on a batch of one. (DDP ranks keep theirs: dropping on one rank only would desynchronise them.)
    """
    lone = sampler is not None and not isinstance(sampler, RankSampler) and len(sampler) % batch_size == 1
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                      drop_last=lone,
                      pin_memory=torch.device(device).type == "cuda", persistent_workers=False,
                      generator=torch.Generator().manual_seed(0), worker_init_fn=ignore_sigint_in_worker)
