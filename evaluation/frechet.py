"""Frechet distance between Gaussians fitted to feature sets (FVD on I3D features, FID on Inception).

    d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))

tr((S_a S_b)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
PSD matrix S_a^(1/2) S_b S_a^(1/2) (same eigenvalues as S_a S_b), in float64: no complex parts to
discard and no eps-offset retry, also for the rank-deficient covariances of fewer samples than
feature dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class GaussianStats:
    mean: np.ndarray  # (D,)
    cov: np.ndarray  # (D, D)
    count: int  # samples the statistics come from


def gaussian_stats(features: np.ndarray) -> GaussianStats:
    """Mean and unbiased covariance of (N, D) features, N >= 2."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need (N >= 2, D) features for a covariance, got shape {features.shape}")
    return GaussianStats(features.mean(0), np.cov(features, rowvar=False), len(features))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(a.mean, a.cov) and N(b.mean, b.cov)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature dimensions differ: {a.mean.shape} vs {b.mean.shape}")
    root_a = _psd_sqrt(a.cov)
    middle = root_a @ b.cov @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    distance = ((a.mean - b.mean) ** 2).sum() + np.trace(a.cov) + np.trace(b.cov) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


def frechet_distance_of_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(gaussian_stats(a), gaussian_stats(b))
