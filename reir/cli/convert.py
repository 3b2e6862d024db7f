"""``reir convert``: the original's ``.pth`` model or database as a REIR file, read without running its code."""

from __future__ import annotations

from pathlib import Path

from reir.argtypes import positive_int
from reir.cli.common import ArgumentParser, reports_errors
from reir.data.registry import DATA_NAMES
from reir.errors import ReirError
from reir.fileio import claim_output
from reir.model.files import MODEL_FORMAT
from reir.model.network import MODEL_TYPES, SHARE_TYPES
from reir.model.original import NORMALISATIONS, convert_model, converted_name, is_original_state_dict, load_original
from reir.retrieval.database import FORMAT as DATABASE_FORMAT
from reir.retrieval.original import convert_database, is_original_database

NAMED_SETTINGS = ("data_name", "crop_type", "label_type", "model_type", "share_type", "ensemble_size",
                  "meta_class_size")


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="reir convert", description=(
        "Convert the original's epochs/<name>_model.pth or results/<name>_data_base.pth (told apart by "
        "content) into a REIR model or database. The configuration comes from the file name "
        "<data>_<crop>_<label>_<random|unrandom>_<share>_<model>_<E>_<C>; flags override it."))
    parser.add_argument("original", help="the original's .pth file")
    parser.add_argument("--output", default=None, help="where to write (default: beside it, .safetensors)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output that is not a REIR model or database")
    parser.add_argument("--data_path", default=None,
                        help="folder the database's relative image paths start from (default: the folder "
                             "holding its results/, where the original ran)")
    parser.add_argument("--normalisation", default="dataset", choices=NORMALISATIONS,
                        help="model input normalisation: the original's per-dataset mean/std, or ImageNet's")
    named = parser.add_argument_group("settings the file name carries (flags override it)")
    named.add_argument("--data_name", default=None, choices=DATA_NAMES)
    named.add_argument("--crop_type", default=None, choices=["uncropped", "cropped"])
    named.add_argument("--label_type", default=None, choices=["fixed", "random"])
    named.add_argument("--model_type", default=None, choices=MODEL_TYPES)
    named.add_argument("--share_type", default=None, choices=SHARE_TYPES)
    named.add_argument("--ensemble_size", default=None, type=positive_int)
    named.add_argument("--meta_class_size", default=None, type=positive_int)
    return parser


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    source = Path(args.original)
    output = Path(args.output) if args.output else converted_name(source)
    claim_output(output, (MODEL_FORMAT, DATABASE_FORMAT), inputs=[source], overwrite=args.overwrite,
                 setting="--overwrite")
    overrides = {key: getattr(args, key) for key in NAMED_SETTINGS}
    content = load_original(source)
    if is_original_state_dict(content):
        convert_model(content, source, output, overrides, args.normalisation)
        print(f"Wrote the REIR model {output}; reir search, embed and serve read it")
    elif is_original_database(content):
        database = convert_database(content, source, args.data_path, overrides, args.normalisation)
        database.save(output)
        sizes = ", ".join(f"{split} {len(f)}" for split, f in database.features.items())
        print(f"Wrote the REIR database {output} ({sizes} images); reir eval, search and ablation read it")
    else:
        kind = type(content).__name__ if not isinstance(content, dict) else f"dict with keys {list(content)[:3]}"
        raise ReirError(f"{source} is neither the original's model (classifiers.* keys) nor its database "
                        f"(*_features keys) but a {kind}; pass an epochs/*_model.pth or results/*_data_base.pth")
    return 0
