"""Retrieval: similarity, exact metrics, the feature database, the FAISS index and the baselines."""
