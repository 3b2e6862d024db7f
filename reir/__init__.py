"""REIR: Randomized Ensembles for Image Retrieval."""

__version__ = "0.1.0"
