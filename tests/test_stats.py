from __future__ import annotations

import numpy as np
import pytest

from helpers import stats


def test_constant_values_have_a_degenerate_interval():
    assert stats.bootstrap_ci(np.full(50, 2.5), block=5) == (2.5, 2.5, 2.5)


def test_interval_covers_the_true_mean_most_of_the_time():
    rng = np.random.default_rng(0)
    hits = 0
    for seed in range(100):
        x = rng.normal(1.0, 1.0, 200)
        _, lo, hi = stats.bootstrap_ci(x, n_boot=400, seed=seed)
        hits += lo <= 1.0 <= hi
    assert 88 <= hits <= 99  # nominal 95%


def test_blocks_widen_the_interval_for_correlated_values():
    rng = np.random.default_rng(1)
    x = np.repeat(rng.normal(size=40), 25)  # runs of 25 identical values
    _, lo1, hi1 = stats.bootstrap_ci(x, block=1, seed=0)
    _, lo25, hi25 = stats.bootstrap_ci(x, block=25, seed=0)
    assert (hi25 - lo25) > 2 * (hi1 - lo1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        stats.bootstrap_ci(np.array([]))
    with pytest.raises(ValueError, match="level"):
        stats.bootstrap_ci(np.ones(3), level=1.5)
    with pytest.raises(ValueError, match=">= 1"):
        stats.block_bootstrap_means(np.ones(3), block=0)
    assert stats.block_bootstrap_means(np.arange(3.0), block=10, n_boot=5).shape == (5,)
