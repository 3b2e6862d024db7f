"""train.py's command line, recording what this process's data loading returned and when.

    python tests/train_recording_data.py RECORD_FOLDER <train.py flags>

Writes ``RECORD_FOLDER/rank<R>.json``: when loading the dataset started and ended, the split list's
root and training paths, and whether every path existed. Glyphs render their first 12 characters
only, to keep a cold start short.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import reir.training.train as training
from reir.cli.common import reports_errors
from reir.cli.train import get_args_parser
from reir.data import sources
from reir.data.glyphs import prepare_glyphs
from reir.training.config import TrainConfig


def main() -> int:
    record = Path(sys.argv[1])
    sources.EMBEDDED["glyphs"] = functools.partial(prepare_glyphs, limit=12)
    load = training.load_dataset

    def recorded(*args, **kwargs):
        start = time.time()
        split_list = load(*args, **kwargs)
        paths = split_list.absolute("train")
        (record / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({
            "start": start, "end": time.time(), "root": str(split_list.root), "paths": paths,
            "exist": all(Path(p).is_file() for p in paths)}))
        return split_list

    training.load_dataset = recorded

    @reports_errors
    def run() -> int:
        training.train(TrainConfig.from_args(get_args_parser().parse_args(sys.argv[2:])))
        return 0

    return run()


if __name__ == "__main__":
    sys.exit(main())
