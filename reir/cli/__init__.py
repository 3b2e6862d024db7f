"""The ``reir`` command: one entry point for every tool.

Each subcommand lives in its own module with a ``main(argv) -> int``; this file only
dispatches, so adding a tool is one line in ``COMMANDS``.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), or module:function, one-line help)
COMMANDS = {
    "train": ("reir.cli.train", "train a REIR model (same flags as train.py)"),
    "prepare": ("reir.cli.prepare", "prepare datasets into split lists (same flags as data_utils.py)"),
    "eval": ("reir.cli.eval", "print Recall@K, precision@1, R-precision, MAP@R and NMI of a database"),
    "params": ("reir.cli.train:params_main", "print the trainable parameter count of a configuration"),
    "search": ("reir.cli.search:search_main", "retrieve the nearest images of one query (as inference.py)"),
    "ablation": ("reir.cli.ablation:ablation_main", "compare two databases query by query (as ablation.py)"),
    "plot": ("reir.cli.plot", "plot loss, accuracy and Recall@K of a statistics CSV"),
    "embed": ("reir.cli.embed", "embed a folder, CSV or prepared dataset into a database (resumable, torchrun)"),
    "index": ("reir.cli.index", "build a FAISS index file and id map over a database (exact or approximate)"),
    "serve": ("reir.cli.serve", "serve search over an index: JSON API and a web page (127.0.0.1 by default)"),
    "report": ("reir.cli.report", "write one self-contained HTML report: metrics, curves, best and worst queries"),
    "export": ("reir.cli.export", "export the embedding network to ONNX or TorchScript with a parity check"),
    "convert": ("reir.cli.convert", "convert the original's .pth model or database into REIR's safe files"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in ("-h", "--help") and argv[0] not in COMMANDS:
        print(f"reir: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)} "
              "(see reir --help)", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
        print("usage: reir <command> [flags]   (reir <command> --help for its flags)\n\ncommands:\n"
              + "\n".join(lines))
        return 0
    module_name, _, function = COMMANDS[argv[0]][0].partition(":")
    return getattr(importlib.import_module(module_name), function or "main")(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
