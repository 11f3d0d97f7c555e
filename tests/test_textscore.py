"""Running-text measures against float64 brute force, the effective temperature, the C2/C3 verdicts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import analysis, textscore


def _brute(ref: torch.Tensor, x: torch.Tensor, y: int, T: float, k: int) -> dict[str, float]:
    """Every measure of one position in float64, straight from the definitions."""
    a, b = ref.double(), x.double()
    if T == 0:
        hit = float(b.argmax() == y)
        return {"p_true": hit, "ref_p_true": float(a.argmax() == y), "tv": float(a.argmax() != b.argmax())}

    def dist(z):
        if k:
            keep = torch.zeros_like(z, dtype=torch.bool)
            keep[z.topk(k).indices] = True
            z = torch.where(keep, z, torch.tensor(-math.inf, dtype=z.dtype))
        return torch.log_softmax(z / T, -1)

    lp, lq = dist(a), dist(b)
    p, q = lp.exp(), lq.exp()
    kl = float(torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum())
    return {
        "p_true": float(q[y]),
        "logloss": float(-lq[y]),
        "ref_p_true": float(p[y]),
        "ref_logloss": float(-lp[y]),
        "entropy": float(-torch.where(q > 0, q * lq, torch.zeros_like(q)).sum()),
        "kl": kl,
        "tv": 0.5 * float((p - q).abs().sum()),
    }


def test_block_sums_equal_float64_brute_force():
    g = torch.Generator().manual_seed(0)
    N, V, block = 10, 60, 4
    ref = torch.randn(N, V, generator=g) * 3
    x = ref + 0.3 * torch.randn(N, V, generator=g)
    y = torch.randint(0, V, (N,), generator=g).tolist()
    temps, ks = [0.0, 0.3, 1.0, 1.7], [0, 5]
    got = textscore.block_sums(ref, x, y, temps, ks, block).set_index(["temperature", "top_k", "block"])
    for T in temps:
        for k in ks:
            for b in range(math.ceil(N / block)):
                rows = range(b * block, min(N, (b + 1) * block))
                want = pd.DataFrame([_brute(ref[i], x[i], y[i], T, k) for i in rows]).sum()
                have = got.loc[(T, k, b)]
                assert have.n == len(rows)
                for name, value in want.items():
                    assert have[name] == pytest.approx(value, rel=1e-4, abs=1e-6), (T, k, b, name)


def test_log_loss_is_exact_where_the_probability_underflows():
    ref = torch.tensor([[20.0, 0.0, -5.0]])
    got = textscore.block_sums(ref, ref, [2], [0.05], [0], 1).iloc[0]
    assert got.p_true == pytest.approx(math.exp(-500), rel=1e-4)  # below float32's range, kept in float64
    assert got.logloss == pytest.approx(500.0, rel=1e-5)  # computed in log space


def test_effective_temperature_recovers_a_known_scale():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200, 1000, generator=g) * 4
    b = a / 1.3  # the method is the reference at T = 1.3
    tau = textscore.matching_temperature(a, textscore.expected_under(a, b))
    assert tau == pytest.approx(1.3, rel=0.02)
    assert tau == pytest.approx(1.3, rel=1e-4)  # exact up to the solver's tolerance


def test_best_temperature_minimises_the_log_loss():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(300, 50, generator=g) * 2
    y = torch.multinomial(torch.softmax(a / 1.6, -1), 1, generator=g)  # text drawn at T = 1.6
    best = textscore.matching_temperature(a, a.gather(1, y).squeeze(1))

    def nll(T):
        return float(-torch.log_softmax(a.double() / T, -1).gather(1, y).sum())

    grid = np.linspace(0.5, 4, 701)
    assert best == pytest.approx(grid[np.argmin([nll(T) for T in grid])], abs=0.01)
    with pytest.raises(ValueError, match="outside"):
        textscore.matching_temperature(a, a.amax(-1) + 1)  # above every reachable expectation


def test_text_windows_cover_every_token_once():
    class Tok:
        bos_token_id = 0

        def __call__(self, text):
            return {"input_ids": [0] + [len(w) for w in text.split()]}

    docs = {"a": "x " * 25, "b": "yy " * 7}
    windows = textscore.text_windows(Tok(), docs, 10)
    assert [(w.doc, w.index) for w in windows] == [("a", 0), ("a", 1), ("a", 2), ("b", 0)]
    assert all(w.ids[0] == 0 and len(w.ids) <= 10 for w in windows)
    assert sum(len(w.ids) - 1 for w in windows) == 25 + 7  # every token scored once, BOS never


def _blocks(loss_by_method: dict[str, tuple[float, float]], n_blocks: int = 5) -> pd.DataFrame:
    """Block sums where each method's accuracy is (1 - R) x the reference's at T = 0.5 and 1.0."""
    rows = []
    for method, (r_low, r_high) in loss_by_method.items():
        for T, r in ((0.5, r_low), (1.0, r_high)):
            for b in range(n_blocks):
                ref = 10.0 + b  # blocks differ; the ratio does not
                rows.append(
                    {
                        "model": "m",
                        "method": method,
                        "view": "nominal",
                        "temperature": T,
                        "top_k": 0,
                        "doc": "d",
                        "window": 0,
                        "block": b,
                        "n": 20,
                        "p_true": (1 - r) * ref,
                        "ref_p_true": ref,
                    }
                )
    return pd.DataFrame(rows)


def test_temperature_claims_by_hand():
    blocks = _blocks({"nf4": (0.2, 0.1), "fp4": (0.1, 0.3)})
    got = analysis.temperature_claims(blocks, low=(0.5, 0.5), high=(1.0, 1.0), mid=(0.5, 0.5), n_boot=200)
    got = got.set_index(["claim", "version", "subject"])
    assert got.loc[("C3", "first", "nf4")].estimate == pytest.approx(0.1)
    assert got.loc[("C3", "first", "nf4")].verdict == "holds"
    assert got.loc[("C3", "first", "fp4")].estimate == pytest.approx(-0.2)
    assert got.loc[("C3", "first", "fp4")].verdict == "does not hold"
    c2 = got.loc[("C2", "first", "nf4 vs fp4")]
    assert c2.estimate == pytest.approx((0.1 - 0.2) - (0.3 - 0.1)) and c2.verdict == "holds"
    assert c2.direction == "fp4 falls behind nf4 more at high T"
    later = got.loc[("C2", "later", "nf4 vs fp4")]
    assert later.estimate == pytest.approx(-0.1) and later.direction == "fp4 more resilient at low T"
    assert later.verdict == "does not hold"
    assert got.loc[("C3", "later", "nf4")].estimate == pytest.approx(0.1)


def test_double_quantized_twins_are_replicates_not_evidence():
    blocks = _blocks({"nf4": (0.2, 0.1), "nf4-dq": (0.3, 0.1)})
    got = analysis.temperature_claims(blocks, low=(0.5, 0.5), high=(1.0, 1.0), mid=(0.5, 0.5), n_boot=50)
    assert list(got.subject) == ["nf4", "nf4"]  # one family, no separate nf4-dq verdict
    assert got.iloc[0].estimate == pytest.approx(0.25 - 0.1)  # accuracy averaged over the twins


def test_matched_view_swaps_in_the_reference_at_the_effective_temperature():
    nominal = _blocks({"nf4": (0.2, 0.1)}).assign(ref_logloss=1.0, ref_temperature=np.nan)
    matched = nominal[nominal.temperature > 0].assign(
        view="matched", ref_p_true=lambda d: d.p_true, ref_temperature=lambda d: 1.2 * d.temperature
    )
    view = analysis.matched_view(pd.concat([nominal, matched]))
    assert (view.view == "matched").all() and len(view) == len(nominal)
    assert np.allclose(view.p_true, view.ref_p_true)  # a pure temperature shift: no loss left
    assert sorted(view.ref_temperature.unique()) == pytest.approx([0.6, 1.2])


def test_loss_curve_and_bonferroni():
    blocks = _blocks({"nf4": (0.2, 0.1)})
    curve = analysis.loss_curve(blocks, n_boot=50).set_index("temperature")
    assert curve.loc[0.5, "R"] == pytest.approx(0.2) and curve.loc[1.0, "R"] == pytest.approx(0.1)
    assert curve.loc[0.5, "Q_ref"] == pytest.approx(sum(10.0 + b for b in range(5)) / 100)
    assert analysis.bonferroni_level(10) == pytest.approx(0.995)
    with pytest.raises(ValueError):
        analysis.bonferroni_level(0)


def test_paired_differences_match_slots_and_average_per_prompt():
    rows = []
    for method, shift in (("fp32", 0.0), ("nf4", 0.5)):
        for prompt, base in (("a", 1.0), ("b", 3.0)):
            for sample in (0, 1):
                rows.append(
                    {
                        "model": "m",
                        "method": method,
                        "temperature": 1.0,
                        "top_k": 0,
                        "max_new_tokens": 8,
                        "prompt_id": prompt,
                        "sample": sample,
                        "ref_nll": base + sample + shift,
                    }
                )
    diff = analysis.paired_differences(pd.DataFrame(rows), "ref_nll")
    assert set(diff.method) == {"nf4"} and np.allclose(diff["diff"], 0.5)
    ci = analysis.mean_ci_by(diff, ["method"], "diff", n_boot=50)
    assert ci["mean"].iloc[0] == pytest.approx(0.5) and ci.low.iloc[0] == pytest.approx(0.5)
    assert ci.prompts.iloc[0] == 2
