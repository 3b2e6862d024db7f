"""Training throughput of a REIR model, against this machine's dense matmul speed, variant by variant.

Counts the model's FLOPs per image with torch.utils.flop_counter, times training steps (forward,
loss, backward, Adam) of every variant, and divides the achieved FLOP/s by the FLOP/s of a large
square matmul measured in the same run, in the same precision, on the same device. That ratio says
how much of what the hardware does for the simplest dense kernel the model gets; it is comparable
across machines where absolute numbers are not. Variants and matmuls are timed in turn, round after
round, and medians are printed, so that other load on the machine affects them alike.

A variant is ``+``-joined words: ``loop``/``grouped`` (branch batching), ``bf16``/``fp16``
(autocast; fp32 without), ``cl`` (channels-last), ``adam-loop``/``adam-foreach``/``adam-fused``
(Adam's implementation; default: PyTorch's choice for the device), ``bN`` (batch N, else
--batch_size), ``graph`` (the whole step captured once in a CUDA graph and replayed; CUDA only),
``compile`` (torch.compile).

    python benchmarks/train_throughput.py --ensemble_size 12 --image_size 128 --batch_size 16 \
        --variants loop,grouped,grouped+cl+adam-fused [--profile] [--loader digits]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from reir.model.network import MODEL_TYPES, SHARE_TYPES, ModelConfig, create_model
from reir.training.precision import AMP_DTYPES, precision_for

ADAM_IMPLEMENTATIONS = {"adam-loop": {"foreach": False}, "adam-foreach": {"foreach": True},
                        "adam-fused": {"fused": True}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_type", default="resnet18", choices=MODEL_TYPES)
    parser.add_argument("--share_type", default="layer1", choices=SHARE_TYPES)
    parser.add_argument("--ensemble_size", default=12, type=int)
    parser.add_argument("--meta_class_size", default=12, type=int)
    parser.add_argument("--image_size", default=128, type=int)
    parser.add_argument("--batch_size", default=16, type=int, help="images per step of variants without bN")
    parser.add_argument("--variants", default="loop,grouped", help="comma-separated variants (see above)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", default=3, type=int, help="timed steps per variant and round")
    parser.add_argument("--warmup", default=2, type=int, help="untimed steps per variant before the rounds")
    parser.add_argument("--rounds", default=3, type=int, help="rounds of (matmuls, every variant); medians printed")
    parser.add_argument("--matmul_size", default=None, type=int, help="default: 8192 on CUDA, 2048 on the CPU")
    parser.add_argument("--peak_tflops", default=None, type=float,
                        help="the device's datasheet dense bf16/fp16 peak, to also print MFU against it")
    parser.add_argument("--sequential", action="store_true",
                        help="time one variant after another instead of interleaved (peak memory of one)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one step of each variant: time per phase and the costliest operators")
    parser.add_argument("--loader", default=None, metavar="DATA_NAME",
                        help="also time train.py's training loader on this dataset (images/s beside training)")
    parser.add_argument("--data_path", default="data")
    parser.add_argument("--num_workers", default=0, type=int)
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Variant:
    name: str
    batching: str = "loop"
    amp: str = "off"
    channels_last: bool = False
    adam: dict | None = None
    batch: int | None = None
    graph: bool = False
    compile: bool = False

    @classmethod
    def parse(cls, text: str) -> Variant:
        fields: dict = {"name": text}
        for word in text.split("+"):
            if word in ("loop", "grouped"):
                fields["batching"] = word
            elif word in ("bf16", "fp16"):
                fields["amp"] = word
            elif word == "cl":
                fields["channels_last"] = True
            elif word in ADAM_IMPLEMENTATIONS:
                fields["adam"] = ADAM_IMPLEMENTATIONS[word]
            elif word[:1] == "b" and word[1:].isdigit():
                fields["batch"] = int(word[1:])
            elif word in ("graph", "compile"):
                fields[word] = True
            else:
                raise SystemExit(f"error: unknown variant word {word!r} in {text!r}; see --help")
        return cls(**fields)

    @property
    def dtype(self) -> torch.dtype:
        return AMP_DTYPES[self.amp] or torch.float32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Matmul:
    """An n x n matmul in one precision: the device's dense FLOP/s, timed beside the model."""

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int):
        self.a, self.b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        self.device, self.n = device, n
        self.a @ self.b

    def flops_per_second(self, repeats: int = 5) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(repeats):
            self.a @ self.b
        synchronize(self.device)
        return 2 * self.n**3 * repeats / (time.perf_counter() - start)


