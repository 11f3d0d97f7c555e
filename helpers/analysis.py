"""Every claim's statistic and verdict: C1–C3 (notebook 04), C4 and C5 (speed, notebook 03), larger at
lower precision at equal memory (notebook 06), and the synthesis of notebook 04's instruments.

The rules that turn an interval into a verdict are here, once: :func:`sign_verdict`,
:func:`equivalence_verdict`, :func:`differs_verdict`, :func:`combine_verdicts`,
:func:`instrument_verdict`, :func:`c4_c5_verdicts`, :func:`equal_memory_verdict`.

**Paired comparisons** of methods against the reference, with bootstrap intervals over prompts.

Every comparison in notebook 04 is a function of *means over prompts* of a few per-prompt
columns (a method's quality, the reference's quality on the same prompt, in a band of
temperatures ...). :func:`helpers.stats.bootstrap_ci_of` resamples prompts (rows) with replacement, so all
columns of a prompt move together: this pairing is what makes small differences between
methods visible despite the large spread between prompts.

Quality degradation is measured *relative* to the reference, ``R = 1 - mean(Q_method) /
mean(Q_reference)``, because every method's quality changes with temperature by itself (the
expected accuracy of a sampled word falls as T grows); an absolute difference would shrink at
high T for that reason alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import efftemp
from .stats import bootstrap_ci, bootstrap_ci_of

VERDICTS = ("holds", "does not hold", "inconclusive")
#: a relative loss (or difference of losses) this close to 0 is no effect, whatever its interval
NEGLIGIBLE = 1e-4


def mean_ci_by(
    df: pd.DataFrame, by: Sequence[str], value: str, n_boot: int = 1000, seed: int = 0, unit: str = "prompt_id"
) -> pd.DataFrame:
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


def band_means(
    df: pd.DataFrame,
    value: str,
    band: Sequence[float],
    by: Sequence[str] = ("prompt_id",),
    temperature: str = "temperature",
) -> pd.Series:
    """Per-``by`` mean of ``value`` over the rows whose temperature lies in ``[band[0], band[1]]``."""
    lo, hi = band
    if lo > hi:
        raise ValueError(f"a temperature band is [low, high], got {list(band)}")
    rows = df[(df[temperature] >= lo - 1e-9) & (df[temperature] <= hi + 1e-9)]
    if rows.empty:
        raise ValueError(f"no rows with {temperature} in [{lo}, {hi}]")
    return rows.groupby(list(by))[value].mean()


def sensitivity_index(
    df: pd.DataFrame,
    low: Sequence[float],
    high: Sequence[float],
    quality: str = "p_answer",
    reference_quality: str = "ref_p_answer",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
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
    r_high, lo_high, hi_high = bootstrap_ci_of(
        x, lambda m: relative_degradation(m[..., 2], m[..., 3]), n_boot, seed=seed
    )
    return {
        "index": est,
        "index_low": lo_ci,
        "index_high": hi_ci,
        "R_low_band": r_low,
        "R_low_band_ci_low": lo_low,
        "R_low_band_ci_high": hi_low,
        "R_high_band": r_high,
        "R_high_band_ci_low": lo_high,
        "R_high_band_ci_high": hi_high,
        "prompts": len(table),
    }


def check_bands(low: Sequence[float], high: Sequence[float]) -> None:
    """Fail at once on a temperature band that is not ``[low, high]`` or on low and high bands
    that overlap (a temperature in both would count for and against a claim)."""
    for name, band in (("low_band", low), ("high_band", high)):
        if len(band) != 2 or band[0] > band[1]:
            raise ValueError(f"{name} must be [low, high], got {list(band)}")
    if low[1] >= high[0]:
        raise ValueError(f"low_band {list(low)} and high_band {list(high)} overlap")


def degradation_curve(
    df: pd.DataFrame, quality: str = "p_answer", reference_quality: str = "ref_p_answer", n_boot: int = 1000
) -> pd.DataFrame:
    """``R(T)`` of one method at every temperature of ``df`` (its rows: prompt_id, temperature and
    the two qualities): ``1 - mean quality / mean reference quality`` over prompts, with a paired
    bootstrap interval. Columns ``temperature``, ``mean``, ``low``, ``high``."""
    rows = []
    for T, g in df.groupby("temperature"):
        x = g[[quality, reference_quality]].dropna().to_numpy()
        if len(x):
            est, lo, hi = bootstrap_ci_of(x, lambda m: relative_degradation(m[..., 0], m[..., 1]), n_boot)
            rows.append({"temperature": T, "mean": est, "low": lo, "high": hi})
    return pd.DataFrame(rows, columns=["temperature", "mean", "low", "high"])


def sensitivity_table(
    df: pd.DataFrame, methods: Sequence[str], low: Sequence[float], high: Sequence[float], n_boot: int = 1000
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(curves, index)`` for every model of ``df`` and each of ``methods``: the curves ``R(T)``
    (:func:`degradation_curve`) and the sensitivity index (:func:`sensitivity_index`) with
    ``T_of_largest_R``, the temperature above 0 where ``R`` is largest."""
    curves, index = [], []
    for model, method in ((m, x) for m in df.model.unique() for x in methods):
        g = df[(df.model == model) & (df.method == method)]
        curve = degradation_curve(g, n_boot=n_boot).assign(model=model, method=method)
        hot = curve[curve.temperature > 0]
        peak = hot.temperature[hot["mean"].idxmax()] if len(hot) else np.nan
        curves.append(curve)
        index.append({"model": model, "method": method, **sensitivity_index(g, low, high, n_boot=n_boot),
                      "T_of_largest_R": peak})  # fmt: skip
    cols = ["model", "method", "temperature", "mean", "low", "high"]
    return pd.concat(curves, ignore_index=True)[cols], pd.DataFrame(index)


def sign_verdict(low: float, high: float) -> str:
    """Is a quantity positive? holds if its interval is above 0, does not hold if below 0 or if
    it lies inside ``±NEGLIGIBLE`` (no effect: a control that matches the reference exactly,
    up to rounding), inconclusive otherwise."""
    if max(abs(low), abs(high)) < NEGLIGIBLE:
        return "does not hold"
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


def cloze_pairs(cloze: pd.DataFrame, model: str, a: str, b: str, bands: Sequence[Sequence[float]]) -> np.ndarray:
    """Per cloze prompt: ``Q_a``, ``Q_b`` and the reference's ``Q`` (mean ``p_answer`` over each band's
    temperatures), band after band: ``[prompts, 3 * len(bands)]``, prompts missing a value dropped."""
    cols = []
    for band in bands:
        for m in (a, b):
            cols.append(band_means(cloze[(cloze.model == model) & (cloze.method == m)], "p_answer", band))
        cols.append(band_means(cloze[(cloze.model == model) & (cloze.method == a)], "ref_p_answer", band))
    return pd.concat(cols, axis=1).dropna().to_numpy()


