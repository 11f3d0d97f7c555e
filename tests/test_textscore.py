"""Running-text measures against float64 brute force, the effective temperature, the C2/C3 verdicts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import analysis, efftemp, textscore


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


def test_matched_rows_are_the_reference_at_the_other_halfs_tau():
    """Cross-fitting: a block of half h is compared with the reference at the tau fitted on the
    other half (taus[h]); the sums equal block_sums' reference columns at that temperature."""
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(9, 40, generator=g) * 3
    window = textscore.Window("d", 0, torch.randint(0, 40, (10,), generator=g).tolist())
    halves = pd.Series({("d", 0, b): b % 2 for b in range(3)})
    taus = {0: {"x": 1.1}, 1: {"x": 0.9}}
    got = textscore._matched_rows([window], [ref], halves, taus, [0.5, 1.0], block=4).set_index(
        ["temperature", "block"]
    )
    assert set(got.view) == {"matched:x"} and len(got) == 6
    for b in range(3):
        for T in (0.5, 1.0):
            t = taus[b % 2]["x"] * T
            want = textscore.block_sums(ref, ref, window.ids[1:], [t], [0], 4).set_index("block").loc[b]
            have = got.loc[(T, b)]
            assert have.ref_temperature == pytest.approx(t) and have.n == want.n
            assert have.ref_p_true == pytest.approx(want.ref_p_true, rel=1e-5)
            assert have.ref_logloss == pytest.approx(want.ref_logloss, rel=1e-5)


def test_curve_rows_sum_positions_per_block():
    per_position = np.arange(3 * 4 * len(efftemp.GRID), dtype=float).reshape(3, 4, -1)
    rows = textscore._curve_rows(per_position, [0, 0, 1]).set_index(["block", "temperature"])
    assert rows.loc[(0, efftemp.GRID[5])].n == 2 and rows.loc[(1, efftemp.GRID[5])].n == 1
    assert rows.loc[(0, efftemp.GRID[5]), "kl_rm"] == per_position[0, 1, 5] + per_position[1, 1, 5]
    np.testing.assert_allclose(textscore._curve_sums(rows.reset_index()), per_position.sum(0))


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
    matched = matched.assign(view="matched:x")
    view = analysis.matched_view(pd.concat([nominal, matched]), "matched:x")
    assert (view.view == "matched:x").all() and len(view) == len(nominal)
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


def test_matched_robustness_needs_every_definition_and_a_clean_noise_control():
    rows = []
    for view, nf4, fp4, noise in (
        ("nominal", "holds", "holds", "holds"),
        ("matched:a", "holds", "holds", "does not hold"),
        ("matched:b", "holds", "does not hold", "does not hold"),
    ):
        for subject, verdict in (("nf4", nf4), ("fp4", fp4), ("ctrl-noise", noise)):
            rows.append(
                {
                    "model": "m",
                    "view": view,
                    "claim": "C3",
                    "version": "first",
                    "subject": subject,
                    "verdict": verdict,
                    "estimate": 0.1,
                    "direction": "loses more at low T",
                }
            )
    got = analysis.matched_robustness(pd.DataFrame(rows)).set_index("subject")
    assert list(got.index) == ["nf4", "fp4"]  # controls are not subjects of their own
    assert got.loc["nf4", "matched"] == "holds" and got.loc["nf4", "nominal"] == "holds (+0.100)"
    assert got.loc["nf4", "ctrl-noise matched:b"] == "does not hold"
    assert got.loc["fp4", "matched"] == "depends on the definition"
    noisy = pd.DataFrame(rows).assign(verdict=lambda d: d.verdict.where(d.subject != "ctrl-noise", "holds"))
    assert analysis.matched_robustness(noisy).set_index("subject").loc["nf4", "matched"] == "also found in noise"
    flipped = pd.DataFrame(rows).assign(
        direction=lambda d: d.direction.where(d.view != "matched:b", "loses less at low T")
    )
    assert analysis.matched_robustness(flipped).set_index("subject").loc["nf4", "matched"] == (
        "holds, but its direction depends on the definition"
    )


def test_plain_summary_says_a_shared_verdict_once():
    nominal = pd.DataFrame(
        [
            {
                "model": m,
                "claim": "C3",
                "version": "first",
                "subject": "nf4",
                "verdict": "holds",
                "direction": "loses more at low T",
            }
            for m in ("a", "b")
        ]
    )
    robustness = nominal.assign(matched="depends on the definition")
    (line,) = analysis.plain_summary(nominal, robustness)
    assert line.startswith("C3 (first version: 4-bit loses more against fp32 at low T than at high T), nf4: holds on a")
    assert line.endswith("With the temperature shift removed: depends on the definition on every model.")


def test_every_nth_row_equals_the_rows_of_the_stacked_parts():
    parts = [torch.arange(n * 2.0).reshape(n, 2) + 100 * i for i, n in enumerate((5, 3, 7, 1))]
    for step in (1, 2, 3, 4, 9):
        for limit in (2, 100):
            want = torch.cat(parts)[::step][:limit]
            assert torch.equal(textscore._every_nth_row(parts, step, limit), want), (step, limit)
