"""Effective temperature: how much of a method's change is a temperature shift, and the controls
that show whether an instrument can tell.

A quantized model can make its next-token distributions flatter or sharper than the reference's;
it then behaves partly like the reference at another temperature. There is more than one
reasonable way to say *which* temperature, so three definitions are computed side by side:

* ``kl_method_ref``: the ``tau`` that minimises ``KL(method at T = 1 || reference at tau)``, the
  reference temperature that imitates the method;
* ``kl_ref_method``: ``1 / s``, where ``s`` minimises ``KL(reference at 1 || method at s)``, the
  temperature that brings the method back to the reference, read on the reference's scale;
* ``logloss``: the reference's log-loss-optimal temperature on the text divided by the method's.

A pure temperature change (logits divided by ``c``) gives ``c`` under all three. Quantization is
mostly not one: the share of the method's KL that the best temperature removes says how much of
it is. Two controls run through the same code as the methods: the reference's logits divided by
a known ``c``, and the reference's logits plus i.i.d. Gaussian noise whose KL to the reference
matches a quantized method's (no temperature change by construction).

Every fit is the minimum of a sum over positions. The per-position terms are tabulated once on a
grid of temperatures (:func:`position_curves`) and summed per block of text, so a bootstrap over
blocks refits every definition in every replicate at almost no cost (:func:`fit_intervals`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from . import measures, stats

#: temperatures on which the per-position curves are tabulated (geometric; 1.0 is a grid point)
GRID: tuple[float, ...] = tuple(float(math.exp(x)) for x in np.linspace(math.log(0.4), math.log(2.5), 49))
#: the three definitions of the effective temperature, and how to say each in words
DEFINITIONS = {
    "kl_method_ref": "τ minimising KL(method at T=1 ‖ reference at τ)",
    "kl_ref_method": "1/s, s minimising KL(reference at T=1 ‖ method at s)",
    "logloss": "reference's log-loss-optimal T / the method's",
}
#: short names of the definitions, for figure titles and legends
DEFINITION_SHORT = {
    "kl_method_ref": "KL(method ‖ fp32 at τ)",
    "kl_ref_method": "KL(fp32 ‖ method at 1/τ)",
    "logloss": "ratio of log-loss-optimal T",
}
#: the definitions in plain words, for a figure's legend
DEFINITION_PLAIN = {
    "kl_method_ref": "the T at which fp32 is closest to the method, KL(method ‖ fp32 at τ)",
    "kl_ref_method": "the same closeness measured the other way, KL(fp32 ‖ method at 1/τ)",
    "logloss": "the T at which fp32 predicts the text best / the T at which the method does",
}
#: the controls a running-text study runs beside the methods (computed from the reference's logits)
CONTROLS = {
    "ctrl-temp": "fp32 logits / c: a pure temperature change",
    "ctrl-noise": "fp32 logits + i.i.d. Gaussian noise, KL matched to a quantized method: no temperature change",
}
#: per-position curves, in this order along axis 1 of :func:`position_curves`
CURVES = ("kl_mr", "kl_rm", "ll_ref", "ll_m")


def _one(grid: Sequence[float]) -> int:
    i = int(np.argmin(np.abs(np.log(grid))))
    if not math.isclose(grid[i], 1.0, rel_tol=1e-9):
        raise ValueError("the temperature grid must contain 1.0")
    return i


def _log_normalizers(z2: torch.Tensor, temperatures: Sequence[float], buffer: torch.Tensor) -> list[float]:
    """``log sum_j exp(z_j / t)`` for each ``t``, from one row ``z2 = (z - max z) * log2(e)`` (the
    layout of :func:`helpers.measures._dense_row`: ``exp2`` of pre-scaled logits, one buffer)."""
    return [math.log(float(torch.mul(z2, 1.0 / t, out=buffer).exp2_().sum())) for t in temperatures]


def position_curves(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, grid: Sequence[float] = GRID) -> np.ndarray:
    """``[N, 4, G]`` float64: for reference logits ``a`` and method logits ``b`` (``[N, V]``) and
    true next tokens ``y`` (``[N]``), at every grid temperature ``g``

    * ``kl_mr``: ``KL(softmax(b) || softmax(a / g))``,
    * ``kl_rm``: ``KL(softmax(a) || softmax(b / g))``,
    * ``ll_ref`` / ``ll_m``: ``-log softmax(a / g)[y]`` and ``-log softmax(b / g)[y]``.

    Each is ``(linear in 1/g) + log-normalizer at g``, so one pass of exponentials per row, logits
    and grid point is all it costs; the rest are expectations at T = 1. Rows run on
    :func:`helpers.measures.on_row_threads`."""
    g = np.asarray(grid, dtype=np.float64)
    one = _one(grid)
    out = np.empty((len(a), 4, len(g)))
    a, b = measures._finite(a), measures._finite(b)

    def work(i: int) -> None:
        a2 = torch.sub(a[i], a[i].max()).mul_(measures.LOG2E)
        b2 = torch.sub(b[i], b[i].max()).mul_(measures.LOG2E)
        buffer = torch.empty_like(a2)
        lza = np.array(_log_normalizers(a2, grid, buffer))
        lzb = np.array(_log_normalizers(b2, grid, buffer))
        ea = torch.exp2(a2).div_(float(math.exp(lza[one])))  # p = softmax(a)
        eb = torch.exp2(b2).div_(float(math.exp(lzb[one])))  # q = softmax(b)
        p_a, p_b = (float(torch.dot(ea, z)) / measures.LOG2E for z in (a2, b2))  # E_p[a], E_p[b] (shifted)
        q_a, q_b = (float(torch.dot(eb, z)) / measures.LOG2E for z in (a2, b2))
        a_y, b_y = float(a2[int(y[i])]) / measures.LOG2E, float(b2[int(y[i])]) / measures.LOG2E
        out[i, 0] = (q_b - lzb[one]) - (q_a / g - lza)
        out[i, 1] = (p_a - lza[one]) - (p_b / g - lzb)
        out[i, 2] = lza - a_y / g
        out[i, 3] = lzb - b_y / g

    measures.on_row_threads(work, len(a))
    return out


def grid_minimum(values: np.ndarray, grid: Sequence[float] = GRID) -> tuple[float, float]:
    """``(T, value)`` at the minimum of a curve tabulated on ``grid``: a polynomial in ``log T``
    through the lowest grid point and two neighbours on each side (quartic; one each side, a
    parabola, next to an end), minimised between the lowest point's neighbours. ``(nan, nan)``
    when the lowest point is an end of the grid (the minimum may lie outside it)."""
    v = np.asarray(values, dtype=np.float64)
    i = int(np.argmin(v))
    if i == 0 or i == len(v) - 1 or not np.isfinite(v[i]):
        return math.nan, math.nan
    r = 2 if 2 <= i <= len(v) - 3 else 1
    x = np.log(np.asarray(grid[i - r : i + r + 1])) - math.log(grid[i])
    poly = np.polynomial.Polynomial.fit(x, v[i - r : i + r + 1], 2 * r, domain=[-1, 1], window=[-1, 1])
    candidates = [0.0, *(z.real for z in poly.deriv().roots() if abs(z.imag) < 1e-12 and x[r - 1] < z.real < x[r + 1])]
    best = min(candidates, key=poly)
    return float(grid[i] * math.exp(best)), float(poly(best))


def fit(summed: np.ndarray, grid: Sequence[float] = GRID) -> dict[str, float]:
    """Every definition's effective temperature from curves summed over positions (``[4, G]``),
    the two best temperatures, and the share of each KL that the best temperature removes."""
    one = _one(grid)
    kl_mr, kl_rm, ll_ref, ll_m = (np.asarray(summed[i]) for i in range(4))
    tau_mr, min_mr = grid_minimum(kl_mr, grid)
    s_rm, min_rm = grid_minimum(kl_rm, grid)
    ref_best, _ = grid_minimum(ll_ref, grid)
    best, _ = grid_minimum(ll_m, grid)
    min_mr, min_rm = max(min_mr, 0.0), max(min_rm, 0.0)  # a KL; the interpolation can dip below 0
    return {
        "kl_method_ref": tau_mr,
        "kl_ref_method": 1 / s_rm,
        "logloss": ref_best / best,
        "best_T": best,
        "ref_best_T": ref_best,
        "removed_kl_method_ref": 1 - min_mr / kl_mr[one],
        "removed_kl_ref_method": 1 - min_rm / kl_rm[one],
    }


def fit_intervals(
    block_curves: np.ndarray, grid: Sequence[float] = GRID, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """One row per fitted quantity (:func:`fit`): estimate and bootstrap interval over blocks,
    every definition refitted in every replicate. ``block_curves``: ``[B, 4, G]`` sums per block."""
    names = list(fit(block_curves.sum(0), grid))
    est, low, high = stats.resampled_sums_ci(
        block_curves, lambda s: np.array(list(fit(s, grid).values())), n_boot, level, seed
    )
    return pd.DataFrame({"quantity": names, "estimate": est, "ci_low": low, "ci_high": high})


def unit_intervals(curves: pd.DataFrame, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """:func:`fit_intervals` per (model, method) of the per-block curves that
    :meth:`helpers.textscore.TextStudy.collect` returns (one row per block and grid point)."""
    grid = sorted(curves.temperature.unique())
    out = []
    for (model, method), g in curves.groupby(["model", "method"], sort=False):
        wide = g.pivot_table(index=["doc", "window", "block"], columns="temperature", values=list(CURVES))
        parts = np.stack([wide[c][grid].to_numpy() for c in CURVES], 1)  # [blocks, 4, G]
        out.append(fit_intervals(parts, grid, n_boot, level, seed).assign(model=model, method=method))
    return pd.concat(out, ignore_index=True)


def shift_words(removed: float) -> str:
    """How much of a change is a temperature shift, in words, from the share of its KL that the
    best temperature removes (a pure temperature change: 1; i.i.d. noise: near 0)."""
    if removed >= 0.8:
        return "mostly a temperature shift"
    if removed >= 0.3:
        return "partly a temperature shift"
    return "mostly not a temperature shift"


def summary_lines(
    intervals: pd.DataFrame, reference: str = "fp32", control_temperature: float | None = None
) -> list[str]:
    """One line per (model, method or control) of :func:`unit_intervals`'s table: the three
    effective temperatures with intervals, the share of KL the best one removes, and what that
    says; for ``ctrl-temp`` whether every definition returned ``control_temperature``."""
    lines = []
    for (model, method), g in intervals.groupby(["model", "method"], sort=False):
        e = g.set_index("quantity")
        taus = " / ".join(f"{e.estimate[d]:.3f} [{e.ci_low[d]:.3f}, {e.ci_high[d]:.3f}]" for d in DEFINITIONS)
        removed = e.estimate["removed_kl_method_ref"]
        line = (
            f"{model} {method}: tau {taus} (KL(method||{reference}) / KL({reference}||method) / log-loss); "
            f"spread {np.ptp(e.estimate[list(DEFINITIONS)]):.3f}; the best tau removes {removed:.0%} of its KL "
            f"({shift_words(removed)})"
        )
        if method == "ctrl-temp" and control_temperature is not None:
            ok = all(math.isclose(e.estimate[d], control_temperature, rel_tol=0.01) for d in DEFINITIONS)
            line += (
                f"; {'every definition returns' if ok else 'NOT every definition returns'} c = {control_temperature}"
            )
        lines.append(line)
    return lines


# --------------------------------------------------------------------------- the two controls
def scaled(ref: torch.Tensor, c: float) -> torch.Tensor:
    """The temperature control: the reference's logits divided by ``c`` (its effective
    temperature is ``c`` under every definition)."""
    if not c > 0:
        raise ValueError(f"the control temperature must be positive, got {c}")
    return ref / c


def noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """i.i.d. standard normal values, reproducible from ``seed`` alone (CPU generator)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def mean_kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over rows of ``KL(softmax(ref) || softmax(other))`` (nats)."""
    logp, logq = torch.log_softmax(ref.float(), -1), torch.log_softmax(other.float(), -1)
    return float((logp.exp() * (logp - logq)).sum(-1).double().mean())


def noise_scale(ref: torch.Tensor, eps: torch.Tensor, target_kl: float, rel_tol: float = 1e-4) -> float:
    """The ``sigma`` at which ``ref + sigma * eps`` has mean KL ``target_kl`` from ``ref``.

    Along a fixed direction ``eps`` the KL is convex in ``sigma`` and 0 at 0, so it grows with
    ``sigma``: bisection."""
    if not target_kl > 0:
        raise ValueError(f"the target KL must be positive, got {target_kl}")
    lo, hi = 0.0, 1.0
    while mean_kl(ref, ref + hi * eps) < target_kl:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ValueError(f"no noise scale reaches KL {target_kl}")
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_kl(ref, ref + mid * eps) < target_kl else (lo, mid)
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------- matched temperature
def reference_at(ref: torch.Tensor, targets: torch.Tensor, temperatures: Sequence[float]) -> np.ndarray:
    """``[N, len(temperatures)]`` log-loss ``-log softmax(ref / t)[y]`` of the reference at each
    temperature (what the matched view compares a method with)."""
    t = np.asarray(temperatures, dtype=np.float64)
    out = np.empty((len(ref), len(t)))
    ref = measures._finite(ref)

    def work(i: int) -> None:
        a2 = torch.sub(ref[i], ref[i].max()).mul_(measures.LOG2E)
        out[i] = (
            np.array(_log_normalizers(a2, temperatures, torch.empty_like(a2)))
            - float(a2[int(targets[i])]) / measures.LOG2E / t
        )

    measures.on_row_threads(work, len(ref))
    return out


def robust_matched_verdict(
    by_definition: Sequence[str], noise_by_definition: Sequence[str] = (), directions: Sequence[str] = ()
) -> str:
    """One matched-temperature verdict from a claim's verdicts under every definition.

    ``holds`` only where it holds under every definition, in the same direction (``directions``,
    one per definition, when given), and the noise control (same claim, same definitions, in the
    same order) gives ``holds`` under none of them: an instrument that finds the effect in pure
    noise cannot show it in a method (``also found in noise``). Definitions that disagree give
    ``depends on the definition``, said with the noise control's reading where it also holds
    wherever the method does."""
    verdicts = list(by_definition)
    if not verdicts:
        raise ValueError("no verdicts to combine")
    noise = list(noise_by_definition)
    holds = [i for i, v in enumerate(verdicts) if v == "holds"]
    noise_too = bool(holds) and len(noise) == len(verdicts) and all(noise[i] == "holds" for i in holds)
    if len(set(verdicts)) > 1:
        return "depends on the definition" + ("; where it holds, so does the noise control" if noise_too else "")
    if holds and "holds" in noise:
        return "also found in noise"
    if holds and len(set(directions)) > 1:
        return "holds, but its direction depends on the definition"
    return verdicts[0]
