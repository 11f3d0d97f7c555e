"""Paired comparisons of methods against the reference, with bootstrap intervals over prompts.

Every comparison in notebook 04 is a function of *means over prompts* of a few per-prompt
columns (a method's quality, the reference's quality on the same prompt, in a band of
temperatures ...). :func:`bootstrap_ci_of` resamples prompts (rows) with replacement, so all
columns of a prompt move together: this pairing is what makes small differences between
methods visible despite the large spread between prompts.

Quality degradation is measured *relative* to the reference, ``R = 1 - mean(Q_method) /
mean(Q_reference)``, because every method's quality changes with temperature by itself (the
expected accuracy of a sampled word falls as T grows); an absolute difference would shrink at
high T for that reason alone.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd

from .stats import bootstrap_ci

VERDICTS = ("holds", "does not hold", "inconclusive")


def bootstrap_ci_of(values: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], n_boot: int = 1000,
                    level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
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


def mean_ci_by(df: pd.DataFrame, by: Sequence[str], value: str, n_boot: int = 1000, seed: int = 0,
               unit: str = "prompt_id") -> pd.DataFrame:
    """Mean of ``value`` per group with a bootstrap interval, the ``unit`` (prompt) as the
    resampled unit: rows of one prompt (several samples, say) are averaged first.

    Returns the ``by`` columns plus ``mean``, ``low``, ``high`` and ``prompts``; groups with no
    non-missing value are left out.
    """
    rows = []
    for key, g in df.groupby(list(by)):
        per_unit = g.groupby(unit)[value].mean().dropna().to_numpy()
        if len(per_unit) == 0:
            continue
        m, lo, hi = bootstrap_ci(per_unit, n_boot=n_boot, seed=seed)
        rows.append({**dict(zip(by, key)), "mean": m, "low": lo, "high": hi, "prompts": len(per_unit)})
    return pd.DataFrame(rows)


def relative_degradation(q_method: np.ndarray, q_reference: np.ndarray) -> np.ndarray:
    """``1 - q_method / q_reference``: 0 = as good as the reference, 0.1 = 10% worse."""
    return 1 - np.asarray(q_method) / np.asarray(q_reference)


def band_means(df: pd.DataFrame, value: str, band: Sequence[float], by: Sequence[str] = ("prompt_id",),
               temperature: str = "temperature") -> pd.Series:
    """Per-``by`` mean of ``value`` over the rows whose temperature lies in ``[band[0], band[1]]``."""
    lo, hi = band
    if lo > hi:
        raise ValueError(f"a temperature band is [low, high], got {list(band)}")
    rows = df[(df[temperature] >= lo - 1e-9) & (df[temperature] <= hi + 1e-9)]
    if rows.empty:
        raise ValueError(f"no rows with {temperature} in [{lo}, {hi}]")
    return rows.groupby(list(by))[value].mean()


def sensitivity_index(df: pd.DataFrame, low: Sequence[float], high: Sequence[float], quality: str = "p_answer",
                      reference_quality: str = "ref_p_answer", n_boot: int = 1000, seed: int = 0) -> dict:
    """Low-temperature sensitivity of one method: ``R(low band) - R(high band)``.

    ``df`` holds one method's rows (prompt_id, temperature, ``quality``, ``reference_quality``).
    Positive: the method loses more (relative to the reference) at low temperature than at high.
    Returns the estimate, its bootstrap interval, and ``R`` in each band.
    """
    cols = [band_means(df, c, b) for b in (low, high) for c in (quality, reference_quality)]
    table = pd.concat(cols, axis=1).dropna()
    x = table.to_numpy()

    def index(m):
        return relative_degradation(m[..., 0], m[..., 1]) - relative_degradation(m[..., 2], m[..., 3])

    est, lo_ci, hi_ci = bootstrap_ci_of(x, index, n_boot, seed=seed)
    r_low, lo_low, hi_low = bootstrap_ci_of(x, lambda m: relative_degradation(m[..., 0], m[..., 1]), n_boot, seed=seed)
    r_high, lo_high, hi_high = bootstrap_ci_of(x, lambda m: relative_degradation(m[..., 2], m[..., 3]), n_boot,
                                               seed=seed)
    return {"index": est, "index_low": lo_ci, "index_high": hi_ci, "R_low_band": r_low, "R_low_band_ci_low": lo_low,
            "R_low_band_ci_high": hi_low, "R_high_band": r_high, "R_high_band_ci_low": lo_high,
            "R_high_band_ci_high": hi_high, "prompts": len(table)}


def sign_verdict(low: float, high: float) -> str:
    """Is a quantity positive? holds if its interval is above 0, does not hold if below 0."""
    if low > 0:
        return "holds"
    if high < 0:
        return "does not hold"
    return "inconclusive"


def equivalence_verdict(low: float, high: float, margin: float) -> str:
    """Are two things equal within ``margin``? holds if the interval of their difference lies
    inside ``[-margin, margin]``; does not hold if it lies wholly outside; else inconclusive."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if -margin <= low and high <= margin:
        return "holds"
    if low > margin or high < -margin:
        return "does not hold"
    return "inconclusive"


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """A claim made for several cases (models, methods) holds only if it holds in each of them,
    does not hold if it fails in at least one and holds in none, and is inconclusive otherwise."""
    v = list(verdicts)
    unknown = sorted(set(v) - set(VERDICTS))
    if not v or unknown:
        raise ValueError(f"verdicts must be a non-empty list of {VERDICTS}, got {v}")
    if all(x == "holds" for x in v):
        return "holds"
    if "does not hold" in v and "holds" not in v:
        return "does not hold"
    return "inconclusive"