def train_flops_per_image(args, device: torch.device) -> int:
    """Forward and backward FLOPs of one image, counted on the plain loop (the counter over-counts grouped backward)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = create_model(ModelConfig(args.model_type, args.share_type, args.ensemble_size, args.meta_class_size),
                             weights="none")
    images = torch.randn(2, 3, args.image_size, args.image_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(images).float().square().mean().backward()
    return counter.get_total_flops() // 2


class Bench:
    """One variant: model, optimizer and a synthetic batch, and its training step."""

    def __init__(self, args, variant: Variant, device: torch.device):
        torch.manual_seed(0)
        config = ModelConfig(args.model_type, args.share_type, args.ensemble_size, args.meta_class_size)
        with torch.device(device):
            self.model = create_model(config, weights="none")
        self.model.branch_batching = variant.batching
        if variant.channels_last:
            self.model.use_channels_last()
        self.run = torch.compile(self.model) if variant.compile else self.model
        options = dict(variant.adam or {})
        if variant.graph:
            options["capturable"] = True
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4, **options)
        self.precision = precision_for(variant.amp, device)
        self.batch = variant.batch or args.batch_size
        self.images = torch.randn(self.batch, 3, args.image_size, args.image_size, device=device)
        self.targets = torch.randint(0, args.meta_class_size, (self.batch, args.ensemble_size), device=device)
        self.variant, self.device = variant, device
        self.graph = None

    def autocast(self):
        """A captured graph replays its casts, so autocast must not keep a cache of them across steps."""
        if self.variant.graph and self.precision.dtype is not None:
            return torch.autocast(self.device.type, dtype=self.precision.dtype, cache_enabled=False)
        return self.precision.autocast()

    def forward_loss(self) -> torch.Tensor:
        with self.autocast():
            logits = self.run(self.images)
            return F.cross_entropy(logits.flatten(0, 1).float(), self.targets.flatten())

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        self.model.train()
        self.precision.step(self.forward_loss(), self.optimizer)

    def warm_up(self, steps: int) -> None:
        """Untimed steps; a ``graph`` variant warms up on a side stream, then captures one whole step."""
        if not self.variant.graph:
            for _ in range(steps):
                self.step()
            return
        if self.device.type != "cuda" or self.variant.amp == "fp16":
            raise ValueError("a graph needs CUDA and no fp16 loss scaling")
        self.model.train()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(steps, 3)):
                self.precision.step(self.forward_loss(), self.optimizer)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.forward_loss().backward()
            self.optimizer.step()

    def seconds_per_step(self, steps: int) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        return (time.perf_counter() - start) / steps


def profile_step(bench: Bench, loader_batches=None) -> None:
    """One profiled step: wall time per phase and the operators that took most of each phase."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    bench.model.train()
    with profile(activities=activities) as prof:
        if loader_batches is not None:
            with record_function("phase:data loading"):
                next(loader_batches)
        with record_function("phase:forward"):
            loss = bench.forward_loss()
        with record_function("phase:backward"):
            bench.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("phase:optimizer"):
            bench.optimizer.step()
        synchronize(bench.device)
    events = prof.events()
    phases = [e for e in events if e.name.startswith("phase:")]
    total = sum(p.time_range.elapsed_us() for p in phases)
    print(f"  profile of {bench.variant.name} (batch {bench.batch}): one step {total / 1e3:.0f} ms")
    for phase in phases:
        span = phase.time_range
        by_op: dict[str, float] = {}
        for event in events:
            inside = span.start <= event.time_range.start and event.time_range.end <= span.end
            if inside and not event.name.startswith("phase:"):
                by_op[event.name] = by_op.get(event.name, 0.0) + event.self_cpu_time_total
        top = sorted(by_op.items(), key=lambda item: -item[1])[:6]
        print(f"    {phase.name[6:]:<13} {span.elapsed_us() / 1e3:8.0f} ms ({100 * span.elapsed_us() / total:4.1f} %): "
              + ", ".join(f"{name} {100 * us / max(span.elapsed_us(), 1):.0f} %" for name, us in top))


def training_loader(args, batch: int):
    """train.py's training DataLoader (dataset, transform, workers) for ``args.loader``."""
    from torch.utils.data import DataLoader

    from reir.data.images import ImageList, build_transform
    from reir.data.sources import load_dataset

    split_list = load_dataset(args.loader, args.data_path, "uncropped", args.image_size)
    dataset = ImageList(split_list, "train", build_transform(args.image_size, split_list.mean, split_list.std, True))
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=args.num_workers, drop_last=True)


def loader_images_per_second(loader, batches: int) -> float:
    start, seen = time.perf_counter(), 0
    for index, (images, _) in enumerate(loader):
        seen += len(images)
        if index + 1 == batches:
            break
    return seen / (time.perf_counter() - start)


