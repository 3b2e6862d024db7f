"""What the ensemble buys on digits: R@1 and MAP@R of raw pixels, the untrained network,
single branches (best and mean) and the whole ensemble, for label_type fixed and random.

Everything is measured in one run on the CPU (a few minutes). The test classes (5-9) are
unseen in training, as in the benchmarks. Like the original, train.py keeps the epoch
with the best test R@1, so the trained rows are optimistic in the same way for every row.

    python benchmarks/ensemble_value.py
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from reir import train  # noqa: E402
from reir.data.digits import prepare_digits  # noqa: E402
from reir.data.images import ImageList, build_transform  # noqa: E402
from reir.data.sampling import make_loader  # noqa: E402
from reir.database import load_database  # noqa: E402
from reir.metrics import retrieval_metrics  # noqa: E402
from reir.model import ModelConfig, create_model  # noqa: E402


def scores(features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    values = retrieval_metrics(features, labels, (1,))
    return values["recall@1"], values["map@r"]


def branch_rows(features: torch.Tensor, labels: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Single branches (best by R@1, and the mean) and the whole ensemble of one embedding."""
    singles = [scores(features[:, b:b + 1], labels) for b in range(features.shape[1])]
    best = max(singles)
    mean = tuple(float(np.mean([s[i] for s in singles])) for i in range(2))
    return {"best single branch": best, "mean single branch": mean, "whole ensemble": scores(features, labels)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ensemble_size", type=int, default=12)
    parser.add_argument("--meta_class_size", type=int, default=2)
    parser.add_argument("--num_epochs", type=int, default=6)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "data"
        split_list = prepare_digits(data)
        test = ImageList(split_list, "test", build_transform(args.image_size, split_list.mean, split_list.std, False))
        labels = torch.tensor([int(label) for label in split_list.splits["test"].labels])
        pixels = torch.stack([test[i][0] for i in range(len(test))]).reshape(len(test), -1)
        rows["raw pixels"] = {"fixed": scores(torch.nn.functional.normalize(pixels, dim=1), labels)}
        for label_type in ("fixed", "random"):
            config = ModelConfig("resnet18", "layer1", args.ensemble_size, args.meta_class_size)
            torch.manual_seed(args.seed)
            untrained = create_model(config, weights="none")
            loader = make_loader(test, 64, 0, torch.device("cpu"))
            rows.setdefault("untrained network", {})[label_type] = scores(
                train.embed(untrained, loader, torch.device("cpu"), "embed"), labels)
            output = Path(scratch) / label_type
            argv = ["--data_name", "digits", "--data_path", str(data), "--output_dir", str(output),
                    "--weights", "none", "--label_type", label_type, "--ensemble_size", str(args.ensemble_size),
                    "--meta_class_size", str(args.meta_class_size), "--image_size", str(args.image_size),
                    "--batch_size", "32", "--num_epochs", str(args.num_epochs), "--num_workers", "0",
                    "--seed", str(args.seed), "--device", "cpu", "--nmi_every", "0"]
            log = io.StringIO()
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                code = train.main(argv)
            if code:
                sys.exit(f"error: training ({label_type}) failed:\n{log.getvalue()[-2000:]}")
            database = load_database(next((output / "results").glob("*_data_base.safetensors")))
            (test_labels,) = database.label_ids("test")
            for name, value in branch_rows(database.features["test"], test_labels).items():
                rows.setdefault(name, {})[label_type] = value
    rows["raw pixels"]["random"] = rows["raw pixels"]["fixed"]  # no labels involved
    print(f"digits test (classes 5-9, {len(labels)} images), resnet18 from scratch, ensemble "
          f"{args.ensemble_size} x meta {args.meta_class_size}, {args.num_epochs} epochs, {args.image_size} px, "
          f"seed {args.seed}")
    print("| embedding | fixed R@1 | fixed MAP@R | random R@1 | random MAP@R |")
    print("|---|---|---|---|---|")
    for name, values in rows.items():
        cells = " | ".join(f"{100 * values[t][0]:.1f}% | {100 * values[t][1]:.1f}%" for t in ("fixed", "random"))
        print(f"| {name} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