def cloze_claims(
    cloze: pd.DataFrame,
    index: pd.DataFrame,
    low_band: Sequence[float],
    high_band: Sequence[float],
    margin: float,
    n_boot: int = 1000,
) -> pd.DataFrame:
    """C1, C2 and C3 per model on the cloze prompts (notebook 04, section 7), with ``all_models``:
    the claim's verdict over every model (:func:`combine_verdicts`), repeated on each model's row.

    ``cloze``: exact next-token rows (top-k off) with ``p_answer``/``ref_p_answer``; ``index``: the
    sensitivity index per (model, method) from :func:`sensitivity_index`. C1: nf4 and fp4 equal
    within ``margin`` over all temperatures; C2: their relative losses differ between the bands
    (:func:`differs_verdict`); C3: every 4-bit method's index above 0 (int8 listed as a contrast).
    """
    all_T = [float(cloze.temperature.min()), float(cloze.temperature.max())]
    have, claims = set(cloze.method), []
    for model in dict.fromkeys(cloze.model):
        if {"nf4", "fp4"} <= have:
            x = cloze_pairs(cloze, model, "nf4", "fp4", [all_T])
            est, lo, hi = bootstrap_ci_of(x, lambda m: (m[..., 0] - m[..., 1]) / m[..., 2], n_boot)
            claims.append(
                {
                    "claim": "C1",
                    "model": model,
                    "statistic": "(Q_nf4 - Q_fp4) / Q_fp32, all T",
                    "estimate": est,
                    "ci_low": lo,
                    "ci_high": hi,
                    "verdict": equivalence_verdict(lo, hi, margin),
                    "numbers": f"margin ±{margin}",
                }
            )
            x = cloze_pairs(cloze, model, "fp4", "nf4", [low_band, high_band])
            est, lo, hi = bootstrap_ci_of(
                x, lambda m: (m[..., 1] - m[..., 0]) / m[..., 2] - (m[..., 4] - m[..., 3]) / m[..., 5], n_boot
            )
            low, high = ((x[:, 1] - x[:, 0]).mean() / x[:, 2].mean(), (x[:, 4] - x[:, 3]).mean() / x[:, 5].mean())
            claims.append(
                {
                    "claim": "C2",
                    "model": model,
                    "statistic": "[R_fp4 - R_nf4](low) - [R_fp4 - R_nf4](high)",
                    "estimate": est,
                    "ci_low": lo,
                    "ci_high": hi,
                    "verdict": differs_verdict(lo, hi, margin),
                    "numbers": f"R_fp4 - R_nf4 low band {low:.3f}, high band {high:.3f}",
                }
            )
        four_bit = index[(index.model == model) & index.method.isin(["nf4", "nf4-dq", "fp4", "fp4-dq"])]
        if len(four_bit):
            int8 = index[(index.model == model) & (index.method == "int8")]
            numbers = "; ".join(
                f"{r.method} {r.index:+.3f} [{r.index_low:+.3f}, {r.index_high:+.3f}]" for r in four_bit.itertuples()
            )
            numbers += "".join(
                f"; int8 (8-bit contrast) {r.index:+.3f} [{r.index_low:+.3f}, {r.index_high:+.3f}]"
                for r in int8.itertuples()
            )
            verdicts = [sign_verdict(r.index_low, r.index_high) for r in four_bit.itertuples()]
            claims.append(
                {
                    "claim": "C3",
                    "model": model,
                    "statistic": "S = R(low) - R(high): mean of the 4-bit methods; ci: the range their intervals span",
                    "estimate": four_bit["index"].mean(),
                    "ci_low": four_bit.index_low.min(),
                    "ci_high": four_bit.index_high.max(),
                    "verdict": combine_verdicts(verdicts),
                    "numbers": numbers,
                }
            )
    claims = pd.DataFrame(claims)
    over_models = claims.groupby("claim").verdict.apply(lambda v: combine_verdicts(list(v))).rename("all_models")
    return claims.join(over_models, on="claim")


# --------------------------------------------------------------------------- running text
BLOCK_KEY = ["doc", "window", "block"]


def family(method: str) -> str:
    """The precision family of a method: double quantization is a replicate, not a new method
    (``nf4-dq`` -> ``nf4``)."""
    return method.removesuffix("-dq")


def family_blocks(blocks: pd.DataFrame, block_key: Sequence[str] = tuple(BLOCK_KEY)) -> pd.DataFrame:
    """Block sums averaged over the methods of each family (``nf4`` with ``nf4-dq``, ``fp4``
    with ``fp4-dq``), so that twins count once, as replicates. Adds nothing for lone methods."""
    keys = [c for c in ("model", "view", "temperature", "top_k", *block_key) if c in blocks.columns]
    numeric = [
        c
        for c in blocks.columns
        if c not in keys + ["method", "ref_temperature"] and pd.api.types.is_numeric_dtype(blocks[c])
    ]
    return blocks.assign(method=blocks.method.map(family)).groupby(["method", *keys], as_index=False)[numeric].mean()


def band_sums(
    blocks: pd.DataFrame, band: Sequence[float], column: str, block_key: Sequence[str] = tuple(BLOCK_KEY)
) -> pd.Series:
    """Per block, the mean over the temperatures in ``[band[0], band[1]]`` (greedy excluded) of a
    summed column: the block's share of a band average."""
    lo, hi = band
    if lo > hi:
        raise ValueError(f"a temperature band is [low, high], got {list(band)}")
    rows = blocks[(blocks.temperature >= lo - 1e-9) & (blocks.temperature <= hi + 1e-9) & (blocks.temperature > 0)]
    if rows.empty:
        raise ValueError(f"no temperatures in [{lo}, {hi}]")
    return rows.groupby(list(block_key))[column].mean()


