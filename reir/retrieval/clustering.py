"""NMI: how well a k-means clustering of the embeddings recovers the classes."""

from __future__ import annotations

import numpy as np
import torch

from reir.retrieval.similarity import faiss_available, flatten

KMEANS_ITERATIONS = 20
KMEANS_SEED = 1234


def cluster(features: torch.Tensor, clusters: int, seed: int = KMEANS_SEED) -> np.ndarray:
    """k-means cluster of every embedding: FAISS when installed (as the field's tools do), else scikit-learn."""
    data = np.ascontiguousarray(flatten(features).detach().float().cpu().numpy())
    if faiss_available():
        import faiss

        kmeans = faiss.Kmeans(data.shape[1], clusters, niter=KMEANS_ITERATIONS, seed=seed)
        kmeans.cp.min_points_per_centroid = 1  # small classes are normal here; no warning
        kmeans.train(data)
        return kmeans.index.search(data, 1)[1][:, 0]
    from sklearn.cluster import KMeans

    return KMeans(clusters, init="random", n_init=1, max_iter=KMEANS_ITERATIONS, random_state=seed).fit_predict(data)


def nmi(features: torch.Tensor, labels: torch.Tensor, seed: int = KMEANS_SEED) -> float:
    """NMI between the classes and a k-means clustering into as many clusters as classes."""
    classes = labels.cpu().numpy()
    assignment = cluster(features, len(np.unique(classes)), seed)
    return normalized_mutual_information(classes, assignment)


def normalized_mutual_information(first, second) -> float:
    """Mutual information of two labelings over the arithmetic mean of their entropies (natural log).

    scikit-learn's ``normalized_mutual_info_score`` defines it the same way (1.0 when both labelings
    are a single class); computed here because importing scikit-learn's metrics costs every
    ``reir eval`` and training run about a second.
    """
    first, second = (np.unique(np.asarray(x), return_inverse=True)[1].ravel() for x in (first, second))
    rows, columns = int(first.max(initial=-1)) + 1, int(second.max(initial=-1)) + 1
    if rows <= 1 and columns <= 1:
        return 1.0
    joint = np.bincount(first * columns + second, minlength=rows * columns).reshape(rows, columns) / len(first)
    first_marginal, second_marginal = joint.sum(1), joint.sum(0)
    present = joint > 0
    mutual = float((joint[present] * np.log(joint[present] / np.outer(first_marginal, second_marginal)[present])).sum())
    entropies = [-float((m[m > 0] * np.log(m[m > 0])).sum()) for m in (first_marginal, second_marginal)]
    return max(mutual, 0.0) / max(sum(entropies) / 2, np.finfo(np.float64).eps)

