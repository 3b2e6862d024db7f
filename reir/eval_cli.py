"""``reir eval``: every retrieval and clustering metric of a saved database."""

from __future__ import annotations

import torch

from .api import evaluate
from .cliutil import ArgumentParser, csv_ints, reports_errors
from .database import load_database, resolve_database_path
from .errors import ReirError
from .knn import BACKENDS

# The recalls the original reports per dataset.
DEFAULT_RECALLS = {"sop": [1, 10, 100, 1000], "isc": [1, 10, 20, 30, 40, 50]}


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="reir eval", description="Evaluate the embeddings stored in a database.")
    parser.add_argument("--data_base", required=True, help="a *_data_base.safetensors file or its name under results/")
    parser.add_argument("--output_dir", default=".", help="folder whose results/ holds the database")
    parser.add_argument("--recalls", default=None, type=csv_ints,
                        help="Recall@K values (default: the training run's, else the dataset's usual ones)")
    parser.add_argument("--no_nmi", action="store_true", help="skip NMI (k-means; minutes on SOP on a CPU)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="exact k-NN engine")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    return parser


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    database = load_database(resolve_database_path(args.data_base, args.output_dir))
    recalls = args.recalls or database.config.get("recalls") or DEFAULT_RECALLS.get(
        database.info.get("data_name"), [1, 2, 4, 8])
    try:
        device = torch.device(args.device) if args.device else torch.device("cpu")
    except RuntimeError:
        raise ReirError(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N", 2) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ReirError("--device cuda requested but no CUDA GPU is available; use --device cpu", 2)
    metrics = evaluate(database, recalls=recalls, with_nmi=not args.no_nmi, backend=args.backend, device=device)
    sizes = [len(database.features[s]) for s in database.eval_splits]
    protocol = (f"test against itself, {sizes[0]} images" if len(sizes) == 1
                else f"{sizes[0]} queries against {sizes[1]} gallery images")
    print(f"{database.info.get('data_name', 'database')} ({protocol}):")
    for key, value in metrics.items():
        if value is not None:
            print(f"  {key:<12} {100 * value:6.2f}%")
    return 0
