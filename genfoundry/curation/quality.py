"""Stage 3 decisions: feature-density selection (DeVries et al. 2020, "Instance Selection for GANs") and
semantic dedup on embeddings (Abbas et al. 2023, SemDeDup).

Quality: fit a Gaussian to TF-Inception features of a reference, score each image by its Mahalanobis
distance to it, keep the closest. The kept set is then compared with a random subset of the same size
by their Fréchet distance to the reference: selection that works brings the kept set closer.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from genfoundry.features import frechet_distance


def ledoit_wolf(centred: np.ndarray) -> float:
    """The shrinkage weight toward (tr S / D) I that Ledoit and Wolf (2004) estimate for centred [N, D]."""
    n, d = centred.shape
    s = centred.T @ centred / n
    mu = np.trace(s) / d
    delta = ((s - mu * np.eye(d)) ** 2).sum() / d
    # sum_k ||x_k x_k^T - S||_F^2 = sum_k ||x_k||^4 - n ||S||_F^2, without a D x D matrix per image
    beta = ((np.einsum("ij,ij->i", centred, centred) ** 2).sum() - n * (s ** 2).sum()) / (n * n * d)
    return float(min(max(beta, 0.0), delta) / delta) if delta > 0 else 1.0


def fit(features: np.ndarray, shrinkage: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(mean, covariance, Cholesky factor of the shrunk covariance, the shrinkage used) of features [N, D].

    The covariance of fewer images than dimensions is singular; shrinking it toward (tr S / D) I keeps
    the Mahalanobis distance defined. `shrinkage` < 0 takes Ledoit and Wolf's estimate of the weight."""
    x = np.asarray(features, np.float64)
    mu = x.mean(0)
    sigma = np.cov(x, rowvar=False) if len(x) > 1 else np.zeros((x.shape[1],) * 2)
    if shrinkage < 0:
        shrinkage = ledoit_wolf(x - mu)
    target = np.trace(sigma) / len(mu) or 1.0
    shrunk = (1 - shrinkage) * sigma + shrinkage * target * np.eye(len(mu))
    try:
        chol = scipy.linalg.cholesky(shrunk, lower=True)
    except np.linalg.LinAlgError:  # shrinkage 0 and a singular covariance: the smallest ridge that works
        chol = scipy.linalg.cholesky(shrunk + 1e-6 * target * np.eye(len(mu)), lower=True)
    return mu, sigma, chol, shrinkage


def mahalanobis(features: np.ndarray, mu: np.ndarray, chol: np.ndarray) -> np.ndarray:
    """sqrt((x - mu)^T S^-1 (x - mu)) per row, with S = L L^T."""
    z = scipy.linalg.solve_triangular(chol, (np.asarray(features, np.float64) - mu).T, lower=True)
    return np.sqrt((z * z).sum(0))


def select(distances: np.ndarray, keep_quantile: float, max_distance: float) -> tuple[np.ndarray, float]:
    """(keep mask, the distance cut): within `max_distance` when it is set, else the `keep_quantile`
    share closest (ties at the cut kept)."""
    if max_distance > 0:
        cut = float(max_distance)
    else:
        cut = float(np.quantile(distances, keep_quantile, method="inverted_cdf"))
    return distances <= cut, cut


def frechet_to(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    x = np.asarray(features, np.float64)
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu, sigma, features1=x)


def compare(candidates: np.ndarray, keep: np.ndarray, mu: np.ndarray, sigma: np.ndarray, seed: int) -> dict:
    """FD of the kept set and of a random subset of the candidates of the same size, to the reference."""
    n = int(keep.sum())
    if n < 2 or n == len(candidates):
        return {"fd_kept": None, "fd_random": None, "num_compared": n}
    random = np.random.default_rng(seed).choice(len(candidates), n, replace=False)
    return {"fd_kept": frechet_to(candidates[keep], mu, sigma),
            "fd_random": frechet_to(candidates[random], mu, sigma), "num_compared": n}


def kmeans(x: np.ndarray, k: int, seed: int, iterations: int = 20, device: str = "cpu") -> np.ndarray:
    """Cluster labels of unit vectors [N, D] by spherical k-means (cosine), k-means++-style seeding."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(np.asarray(x, np.float32)).to(device)
    n = len(data)
    k = max(1, min(k, n))
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [data[first]]
    closest = 1 - data @ centres[0]
    for _ in range(1, k):
        weights = closest.clamp_min(0).cpu().double() + 1e-12
        pick = int(torch.multinomial(weights, 1, generator=gen))
        centres.append(data[pick])
        closest = torch.minimum(closest, 1 - data @ data[pick])
    c = torch.stack(centres)
    labels = torch.zeros(n, dtype=torch.long, device=data.device)
    for _ in range(iterations):
        labels = (data @ c.T).argmax(1)
        sums = torch.zeros_like(c).index_add_(0, labels, data)
        norms = sums.norm(dim=1, keepdim=True)
        c = torch.where(norms > 0, sums / norms.clamp_min(1e-12), c)
    return labels.cpu().numpy()


def semantic_duplicates(embeddings: np.ndarray, similarity: float, clusters: int, seed: int,
                        device: str = "cpu") -> np.ndarray:
    """For each row, the index of an earlier row it duplicates (cosine similarity >= `similarity`
    within its k-means cluster), else -1. Rows come in input order, so the first of a group stays."""
    n = len(embeddings)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return duplicate_of
    x = np.asarray(embeddings, np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    labels = kmeans(x, clusters or int(np.ceil(np.sqrt(n))), seed, device=device)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        sims = x[members] @ x[members].T
        kept: list[int] = []
        for a, i in enumerate(members):
            if kept:
                best = int(np.argmax(sims[a, kept]))
                if sims[a, kept[best]] >= similarity:
                    duplicate_of[i] = members[kept[best]]
                    continue
            kept.append(a)
    return duplicate_of
