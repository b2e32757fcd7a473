"""Fréchet distance between two sets of image features (FID when the features are Inception's).

The formula and the handling of near-singular covariances follow pytorch-fid
(``calculate_frechet_distance``), the implementation COCO-FID numbers are reported with:

    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

Here the features come from the project's small shapes classifier (``feature_net.py``), not
Inception-v3 (which would need a download), so values are **not** comparable to the paper's
COCO FID, only between models evaluated with the same feature net and sample count (FID is
biased upwards at small n, so the count is part of the result).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of ``[N, D]`` features (float64; N >= 2 for a covariance)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need [N >= 2, D] features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """Matrix square root; scipy warns (or, for singular input, may fail) where pytorch-fid regularises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            return linalg.sqrtm(matrix)
        except (ValueError, np.linalg.LinAlgError):
            return np.full_like(matrix, np.nan)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two feature sets have different dimensions")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        # Fewer samples than dimensions make the product singular: regularise as pytorch-fid does.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off leaves tiny imaginary parts; large ones mean the estimate is meaningless.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            warnings.warn(f"FID: imaginary component {np.max(np.abs(covmean.imag)):.3g} dropped")
        covmean = covmean.real
    value = diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    return float(max(value, 0.0))


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two ``[N, D]`` feature arrays (N may differ between them)."""
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))
