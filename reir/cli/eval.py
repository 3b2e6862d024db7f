"""``reir eval``: every retrieval and clustering metric of a saved database."""

from __future__ import annotations

from reir.argtypes import csv_ints
from reir.cli.common import ArgumentParser, reports_errors
from reir.data.registry import DATA_NAMES, dataset_info
from reir.devices import parse_device
from reir.retrieval.database import load_database, resolve_database_path
from reir.retrieval.evaluation import evaluate_database


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="reir eval", description="Evaluate the embeddings stored in a database.")
    parser.add_argument("--data_base", required=True, help="a *_data_base.safetensors file or its name under results/")
    parser.add_argument("--output_dir", default=".", help="folder whose results/ holds the database")
    parser.add_argument("--recalls", default=None, type=csv_ints,
                        help="Recall@K values (default: the training run's, else the dataset's usual ones)")
    parser.add_argument("--no_nmi", action="store_true", help="skip NMI (k-means; minutes on SOP on a CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    return parser


def usual_recalls(data_name: str | None) -> list[int]:
    """The recalls the original reports for the dataset; 1, 2, 4, 8 for one REIR does not know."""
    return list(dataset_info(data_name).recalls if data_name in DATA_NAMES else (1, 2, 4, 8))


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    database = load_database(resolve_database_path(args.data_base, args.output_dir))
    recalls = args.recalls or database.config.get("recalls") or usual_recalls(database.info.get("data_name"))
    metrics = evaluate_database(database, recalls=recalls, with_nmi=not args.no_nmi, device=parse_device(args.device))
    sizes = [len(database.features[s]) for s in database.eval_splits]
    protocol = (f"test against itself, {sizes[0]} images" if len(sizes) == 1
                else f"{sizes[0]} queries against {sizes[1]} gallery images")
    print(f"{database.info.get('data_name') or 'database'} ({protocol}):")
    for key, value in metrics.items():
        if value is not None:
            print(f"  {key:<12} {100 * value:6.2f}%")
    return 0