def columns_ci(
    columns: dict[str, np.ndarray],
    statistic: Callable[[dict[str, np.ndarray]], np.ndarray],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(estimate, low, high)`` of ``statistic`` of the named columns' means over rows (blocks or
    spans of text), resampling rows with all their columns together: a paired bootstrap.

    ``columns`` map names to equally long arrays (sums per block, say); ``statistic`` receives
    their means over the resampled rows (``[n_boot]`` arrays), so a ratio of two columns is a
    ratio of totals."""
    names = list(columns)
    x = np.column_stack([np.asarray(columns[n], dtype=np.float64) for n in names])
    return bootstrap_ci_of(x, lambda m: statistic({n: m[..., i] for i, n in enumerate(names)}), n_boot, level, seed)


def contrast_ci(
    columns: dict[str, pd.Series],
    statistic: Callable[[dict[str, np.ndarray]], np.ndarray],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """:func:`columns_ci` of series aligned on their index (blocks), rows with a gap left out."""
    table = pd.concat(columns, axis=1).dropna()
    return columns_ci({n: table[n].to_numpy() for n in table.columns}, statistic, n_boot, level, seed)


def loss(method_sum: np.ndarray, reference_sum: np.ndarray) -> np.ndarray:
    """Relative loss of expected next-word accuracy, ``R = 1 - Q_method / Q_reference``."""
    return relative_degradation(method_sum, reference_sum)


def differs_verdict(low: float, high: float, margin: float) -> str:
    """Do two things differ? holds if the interval of the difference excludes 0 (by more than
    ``NEGLIGIBLE``), does not hold if it lies inside ``[-margin, margin]`` (equal for practical
    purposes), else inconclusive."""
    if max(abs(low), abs(high)) >= NEGLIGIBLE and (low > 0 or high < 0):
        return "holds"
    return "does not hold" if equivalence_verdict(low, high, margin) == "holds" else "inconclusive"


@dataclass(frozen=True)
class Measure:
    """How an instrument turns sums per block (a span of text, a prompt) into a relative loss
    ``R`` (above 0: the method is worse than the reference)."""

    columns: tuple[str, ...]  # summed per block for the method; the reference's carry the prefix "ref_"
    relative_loss: Callable[..., np.ndarray]  # (method means..., reference means...) -> R
    block_key: tuple[str, ...]
    level: Callable[[pd.Series, str], float]  # (column sums of a group, "" or "ref_") -> its quality

    def loss(self, c: dict[str, np.ndarray], tag: str) -> np.ndarray:
        """``R`` from the columns ``<column>_<tag>`` and ``ref_<column>_<tag>`` of ``c``."""
        return self.relative_loss(
            *(c[f"{x}_{tag}"] for x in self.columns), *(c[f"ref_{x}_{tag}"] for x in self.columns)
        )


#: running text: relative loss of expected next-word accuracy, blocks of consecutive tokens
ACCURACY = Measure(("p_true",), lambda m, r: loss(m, r), tuple(BLOCK_KEY), lambda s, p: s[f"{p}p_true"] / s["n"])


MARGIN_CLAIMS = {("C1", "both"), ("C2", "first")}
"""(claim, version) pairs whose "does not hold" means: within the equivalence margin of 0."""


def temperature_claims(
    blocks: pd.DataFrame,
    low: Sequence[float],
    high: Sequence[float],
    mid: Sequence[float] = (0.5, 0.8),
    margin: float = 0.02,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    measure: Measure = ACCURACY,
) -> pd.DataFrame:
    """Claims C2 and C3 (both abstract versions) for one model and one view, from its block sums.

    ``blocks``: one model's rows of one view (``nominal`` or ``matched``), with columns
    ``method``, ``temperature``, ``top_k`` (only 0 is used), ``measure.block_key`` and the
    ``measure``'s columns summed over each block (for :data:`ACCURACY`, ``p_true`` and
    ``ref_p_true``; for generations, :data:`helpers.judge.JUDGED`). Twins are averaged first
    (:func:`family_blocks`). ``R(band)`` is the measure's relative loss over the band (for
    :data:`ACCURACY`, ``1 - Q_method(band) / Q_reference(band)``); the statistics are

    * C3 (4-bit more sensitive at low T), per 4-bit family (and per control of
      :data:`helpers.efftemp.CONTROLS` present, read through the same statistic): ``S = R(low) - R(high) > 0``;
    * C3, later version (most sensitive for T in ``mid``), per 4-bit family: ``R(mid) - R(rest)
      > 0``, ``rest`` = every other T > 0 of the grid;
    * C2 (nf4 and fp4 behave differently across temperatures): ``D = [R_fp4 - R_nf4](low) -
      [R_fp4 - R_nf4](high)`` differs from 0 (two-sided, equivalence ``margin``);
    * C2, later version (nf4 more resilient at low T): ``R_fp4(low) - R_nf4(low) > 0``;
    * C1 (nf4 and fp4 equally proficient; both versions): ``R_fp4 - R_nf4`` over every T > 0
      lies within ``±margin`` (holds) or wholly outside it (does not hold).

    One row per statistic: estimate, paired bootstrap interval over blocks, verdict, direction.
    """
    key = list(measure.block_key)
    fam = family_blocks(blocks[blocks.top_k == 0], key)
    temps = sorted(t for t in fam.temperature.unique() if t > 0)
    rest = [t for t in temps if not mid[0] - 1e-9 <= t <= mid[1] + 1e-9]
    if not rest:
        raise ValueError(f"no temperature outside {list(mid)} to compare with")
    summed = [*measure.columns, *(f"ref_{x}" for x in measure.columns)]

    def cols(method: str, band: Sequence[float], tag: str) -> dict[str, pd.Series]:
        g = fam[fam.method == method]
        return {f"{x}_{tag}": band_sums(g, band, x, key) for x in summed}

    def rest_cols(method: str) -> dict[str, pd.Series]:
        g = fam[(fam.method == method) & fam.temperature.isin(rest)]
        return {f"{x}_rest": g.groupby(key)[x].mean() for x in summed}

    rows = []

    def add(claim, version, subject, statistic, est_lo_hi, verdict, positive, negative):
        est, lo_ci, hi_ci = est_lo_hi
        rows.append(
            {
                "claim": claim,
                "version": version,
                "subject": subject,
                "statistic": statistic,
                "estimate": est,
                "ci_low": lo_ci,
                "ci_high": hi_ci,
                "verdict": verdict,
                "direction": positive if est > 0 else negative,
            }
        )

    for fm in [f for f in ("nf4", "fp4", *efftemp.CONTROLS) if f in set(fam.method)]:
        ci = contrast_ci(
            {**cols(fm, low, "low"), **cols(fm, high, "high")},
            lambda c: measure.loss(c, "low") - measure.loss(c, "high"),
            n_boot,
            level,
            seed,
        )
        add(
            "C3",
            "first",
            fm,
            "S = R(low) - R(high)",
            ci,
            sign_verdict(*ci[1:]),
            "loses more at low T",
            "loses less at low T",
        )
        ci = contrast_ci(
            {**cols(fm, mid, "mid"), **rest_cols(fm)},
            lambda c: measure.loss(c, "mid") - measure.loss(c, "rest"),
            n_boot,
            level,
            seed,
        )
        add(
            "C3",
            "later",
            fm,
            f"R(T in {list(mid)}) - R(other T)",
            ci,
            sign_verdict(*ci[1:]),
            f"loses most in {list(mid)}",
            f"loses less in {list(mid)} than elsewhere",
        )
    if {"nf4", "fp4"} <= set(fam.method):
        both = {
            f"{fm}_{k}": v
            for fm in ("nf4", "fp4")
            for k, v in {**cols(fm, low, "low"), **cols(fm, high, "high")}.items()
        }

        def gap(c, band):
            return measure.loss({k[4:]: v for k, v in c.items() if k.startswith("fp4_")}, band) - measure.loss(
                {k[4:]: v for k, v in c.items() if k.startswith("nf4_")}, band
            )

        ci = contrast_ci(both, lambda c: gap(c, "low") - gap(c, "high"), n_boot, level, seed)
        add(
            "C2",
            "first",
            "nf4 vs fp4",
            "D = [R_fp4 - R_nf4](low) - [R_fp4 - R_nf4](high)",
            ci,
            differs_verdict(*ci[1:], margin),
            "fp4 falls behind nf4 more at low T",
            "fp4 falls behind nf4 more at high T",
        )
        ci = contrast_ci(both, lambda c: gap(c, "low"), n_boot, level, seed)
        add(
            "C2",
            "later",
            "nf4 vs fp4",
            "R_fp4(low) - R_nf4(low)",
            ci,
            sign_verdict(*ci[1:]),
            "nf4 more resilient at low T",
            "fp4 more resilient at low T",
        )
        every = [temps[0], temps[-1]]
        ci = contrast_ci(
            {f"{fm}_{k}": v for fm in ("nf4", "fp4") for k, v in cols(fm, every, "all").items()},
            lambda c: gap(c, "all"),
            n_boot,
            level,
            seed,
        )
        add(
            "C1",
            "both",
            "nf4 vs fp4",
            "R_fp4 - R_nf4, every T > 0",
            ci,
            equivalence_verdict(*ci[1:], margin),
            "nf4 loses less than fp4",
            "fp4 loses less than nf4",
        )
    return pd.DataFrame(rows)


def matched_view(blocks: pd.DataFrame, view: str) -> pd.DataFrame:
    """The method's nominal rows (top-k off) with the reference columns replaced by the reference
    at ``tau * T`` (the unit's rows of the matched ``view``, ``matched:<definition>``): the
    comparison with the method's temperature shift removed. Greedy rows (T = 0) are the same in
    both views."""
    key = ["model", "method", "temperature", *BLOCK_KEY]
    nominal = blocks[(blocks.view == "nominal") & (blocks.top_k == 0)]
    matched = blocks[blocks.view == view].set_index(key)[["ref_p_true", "ref_logloss", "ref_temperature"]]
    if matched.empty:
        raise ValueError(f"no rows of view {view!r}; views: {sorted(blocks.view.unique())}")
    out = nominal.drop(columns=["ref_p_true", "ref_logloss", "ref_temperature"], errors="ignore").join(matched, on=key)
    greedy = out.temperature == 0
    out.loc[greedy, ["ref_p_true", "ref_logloss"]] = nominal.loc[greedy, ["ref_p_true", "ref_logloss"]].to_numpy()
    return out.assign(view=view)


def matched_robustness(claims: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, claim, version, subject) of the methods: the nominal verdict, the
    verdict (with its estimate) under each matched definition, the noise control's under each,
    and the one matched verdict that counts (:func:`helpers.efftemp.robust_matched_verdict`:
    every definition agrees, in verdict and direction, and for C3 the noise control, read
    through the same statistic, does not also give "holds"; "n/a": no noise control for C2).

    ``claims``: :func:`temperature_claims` rows of one or more models with a ``view`` column
    (``nominal`` and ``matched:<definition>``)."""
    matched = claims[claims.view.str.startswith("matched:")]
    if matched.empty or not (claims.view == "nominal").any():
        raise ValueError("need nominal and matched:<definition> rows")
    views = list(dict.fromkeys(matched.view))
    key = ["model", "claim", "version"]
    noise = matched[matched.subject == "ctrl-noise"].set_index([*key, "view"]).verdict
    rows = []
    methods = claims[~claims.subject.isin(efftemp.CONTROLS)]
    for (model, claim, version, subject), g in methods.groupby([*key, "subject"], sort=False):
        g = g.set_index("view")
        noise_verdicts = [noise.get((model, claim, version, v)) for v in views]
        noise_verdicts = [] if None in noise_verdicts else noise_verdicts
        rows.append(
            {
                "model": model,
                "claim": claim,
                "version": version,
                "subject": subject,
                "nominal": f"{g.verdict['nominal']} ({g.estimate['nominal']:+.3f})",
                **{v: f"{g.verdict[v]} ({g.estimate[v]:+.3f})" for v in views},
                **{f"ctrl-noise {v}": (noise_verdicts[i] if noise_verdicts else "n/a") for i, v in enumerate(views)},
                "matched": efftemp.robust_matched_verdict(
                    [g.verdict[v] for v in views], noise_verdicts, [g.direction[v] for v in views]
                ),
            }
        )
    return pd.DataFrame(rows)


#: what each running-text statistic asks, in words
CLAIM_WORDS = {
    ("C3", "first"): "4-bit loses more against fp32 at low T than at high T",
    ("C3", "later"): "4-bit loses most in the mid band",
    ("C2", "first"): "nf4's and fp4's losses change differently with T",
    ("C2", "later"): "nf4 loses less than fp4 at low T",
    ("C1", "both"): "nf4 and fp4 lose the same, within the equivalence margin",
}


#: where each (claim, version)'s statistic says "holds", for a figure's reader
HOLDS_WHERE = {
    ("C3", "first"): "holds above 0",
    ("C3", "later"): "holds above 0",
    ("C2", "first"): "holds where the interval excludes 0",
    ("C2", "later"): "holds above 0",
    ("C1", "both"): "holds inside the shaded margin",
}


def margin_caveats(rows: pd.DataFrame, margin: float) -> list[str]:
    """Statistics whose verdict depends on how the equivalence margin is read, one line each, from
    ``rows`` (:data:`SYNTHESIS_COLUMNS`). C2 (first version), "nf4's and fp4's losses change
    *differently* with T", holds where the interval of the interaction excludes 0
    (:func:`differs_verdict`); read as "differ by more than the margin within which C1 calls two
    losses equal", a statistic whose whole interval lies inside ``±margin`` does not hold. The
    mirror case: C1 ("equal") holds inside the margin even where the interval excludes 0."""
    inside = rows[(rows.ci_low >= -margin) & (rows.ci_high <= margin) & (rows.verdict == "holds")]
    c2 = inside[(inside.claim == "C2") & (inside.version == "first")]
    c1 = inside[(inside.claim == "C1") & ((inside.ci_low > 0) | (inside.ci_high < 0))]
    head = "{r.claim} ({v}) on {r.model}, {r.instrument}: {r.estimate:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]: "
    return [
        head.format(r=r, v=version_words(r.version))
        + f"the interval excludes 0, so it holds; but the whole interval lies within ±{margin:g}, so it does not hold "
        "if 'differently' means by more than the margin within which C1 calls two losses equal"
        for r in c2.itertuples()
    ] + [
        head.format(r=r, v=version_words(r.version))
        + f"the whole interval lies within ±{margin:g}, so nf4 and fp4 count as equal (holds), though the interval "
        "excludes 0: they differ, by less than the margin"
        for r in c1.itertuples()
    ]


def version_words(version: str) -> str:
    """ "first version", "later version", or "both versions" for a claim the abstracts share."""
    return "both versions" if version == "both" else f"{version} version"


def plain_summary(nominal: pd.DataFrame, robustness: pd.DataFrame) -> list[str]:
    """One plain line per (claim, version, subject) of the methods: the nominal verdict on each
    model with its direction, then the matched verdict that counts (:func:`matched_robustness`).
    Verdicts that agree on every model are said once. First, where present, the controls' C3
    (first version) estimates, with what each should give."""
    matched = robustness.set_index(["model", "claim", "version", "subject"]).matched
    lines = []
    controls = nominal[nominal.subject.isin(efftemp.CONTROLS) & (nominal.claim == "C3") & (nominal.version == "first")]
    if len(controls):
        said = [f"{r.subject} on {r.model} {r.estimate:+.3f} ({r.verdict})" for r in controls.itertuples()]
        lines.append(
            "Controls through the same C3 statistic S: "
            + "; ".join(said)
            + " (ctrl-temp is flatter than fp32 by construction, so it loses less at low T: S < 0; ctrl-noise has"
            " no temperature change applied: its S is what the statistic reads into noise of a 4-bit method's size)."
        )
    rows = nominal[~nominal.subject.isin(efftemp.CONTROLS)]
    for (claim, version, subject), g in rows.groupby(["claim", "version", "subject"], sort=False):
        said = [f"{r.verdict} on {r.model} ({r.direction})" for r in g.itertuples()]
        m = [matched.get((r.model, claim, version, subject), "n/a") for r in g.itertuples()]
        after = (
            m[0] + " on every model"
            if len(set(m)) == 1
            else "; ".join(f"{v} on {r.model}" for v, r in zip(m, g.itertuples()))
        )
        words = CLAIM_WORDS.get((claim, version), "")
        lines.append(
            f"{claim} ({version_words(version)}: {words}), {subject}: {'; '.join(said)}. "
            f"With the temperature shift removed: {after}."
        )
    return lines


def loss_curve(
    blocks: pd.DataFrame, n_boot: int = 1000, level: float = 0.95, seed: int = 0, measure: Measure = ACCURACY
) -> pd.DataFrame:
    """Per (model, method, view, T, top-k): the quality of the method and of the reference it is
    compared with (``Q``, ``Q_ref``; for :data:`ACCURACY` the expected next-word accuracy, sums
    over positions / positions) and the relative loss ``R`` (for :data:`ACCURACY`, ``1 - Q /
    Q_ref``) with its paired bootstrap interval over blocks."""
    by = ["model", "method", "view", "temperature", "top_k"]
    summed = [*measure.columns, *(f"ref_{x}" for x in measure.columns)]
    rows = []
    for key, g in blocks.groupby(by):
        g = g.set_index(list(measure.block_key))
        est, lo, hi = contrast_ci({f"{x}_": g[x] for x in summed}, lambda c: measure.loss(c, ""), n_boot, level, seed)
        totals = g.sum(numeric_only=True)
        rows.append(
            {
                **dict(zip(by, key)),
                "Q": measure.level(totals, ""),
                "Q_ref": measure.level(totals, "ref_"),
                "R": est,
                "R_low": lo,
                "R_high": hi,
            }
        )
    return pd.DataFrame(rows)


def bonferroni_level(n_statistics: int, level: float = 0.95) -> float:
    """Interval level that keeps the chance of any false "holds" among ``n_statistics`` read at
    once below ``1 - level`` (Bonferroni)."""
    if n_statistics < 1:
        raise ValueError(f"need at least one statistic, got {n_statistics}")
    return 1 - (1 - level) / n_statistics


def paired_differences(generations: pd.DataFrame, value: str, reference: str = "fp32") -> pd.DataFrame:
    """Each method's ``value`` minus the reference's on the same generation slot (model, T, top-k,
    length, prompt and sample: the same random numbers), one row per slot and method; the
    reference's own rows are left out. What :func:`mean_ci_by` then averages, prompt by prompt."""
    key = ["model", "temperature", "top_k", "max_new_tokens", "prompt_id", "sample"]
    ref = generations[generations.method == reference].set_index(key)[value].rename("ref_value")
    out = generations[generations.method != reference].join(ref, on=key)
    return out.assign(diff=out[value] - out.ref_value).dropna(subset=["diff"])


# --------------------------------------------------------------------------- synthesis
SYNTHESIS_COLUMNS = ["claim", "version", "model", "instrument", "subject", "statistic", "estimate", "ci_low",
                     "ci_high", "verdict", "direction"]  # fmt: skip


def cloze_rows(claims: pd.DataFrame, index: pd.DataFrame) -> pd.DataFrame:
    """:func:`cloze_claims` rows in the synthesis's columns: C1 (both versions' claim) and C2 (first
    version) as they are, C3 (first version) per 4-bit family from the sensitivity ``index``
    (:func:`sensitivity_index` per model and method; the -dq twins, replicates, are left out), so
    that each method's interval and direction are read on their own, as on the other instruments."""
    versions = {"C1": "both", "C2": "first"}
    positive = {"C1": "nf4 better than fp4", "C2": "fp4 falls behind nf4 more at low T"}
    negative = {"C1": "fp4 better than nf4", "C2": "fp4 falls behind nf4 more at high T"}
    pairs = claims[claims.claim.isin(list(versions))]
    pairs = pairs.assign(
        version=pairs.claim.map(versions),
        subject="nf4 vs fp4",
        direction=[(positive if e > 0 else negative)[c] for c, e in zip(pairs.claim, pairs.estimate)],
    )
    c3 = index[index.method.isin(["nf4", "fp4"])]
    c3 = pd.DataFrame(
        {
            "claim": "C3",
            "version": "first",
            "model": c3.model,
            "subject": c3.method,
            "statistic": "S = R(low) - R(high)",
            "estimate": c3["index"],
            "ci_low": c3.index_low,
            "ci_high": c3.index_high,
            "verdict": [sign_verdict(lo, hi) for lo, hi in zip(c3.index_low, c3.index_high)],
            "direction": ["loses more at low T" if e > 0 else "loses less at low T" for e in c3["index"]],
        }
    )
    cols = [c for c in SYNTHESIS_COLUMNS if c != "instrument"]
    return pd.concat([pairs[cols], c3[cols]], ignore_index=True)


#: verdicts that say the cases they combine disagree
SPLIT_VERDICTS = ("depends on the model or method", "depends on the instrument")


def _combined(verdicts: Sequence[str], split: str) -> str:
    """The rule every level of the synthesis uses: the common verdict where all agree; ``split``
    where one holds and another does not (or one is itself split); "holds where resolved" (or
    "does not hold where resolved") where the rest say the same where resolved or are inconclusive."""
    if len(set(verdicts)) == 1:
        return verdicts[0]
    v = {x.removesuffix(" where resolved") for x in verdicts}
    if v & set(SPLIT_VERDICTS) or {"holds", "does not hold"} <= v:
        return split
    return f"{(v - {'inconclusive'}).pop()} where resolved"


def instrument_verdict(verdicts: Sequence[str]) -> str:
    """One instrument's verdict over its models and subjects (:func:`_combined`): the common verdict
    where they agree, "depends on the model or method" where some hold and some do not, and "holds
    where resolved" or "does not hold where resolved" where the others are inconclusive (7 of 8
    against and one inconclusive is not the same as no answer)."""
    return _combined(verdicts, "depends on the model or method")


def instruments_answer(verdicts: Sequence[str]) -> str:
    """The answer over instruments' verdicts (:func:`instrument_verdict`), by the same rule
    (:func:`_combined`), "depends on the instrument" where they disagree."""
    return _combined(verdicts, "depends on the instrument")


def claim_answer(rows: pd.DataFrame) -> str:
    """One claim's answer from its statistics ``rows`` (:data:`SYNTHESIS_COLUMNS`), case by case:
    each (model, subject)'s verdicts over the instruments that test it are combined first
    (:func:`instruments_answer`). Where the instruments disagree on one case, the answer is
    "depends on the instrument"; where they agree on each case but the cases differ, "depends on
    the model or method" (an instrument that covers more models must not pass for a disagreement
    between instruments)."""
    cases = [instruments_answer(list(g.verdict)) for _, g in rows.groupby(["model", "subject"], sort=False)]
    if "depends on the instrument" in cases:
        return "depends on the instrument"
    return _combined(cases, "depends on the model or method")


def synthesis(by_instrument: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(rows, answers)``: every statistic of every instrument in one table (columns
    :data:`SYNTHESIS_COLUMNS`), and one answer per (claim, version): each instrument's verdict
    (:func:`instrument_verdict`) and the answer (:func:`claim_answer`).
    ``statistics`` counts what the answer reads at once (each at 95%: multiplicity)."""
    rows = pd.concat(
        [t.assign(instrument=name)[SYNTHESIS_COLUMNS] for name, t in by_instrument.items() if len(t)],
        ignore_index=True,
    )
    answers = []
    for (claim, version), g in rows.groupby(["claim", "version"], sort=True):
        per = {i: instrument_verdict(list(h.verdict)) for i, h in g.groupby("instrument", sort=False)}
        answer = claim_answer(g)
        answers.append({"claim": claim, "version": version, "answer": answer, "statistics": len(g), **per})
    return rows, pd.DataFrame(answers)


def headline_lines(answers: pd.DataFrame, rows: pd.DataFrame | None = None) -> list[str]:
    """One short plain line per (claim, version) of :func:`synthesis`: what the claim says, the
    answer, and which instruments give which verdict (instruments that do not test it left out).
    With the statistics ``rows`` of :func:`synthesis`, an instrument whose statistics disagree
    says how they split, e.g. "running text (2 of 4 hold, 2 do not hold)"."""
    fixed = {"claim", "version", "answer", "statistics"}
    lines = []
    for a in answers.to_dict("records"):
        by_verdict: dict[str, list[str]] = {}
        for instrument in (c for c in answers.columns if c not in fixed):
            verdict = a[instrument]
            if not isinstance(verdict, str):
                continue
            name = instrument
            if rows is not None:
                g = rows[(rows.claim == a["claim"]) & (rows.version == a["version"]) & (rows.instrument == instrument)]
                if g.verdict.nunique() > 1:
                    name += f" ({count_words(g.verdict)})"
            by_verdict.setdefault(verdict, []).append(name)
        said = "; ".join(f"{verdict}: {', '.join(names)}" for verdict, names in by_verdict.items())
        words = CLAIM_WORDS.get((a["claim"], a["version"]), "")
        lines.append(f"{a['claim']}, {version_words(a['version'])} ({words}): {a['answer']} ({said}).")
    return lines


#: a verdict said of several statistics ("2 of 4 hold")
PLURAL = {"holds": "hold", "does not hold": "do not hold", "inconclusive": "inconclusive"}


def count_words(verdicts: Sequence[str], of: str = "") -> str:
    """How a set of verdicts splits, in words: the verdict itself where all agree, else "2 of 4
    hold, 1 does not hold, 1 inconclusive" (``of`` names what is counted: "2 of 4 models hold")."""
    counts = pd.Series(list(verdicts), dtype=object).value_counts()
    if len(counts) == 1:
        return str(counts.index[0])
    parts = [f"{counts[v]} {v if counts[v] == 1 else PLURAL[v]}" for v in VERDICTS if v in counts]
    return f"{parts[0].replace(' ', f' of {counts.sum()}{of} ', 1)}" + "".join(f", {p}" for p in parts[1:])


def synthesis_lines(answers: pd.DataFrame, rows: pd.DataFrame) -> list[str]:
    """One plain line per (claim, version) of :func:`synthesis`: the answer, then each
    instrument's verdict with how many of its statistics hold or do not hold, in which direction,
    and how many are inconclusive."""
    lines = []
    for a in answers.to_dict("records"):
        said = []
        for instrument, g in rows[(rows.claim == a["claim"]) & (rows.version == a["version"])].groupby(
            "instrument", sort=False
        ):
            parts = [
                f"{k} of {len(g)} {verdict if k == 1 else PLURAL[verdict]}: {direction}"
                for (verdict, direction), k in g[g.verdict != "inconclusive"]
                .groupby(["verdict", "direction"])
                .size()
                .items()
            ]
            if (g.verdict == "inconclusive").any():  # an inconclusive statistic has no direction to report
                parts.append(f"{(g.verdict == 'inconclusive').sum()} of {len(g)} inconclusive")
            said.append(f"{instrument}: {a[instrument]} ({'; '.join(parts)})")
        words = CLAIM_WORDS.get((a["claim"], a["version"]), "")
        lines.append(
            f"{a['claim']} ({version_words(a['version'])}: {words}): {a['answer'].upper()}. " + "; ".join(said) + "."
        )
    return lines


def int8_cost_words(weights: tuple[float, float, float], full: tuple[float, float, float]) -> str:
    """What LLM.int8()'s perplexity cost is made of, in words, from two ``(estimate, low, high)``
    changes in percent: weights alone (simulated weight-only int8) and weights with activations
    (bitsandbytes). Only a change whose 95% interval excludes 0 counts as a cost."""
    w, w_lo, w_hi = weights
    f, f_lo, f_hi = full
    if f_lo <= 0 <= f_hi:
        return f"int8 costs no perplexity this text can resolve (weights and activations {f:+.1f}% [{f_lo:+.1f}, {f_hi:+.1f}])"
    if f < 0:
        return f"int8 lowers perplexity here ({f:+.1f}% [{f_lo:+.1f}, {f_hi:+.1f}])"
    if w_lo <= 0 <= w_hi:
        return f"the weights alone cost nothing resolvable ({w:+.1f}%), so activation quantization is int8's cost ({f:+.1f}%)"
    share = (f - w) / f
    part = "most" if share > 0.5 else "less than half"
    return (
        f"weights alone {w:+.1f}%, weights and activations {f:+.1f}%: activation quantization is {part} of int8's cost"
    )


# --------------------------------------------------------------------------- C4 and C5: speed (notebook 03)
#: Unquantized 16-bit methods: C4 and C5 compare every method with the faster of them.
SIXTEEN_BIT = ("bf16", "fp16")
#: C4 ("int8 inference is much slower") holds when int8 decodes at less than this share of 16-bit speed.
C4_MAX_RATIO = 0.5
#: C5 ("unquantized 16-bit is fastest") is a tie, "inconclusive", when the fastest other method decodes within this
#: fraction of the best 16-bit speed (bounds included): between two runs of notebook 03 on the same 2-core machine,
#: SmolLM2's fastest 4-bit method went from 1.03x to 0.97x fp16, and the verdict with it.
C5_TIE = 0.05
#: C4 is "inconclusive" when int8's ratio lies within this fraction of :data:`C4_MAX_RATIO` (0.475-0.525, bounds
#: included): the same run-to-run spread as :data:`C5_TIE`, which a ratio of medians of 3 runs cannot resolve.
C4_TIE = C5_TIE
_GROUP_KEYS = ("hardware_class", "model", "batch")


def _speed_groups(summary: pd.DataFrame, exclude: Iterable[tuple[str, str]] = ()):
    """``(keys, [(key values, method -> median decode tokens/s, best 16-bit method)])`` for the
    groups of ``summary`` that hold a 16-bit method (the others cannot be judged); the
    ``(model, method)`` pairs in ``exclude`` are left out."""
    exclude = set(exclude)
    if exclude:
        summary = summary[[(m, k) not in exclude for m, k in zip(summary.model, summary.method)]]
    keys = [k for k in _GROUP_KEYS if k in summary.columns]
    out = []
    for values, g in summary.groupby(keys, sort=False):
        speed = g.set_index("method").decode_tokens_per_s.dropna()
        sixteen = speed.reindex([m for m in SIXTEEN_BIT if m in speed.index])
        if not sixteen.empty:
            out.append((dict(zip(keys, values)), speed, sixteen.idxmax()))
    return keys, out


def speed_ratios(summary: pd.DataFrame, exclude: Iterable[tuple[str, str]] = ()) -> pd.DataFrame:
    """Each method's median decode speed over the best unquantized 16-bit method's (``bf16`` or
    ``fp16``) of the same (hardware class,) model and batch, without the ``(model, method)``
    pairs in ``exclude``: columns ``[hardware_class,] model, batch, method, decode_tokens_per_s,
    best_16bit, ratio_to_16bit``."""
    keys, groups = _speed_groups(summary, exclude)
    rows = [
        {**k, "method": m, "decode_tokens_per_s": v, "best_16bit": best, "ratio_to_16bit": v / speed[best]}
        for k, speed, best in groups
        for m, v in speed.items()
    ]
    return pd.DataFrame(rows, columns=[*keys, "method", "decode_tokens_per_s", "best_16bit", "ratio_to_16bit"])


def c4_c5_verdicts(summary: pd.DataFrame, exclude: Iterable[tuple[str, str]] = ()) -> pd.DataFrame:
    """Roy (2023)'s speed claims per (hardware class,) model and batch, from median decode speeds.

    **C4** (int8 inference is much slower) holds if int8 decodes at less than
    :data:`C4_MAX_RATIO` of the best 16-bit method's speed, and is "inconclusive" within
    :data:`C4_TIE` of that threshold; **C5** (unquantized 16-bit is
    fastest) holds if the fastest other method decodes slower than the best 16-bit one, and is
    "inconclusive" within :data:`C5_TIE` of it. Columns ``claim, [hardware_class,] model, batch,
    verdict, ratio, numbers``; ``ratio`` is int8 / best 16-bit (C4) or fastest other method /
    best 16-bit (C5). Groups without bf16 or fp16 get no verdict, groups without int8 no C4, groups
    with 16-bit methods only no C5. The ``(model, method)`` pairs in ``exclude`` (e.g.
    :func:`non_finite_methods`) are neither reference nor competitor.
    """
    keys, groups = _speed_groups(summary, exclude)
    rows = []
    for k, speed, best in groups:
        base = speed[best]
        if "int8" in speed:
            r = speed["int8"] / base
            rows.append(
                {
                    "claim": "C4",
                    **k,
                    "verdict": "inconclusive"
                    if abs(r / C4_MAX_RATIO - 1) <= C4_TIE + 1e-9
                    else ("holds" if r < C4_MAX_RATIO else "does not hold"),
                    "ratio": r,
                    "numbers": f"int8 {speed['int8']:.1f} tok/s = {r:.2f} x best 16-bit ({best} {base:.1f}); "
                    f"slowest: {speed.idxmin()} {speed.min():.1f}",
                }
            )
        others = speed.drop(list(SIXTEEN_BIT), errors="ignore")
        if others.empty:
            continue
        r = others.max() / base
        rows.append(
            {
                "claim": "C5",
                **k,
                "verdict": "inconclusive" if abs(r - 1) <= C5_TIE + 1e-9 else ("holds" if r < 1 else "does not hold"),
                "ratio": r,
                "numbers": f"fastest other than 16-bit: {others.idxmax()} {others.max():.1f} tok/s = {r:.2f} x best "
                f"16-bit ({best} {base:.1f})",
            }
        )
    return pd.DataFrame(rows, columns=["claim", *keys, "verdict", "ratio", "numbers"])


def side_by_side(verdicts: pd.DataFrame, reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """C4 and C5 with one column per hardware class: rows ``(claim, batch, model)``, cells
    ``"holds (0.27)"`` (verdict and ratio). ``reference`` (verdicts of another table, such as
    lit-gpt's A100 one, on another model) adds one last column, filled on the rows of its claim
    and batch."""
    cells = verdicts.assign(cell=verdicts.verdict + " (" + verdicts.ratio.map("{:.2f}".format) + ")")
    wide = cells.pivot_table(
        index=["claim", "batch", "model"], columns="hardware_class", values="cell", aggfunc="first", sort=False
    )
    wide = wide.reindex(columns=list(dict.fromkeys(verdicts.hardware_class))).fillna("")
    wide = wide.sort_index(level=["claim", "batch"], sort_remaining=False)
    wide.columns.name = None
    if reference is not None:
        for r in reference.itertuples():
            col = f"{r.hardware_class} ({r.model}, batch {r.batch})"
            if col not in wide:
                wide[col] = ""
            rows = (wide.index.get_level_values("claim") == r.claim) & (wide.index.get_level_values("batch") == r.batch)
            wide.loc[rows, col] = f"{r.verdict} ({r.ratio:.2f})"
    return wide


# --------------------------------------------------------------------------- larger at lower precision (notebook 06)
#: the verdicts of :func:`equal_memory_verdict`, and the outcome of one equal-memory pair
EQUAL_MEMORY_VERDICTS = ("holds", "does not hold", "inconclusive", "cannot be tested at this scale", "cannot be tested")
OUTCOMES = ("larger better", "smaller better", "not resolved")


def pair_outcome(low: float, high: float) -> str:
    """From the interval of ``bpb(larger) - bpb(smaller)``: ``larger better`` if it lies below 0,
    ``smaller better`` if above, else ``not resolved``."""
    if high < 0:
        return "larger better"
    if low > 0:
        return "smaller better"
    return "not resolved"


def equal_memory_verdict(pairs: pd.DataFrame, n_models: int = 2) -> tuple[str, str]:
    """``(verdict, why)`` from :func:`equal_memory_pairs` rows with ``diff_low``/``diff_high`` (the
    interval of the bits-per-byte difference, larger minus smaller) for the eligible ones.

    Decided on the eligible pairs inside one model family (where size and precision are all that
    differ); pairs across families are confounded by tokenizer and training data and never
    decide. holds: every deciding pair favours the larger model; does not hold: none does and at
    least one favours the smaller; inconclusive: otherwise; cannot be tested (at this scale): one
    model, or no eligible pair inside a family.
    """
    if n_models < 2:
        return "cannot be tested", "only one model"
    if pairs.empty:
        return (
            "cannot be tested at this scale",
            "no pair of a larger model at a lower precision and a smaller one at a higher",
        )
    same = pairs.same_family.astype(bool) if "same_family" in pairs else pd.Series(True, index=pairs.index)
    deciding = pairs[pairs.eligible.astype(bool) & same]
    if deciding.empty:
        pool = pairs[same] if same.any() else pairs
        best = pool.loc[pool.memory_ratio.idxmin()]
        where = "" if same.all() else " inside one model family"
        return (
            "cannot be tested at this scale",
            f"no pair at equal memory{where}: the closest, {best.larger} {best.larger_family} vs {best.smaller} "
            f"{best.smaller_family}, needs {best.memory_ratio:.2f}x the bits ({best.larger_bits / 1e6:.0f} vs "
            f"{best.smaller_bits / 1e6:.0f} Mbit)",
        )
    outcomes = [pair_outcome(lo, hi) for lo, hi in zip(deciding.diff_low, deciding.diff_high)]
    n, k_large, k_small = len(outcomes), outcomes.count("larger better"), outcomes.count("smaller better")
    verdict = "holds" if k_large == n else "does not hold" if k_large == 0 and k_small > 0 else "inconclusive"
    within = "" if same.all() else " inside one model family"
    why = (
        f"{k_large} of {n} equal-memory pairs{within} (one per precision family) favour the larger model, {k_small} "
        f"the smaller, {n - k_large - k_small} not resolved by the 95% paired interval"
    )
    if len(deciding[["smaller", "smaller_family"]].drop_duplicates()) == 1:  # the scope: which smaller model, how held
        every = "every one " if n > 1 else ""
        why += f"; {every}against {deciding.smaller.iloc[0]} at {deciding.smaller_family.iloc[0]}"
    elif deciding.smaller_family.nunique() == 1:
        why += f"; the smaller model is at {deciding.smaller_family.iloc[0]} in every one"
    return verdict, why


def combined_verdict(verdicts: dict[str, str]) -> str:
    """One verdict over analysis choices (e.g. memory conventions): the verdict they share where
    every testable choice agrees (naming the choices where only some can test it), ``depends on ...``
    where they differ, ``cannot be tested`` where none can test it."""
    testable = {k: v for k, v in verdicts.items() if not v.startswith("cannot be tested")}
    if not testable:
        return "cannot be tested at this scale"
    if len(set(testable.values())) == 1:
        verdict = next(iter(testable.values()))
        return verdict if len(testable) == len(verdicts) else f"{verdict} ({' and '.join(testable)} only)"
    return "depends on the memory convention (" + "; ".join(f"{k}: {v}" for k, v in testable.items()) + ")"