def endless(loader):
    while True:
        yield from loader


def build(args, variant: Variant, device: torch.device) -> Bench | None:
    """The variant's bench, warmed up; None (with a line saying why) if it cannot run here."""
    try:
        bench = Bench(args, variant, device)
        bench.warm_up(args.warmup)
        return bench
    except Exception as exc:  # noqa: BLE001 - report the variant that cannot run, time the others
        print(f"  {variant.name}: cannot run ({type(exc).__name__}: {str(exc)[:300]})")
        bench = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def measure(args, variants: list[Variant], matmuls: dict, device: torch.device, loader=None) -> dict:
    """Per variant: (batch, [(step seconds, matmul FLOP/s of its dtype) per round]).

    Interleaved: all variants stay in memory and every round times the matmuls, then each variant,
    so that changing load on a shared machine hits them alike. ``--sequential`` builds, times and
    frees one variant at a time (a matmul before each of its rounds): peak memory of one variant.
    """
    timings: dict[str, tuple[int, list]] = {}
    loader_rates: list[float] = []
    for group in ([v] for v in variants) if args.sequential else [variants]:
        time_group(args, group, matmuls, device, loader, timings, loader_rates)
        gc.collect()  # the group's models, optimizers and graphs are gone: give their memory back
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"variants": timings, "loader": loader_rates}


def time_group(args, group: list[Variant], matmuls: dict, device: torch.device, loader,
               timings: dict, loader_rates: list) -> None:
    """Build, (profile) and time one group of variants; everything it built is freed on return."""
    benches = [b for b in (build(args, v, device) for v in group) if b is not None]
    if args.profile:
        for bench in benches:
            profile_step(bench, endless(loader) if loader else None)
    for _ in range(args.rounds):
        rates = {dtype: matmul.flops_per_second() for dtype, matmul in matmuls.items()}
        for bench in benches:
            seconds = bench.seconds_per_step(args.steps)
            timings.setdefault(bench.variant.name, (bench.batch, []))[1].append((seconds, rates[bench.variant.dtype]))
        if loader:
            loader_rates.append(loader_images_per_second(loader, max(args.steps, 4)))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    variants = [Variant.parse(v.strip()) for v in args.variants.split(",") if v.strip()]
    print(f"{args.model_type} x {args.ensemble_size} ({args.share_type} shared), {args.image_size} px, "
          f"device {device} " + (f"({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                 f"({torch.get_num_threads()} threads, {torch.get_num_interop_threads()} inter-op)"))
    flops_per_image = train_flops_per_image(args, device)
    print(f"training FLOPs per image (forward + backward): {flops_per_image / 1e9:.2f} GFLOP")
    n = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    matmuls = {dtype: Matmul(device, dtype, n) for dtype in {v.dtype for v in variants}}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every variant alike: cuDNN picks its fastest kernels
    loader = training_loader(args, variants[0].batch or args.batch_size) if args.loader else None
    results = measure(args, variants, matmuls, device, loader)
    if not results["variants"]:
        raise SystemExit("error: no variant could run")
    print(f"medians of {args.rounds} rounds ({args.steps} steps each)"
          + (", one variant at a time" if args.sequential else ", variants interleaved") + ":")
    for dtype, _matmul in matmuls.items():
        rates = [rate for v in variants if v.dtype == dtype for _, rate in results["variants"].get(v.name, (0, []))[1]]
        if rates:
            print(f"  dense {str(dtype)[6:]} {n}x{n} matmul: {statistics.median(rates) / 1e12:.3f} TFLOP/s")
    base = None
    for variant in variants:
        if variant.name not in results["variants"]:
            continue
        batch, rounds = results["variants"][variant.name]
        images_per_second = batch / statistics.median(seconds for seconds, _ in rounds)
        ratio = statistics.median(flops_per_image * batch / seconds / rate for seconds, rate in rounds)
        line = (f"  {variant.name:<28} batch {batch:4d}: {images_per_second:9.1f} images/s, "
                f"{flops_per_image * images_per_second / 1e12:7.3f} TFLOP/s, "
                f"ratio to {str(variant.dtype)[6:]} matmul {ratio:.2f}")
        if args.peak_tflops:
            line += f", MFU vs datasheet {flops_per_image * images_per_second / (args.peak_tflops * 1e12):.3f}"
        base = base or images_per_second
        rounds_text = ", ".join(f"{batch / seconds:.1f}" for seconds, _ in rounds)
        print(line + f", speed-up {images_per_second / base:.2f}x   (images/s per round: {rounds_text})")
    if results["loader"]:
        print(f"  training loader ({args.loader}, {args.num_workers} workers): "
              f"{statistics.median(results['loader']):9.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
