"""Bootstrap confidence intervals: every resampling of the compendium is here.

Tokens of one text are not independent, so intervals over per-token values resample
contiguous *blocks* of tokens (a moving-block bootstrap); ``block=1`` is the ordinary
bootstrap. Paired comparisons (method vs reference on the same tokens) resample the same
blocks for both, which is what makes small differences between methods visible.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def block_bootstrap_means(values: np.ndarray, block: int = 1, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """``n_boot`` bootstrap replicates of the mean of ``values`` (1-D), resampling blocks.

    Each replicate draws ``ceil(n / block)`` random starting points and concatenates the
    blocks that begin there (wrapping around), then truncates to ``n`` values.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    if n == 0:
        raise ValueError("cannot bootstrap an empty array")
    if block < 1 or n_boot < 1:
        raise ValueError(f"block and n_boot must be >= 1, got {block}, {n_boot}")
    block = min(block, n)
    rng = np.random.default_rng(seed)
    n_blocks = -(-n // block)
    starts = rng.integers(0, n, size=(n_boot, n_blocks))
    idx = (starts[:, :, None] + np.arange(block)) % n
    return x[idx.reshape(n_boot, -1)[:, :n]].mean(axis=1)


def bootstrap_ci(
    values: np.ndarray, block: int = 1, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its percentile bootstrap interval."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    reps = block_bootstrap_means(values, block, n_boot, seed)
    alpha = (1 - level) / 2
    low, high = np.quantile(reps, [alpha, 1 - alpha])
    return float(np.mean(values)), float(low), float(high)


def bootstrap_ci_of(
    values: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(estimate, low, high)`` of ``statistic(column means)``, resampling the rows of ``values``.

    ``values`` is ``[n_prompts, n_columns]``; ``statistic`` maps an array ``[..., n_columns]`` of
    column means to ``[...]`` (so it is applied to all replicates at once).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"values must be a non-empty 2-D array [prompts, columns], got shape {x.shape}")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got {level}, {n_boot}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
    reps = np.asarray(statistic(x[idx].mean(axis=1)), dtype=np.float64)
    alpha = (1 - level) / 2
    low, high = np.nanquantile(reps, [alpha, 1 - alpha])
    return float(statistic(x.mean(axis=0))), float(low), float(high)


def resampled_sums_ci(
    parts: np.ndarray, statistic, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(estimate, low, high)`` arrays of a vector ``statistic`` of the sum of ``parts`` over
    axis 0 (blocks of text), with percentile intervals from resampling the parts.

    ``statistic`` runs on every replicate's sum, so anything fitted to the sum (a temperature
    that minimises a summed curve) is refitted per replicate. Replicates where it is not finite
    are left out of the quantiles."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = np.asarray(parts, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("cannot bootstrap an empty array")
    rng = np.random.default_rng(seed)
    estimate = np.asarray(statistic(x.sum(0)), dtype=np.float64)
    reps = np.stack([statistic(x[rng.integers(0, len(x), len(x))].sum(0)) for _ in range(n_boot)])
    alpha = (1 - level) / 2
    low, high = np.nanquantile(reps, [alpha, 1 - alpha], axis=0)
    return estimate, low, high
