"""Fréchet distance: zero for a set against itself, grows with a shift, matches the closed form."""

import numpy as np
import pytest

from lmfusion.evaluation.fid import feature_statistics, fid_from_features, frechet_distance


def _features(seed: int, n: int = 500, d: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def test_a_set_against_itself_is_zero():
    x = _features(0)
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-6)


def test_shifted_set_is_far_and_farther_with_a_larger_shift():
    x, y = _features(0), _features(1)
    same_distribution = fid_from_features(x, y)
    small, large = fid_from_features(x, y + 0.5), fid_from_features(x, y + 2.0)
    assert same_distribution < small < large
    assert small == pytest.approx(8 * 0.5**2, rel=0.3)  # |mu1 - mu2|^2 dominates


def test_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0]), np.array([1.0, 1.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 1.0])
    expected = 1.0 + (1 + 4 - 2 * 2) + (4 + 1 - 2 * 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected)


def test_fewer_samples_than_dimensions_stays_finite():
    x, y = _features(0, n=5, d=16), _features(1, n=5, d=16)
    value = fid_from_features(x, y)
    assert np.isfinite(value) and value > 0


def test_statistics_need_a_set():
    with pytest.raises(ValueError):
        feature_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
