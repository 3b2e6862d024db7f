"""Training and embedding throughput of a REIR model, against this machine's dense matmul speed.

Counts the model's FLOPs with torch.utils.flop_counter, times training steps (forward, loss,
backward, Adam) and embedding forwards, and divides the achieved FLOP/s by the FLOP/s of a large
square matmul measured in the same run, in the same precision, on the same device. That ratio says
how much of what the hardware does for the simplest dense kernel the model gets; it is comparable
across machines where absolute numbers are not.

    python benchmarks/train_throughput.py --model_type resnet18 --ensemble_size 12 --image_size 128 \
        --batch_size 16 --batching loop,grouped
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reir.model import MODEL_TYPES, SHARE_TYPES, ModelConfig, create_model  # noqa: E402
from reir.branches import resolve_batching  # noqa: E402
from reir.precision import AMP_DTYPES, precision_for  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_type", default="resnet18", choices=MODEL_TYPES)
    parser.add_argument("--share_type", default="layer1", choices=SHARE_TYPES)
    parser.add_argument("--ensemble_size", default=12, type=int)
    parser.add_argument("--meta_class_size", default=12, type=int)
    parser.add_argument("--image_size", default=128, type=int)
    parser.add_argument("--batch_size", default=16, type=int,
                        help="images per step; 0 doubles from 8 to the largest that fits (GPU)")
    parser.add_argument("--amp", default="off", choices=list(AMP_DTYPES))
    parser.add_argument("--batching", default="loop", help="comma-separated: loop, grouped")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", default=5, type=int, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", default=2, type=int)
    parser.add_argument("--peak_tflops", default=None, type=float,
                        help="the device's datasheet dense peak, to also print model-FLOP utilisation")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    """Best-of-``repeats`` FLOP/s of an n x n matmul, n large enough to saturate the device."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class Bench:
    """One model, optimizer and synthetic batch; times a train step and an embedding forward."""

    def __init__(self, args, batching: str, batch_size: int, device: torch.device):
        torch.manual_seed(0)
        config = ModelConfig(args.model_type, args.share_type, args.ensemble_size, args.meta_class_size)
        self.model = create_model(config, weights="none")
        self.model.shard([device])
        self.model.branch_batching = resolve_batching(batching, device)
        if args.channels_last:
            self.model.use_channels_last()
        self.run = torch.compile(self.model) if args.compile else self.model
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.precision = precision_for(args.amp, device)
        self.images = torch.randn(batch_size, 3, args.image_size, args.image_size, device=device)
        self.targets = torch.randint(0, args.meta_class_size, (batch_size, args.ensemble_size), device=device)
        self.device = device

    def train_step(self) -> None:
        self.model.train()
        with self.precision.autocast():
            logits = self.run(self.images)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), self.targets.flatten())
        self.precision.step(loss, self.optimizer)

    @torch.no_grad()
    def embed(self) -> None:
        self.model.eval()
        with self.precision.autocast():
            F.normalize(self.run(self.images).float(), dim=-1)

    def flops(self, fn) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return counter.get_total_flops()

    def seconds(self, fn, warmup: int, steps: int) -> float:
        for _ in range(warmup):
            fn()
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        synchronize(self.device)
        return (time.perf_counter() - start) / steps


def largest_batch(args, batching: str, device: torch.device) -> int:
    """Double the batch from 8 while a training step fits in device memory."""
    batch, fits = 8, 0
    while batch <= 4096:
        try:
            bench = Bench(args, batching, batch, device)
            bench.train_step()
            synchronize(device)
            fits = batch
            batch *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            bench = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not fits:
        raise SystemExit("error: not even batch 8 fits; lower --image_size or --ensemble_size")
    return fits


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = AMP_DTYPES[args.amp] or torch.float32
    modes = [m.strip() for m in args.batching.split(",") if m.strip()]
    print(f"{args.model_type} x {args.ensemble_size} ({args.share_type} shared), {args.image_size} px, "
          f"amp {args.amp}, channels_last {args.channels_last}, compile {args.compile}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({torch.get_num_threads()} threads)"))
    matmul_before = matmul_flops_per_second(device, dtype)
    results = []
    for mode in modes:
        batch = args.batch_size or largest_batch(args, mode, device)
        # Model FLOPs from the plain loop: the counter over-counts grouped convolution backward as dense.
        counting = Bench(args, "loop", batch, device)
        train_flops, embed_flops = counting.flops(counting.train_step), counting.flops(counting.embed)
        del counting
        bench = Bench(args, mode, batch, device)
        train_s = bench.seconds(bench.train_step, args.warmup, args.steps)
        embed_s = bench.seconds(bench.embed, args.warmup, args.steps)
        results.append((mode, batch, train_flops, train_s, embed_flops, embed_s))
        del bench
    matmul = max(matmul_before, matmul_flops_per_second(device, dtype))
    print(f"dense {dtype} matmul: {matmul / 1e12:.3f} TFLOP/s (best of before and after)")
    for mode, batch, train_flops, train_s, embed_flops, embed_s in results:
        for what, flops, seconds in (("train step", train_flops, train_s), ("embedding", embed_flops, embed_s)):
            achieved = flops / seconds
            line = (f"{mode:>7} batch {batch:4d} {what:>10}: {batch / seconds:9.1f} images/s, "
                    f"{flops / batch / 1e9:7.2f} GFLOP/image, {achieved / 1e12:.3f} TFLOP/s, "
                    f"ratio to matmul {achieved / matmul:.2f}")
            if args.peak_tflops:
                line += f", MFU {achieved / (args.peak_tflops * 1e12):.3f}"
            print(line)
    if len(results) > 1:
        base = results[0][3]
        print("train step time relative to " + results[0][0] + ": "
              + ", ".join(f"{mode} {seconds / base:.2f}x" for mode, _, _, seconds, _, _ in results[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
