"""``reir export``: parses its flags and writes the embedding network as ONNX or TorchScript (reir.model.export)."""

from __future__ import annotations

import sys
from pathlib import Path

from reir.cli.common import ArgumentParser, reports_errors
from reir.errors import ReirError
from reir.fileio import claim_output
from reir.model.export import FORMATS, SUFFIXES, export
from reir.model.files import load_model


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="reir export", description="Export the embedding network with a parity check.")
    parser.add_argument("--model", required=True, help="an epochs/*_model.safetensors file")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="export_format")
    parser.add_argument("--output", default=None, help="file to write (default: beside the model, .onnx or .pt)")
    parser.add_argument("--tolerance", default=1e-4, type=float,
                        help="largest absolute difference from PyTorch accepted (default 1e-4)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output that is not an export of reir export")
    return parser


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    default = Path(args.model).with_suffix(SUFFIXES[args.export_format])
    output = Path(args.output) if args.output else default
    record = Path(f"{output}.json")
    for part in (output, record):
        claim_output(part, FORMATS, inputs=[args.model], record=record, overwrite=args.overwrite,
                     setting="--overwrite")
    model = load_model(args.model)
    difference, files = export(model, args.export_format, output)
    engine = "onnxruntime" if args.export_format == "onnx" else "TorchScript"
    companion = "".join(f", its weights {weights} ({weights.stat().st_size / 2**20:.1f} MiB; keep it beside the "
                        ".onnx)" for weights in files[1:])
    print(f"Wrote {output} ({output.stat().st_size / 2**20:.1f} MiB){companion} and {output}.json; parity with "
          f"PyTorch on 5 random images ({engine}, from a copy in another folder): max abs diff {difference:.2e}")
    if args.export_format == "torchscript":
        print("note: PyTorch deprecates TorchScript; prefer --format onnx for new deployments")
    if not difference <= args.tolerance:
        raise ReirError(f"the exported network differs from PyTorch by {difference:.2e} > --tolerance "
                        f"{args.tolerance:g}; do not deploy {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
