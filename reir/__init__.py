"""REIR: Randomized Ensembles for Image Retrieval.

``reir.load_model``, ``reir.embed``, ``reir.Index`` and ``reir.evaluate`` are the Python API
(:mod:`reir.api`); they are imported on first use so that ``import reir`` stays light.
"""

__version__ = "0.1.0"

_API = ("load_model", "embed", "Index", "evaluate", "Model")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'reir' has no attribute {name!r}")
