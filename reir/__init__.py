"""REIR: Randomized Ensembles for Image Retrieval.

``reir.load_model``, ``reir.embed``, ``reir.Index`` and ``reir.evaluate`` are the Python API; they
are imported on first use so that ``import reir`` stays light.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {"load_model": "reir.api", "embed": "reir.api", "evaluate": "reir.retrieval.evaluation", "Model": "reir.api",
        "Index": "reir.retrieval.index"}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'reir' has no attribute {name!r}")
