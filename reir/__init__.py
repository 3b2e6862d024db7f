"""REIR: Randomized Ensembles for Image Retrieval.

The Python API, imported on first use so that ``import reir`` stays light::

    import reir
    result = reir.train(reir.TrainConfig(data_name="digits", output_dir="runs"))  # every flag is a field
    model = reir.load_model("epochs/<name>_model.safetensors")
    features = reir.embed(model, "my_photos/")          # [N, ensemble, meta]
    index = reir.Index.build(features, paths=...)        # exact inner product ("Flat")
    scores, ids = index.search(reir.embed(model, ["query.jpg"]), k=10)  # a Results; unpacks as the pair
    reir.evaluate(features, labels)                      # Recall@K, MAP@R, ...
    reir.evaluate_database("results/<name>_data_base.safetensors")     # what ``reir eval`` prints
    db = reir.load_database("results/<name>_data_base.safetensors")    # features, paths, labels

Every ``reir`` command that trains, embeds, indexes or searches calls these, so the CLI and the
library share one code path; ``embed`` is the one path from images to embeddings that training's
evaluation takes too.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {"train": "reir.training.train", "TrainConfig": "reir.training.config",
        "load_model": "reir.model.files", "Model": "reir.model.files", "embed": "reir.model.embedding",
        "evaluate": "reir.retrieval.evaluation", "evaluate_database": "reir.retrieval.evaluation",
        "load_database": "reir.retrieval.database", "Database": "reir.retrieval.database",
        "Results": "reir.retrieval.results", "Index": "reir.retrieval.index",
        "build_index": "reir.retrieval.backends", "index_from_database": "reir.retrieval.backends",
        "open_index": "reir.retrieval.backends", "SearchIndex": "reir.retrieval.index_common"}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'reir' has no attribute {name!r}")
