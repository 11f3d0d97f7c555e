"""Paired bootstrap comparisons and verdicts (helpers.analysis) on hand-computed cases."""

import numpy as np
import pandas as pd
import pytest

from helpers import analysis, stats


def test_bootstrap_of_column_means_matches_the_plain_estimate_and_covers_it():
    x = np.array([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0], [7.0, 2.0]])
    est, lo, hi = stats.bootstrap_ci_of(x, lambda m: m[..., 0] / m[..., 1], n_boot=2000)
    assert est == pytest.approx(2.0)  # mean 4 / mean 2
    assert 0.5 <= lo < est < hi <= 3.5  # resampled means of column 0 lie in [1, 7]
    # identical rows: no spread at all
    est, lo, hi = stats.bootstrap_ci_of(np.ones((5, 2)), lambda m: m[..., 0] - m[..., 1])
    assert (est, lo, hi) == (0.0, 0.0, 0.0)


def test_pairing_shrinks_the_interval_of_a_difference():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 10, 200)  # large spread between prompts
    x = np.stack([base + 1.0 + rng.normal(0, 0.1, 200), base], axis=1)
    est, lo, hi = stats.bootstrap_ci_of(x, lambda m: m[..., 0] - m[..., 1])
    assert est == pytest.approx(1.0, abs=0.05) and lo > 0.9 and hi < 1.1


@pytest.mark.parametrize("bad", [np.ones(3), np.ones((0, 2))])
def test_bootstrap_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match="2-D"):
        stats.bootstrap_ci_of(bad, lambda m: m[..., 0])


def _rows(q_low, q_high, ref_low=0.8, ref_high=0.4, prompts=4):
    rows = []
    for p in range(prompts):
        for T, q, r in ((0.2, q_low, ref_low), (0.4, q_low, ref_low), (1.5, q_high, ref_high)):
            rows.append({"prompt_id": f"p{p}", "temperature": T, "p_answer": q, "ref_p_answer": r})
    return pd.DataFrame(rows)


def test_sensitivity_index_by_hand():
    # low band: 0.6 vs 0.8 -> R = 0.25; high band: 0.36 vs 0.4 -> R = 0.1; index 0.15
    res = analysis.sensitivity_index(_rows(0.6, 0.36), low=[0.0, 0.5], high=[1.0, 2.0])
    assert res["R_low_band"] == pytest.approx(0.25) and res["R_high_band"] == pytest.approx(0.1)
    assert res["index"] == pytest.approx(0.15) and res["prompts"] == 4
    # same relative loss everywhere: index 0 although the absolute loss is 4x larger at low T
    res = analysis.sensitivity_index(_rows(0.6, 0.3), low=[0.0, 0.5], high=[1.0, 2.0])
    assert res["index"] == pytest.approx(0.0, abs=1e-12)


def test_band_means_rejects_empty_and_reversed_bands():
    df = _rows(0.5, 0.5)
    with pytest.raises(ValueError, match="no rows"):
        analysis.band_means(df, "p_answer", [0.6, 0.9])
    with pytest.raises(ValueError, match="low, high"):
        analysis.band_means(df, "p_answer", [1.0, 0.5])


def test_verdicts():
    assert analysis.sign_verdict(0.01, 0.2) == "holds"
    assert analysis.sign_verdict(-0.2, -0.01) == "does not hold"
    assert analysis.sign_verdict(-0.1, 0.1) == "inconclusive"
    assert analysis.sign_verdict(2e-6, 3e-5) == "does not hold"  # inside +-NEGLIGIBLE: no effect, only rounding
    assert analysis.differs_verdict(2e-6, 3e-5, margin=0.01) == "does not hold"
    assert analysis.equivalence_verdict(-0.01, 0.02, margin=0.05) == "holds"
    assert analysis.equivalence_verdict(0.06, 0.2, margin=0.05) == "does not hold"
    assert analysis.equivalence_verdict(0.01, 0.2, margin=0.05) == "inconclusive"
    assert analysis.combine_verdicts(["holds", "holds"]) == "holds"
    assert analysis.combine_verdicts(["holds", "does not hold"]) == "inconclusive"
    assert analysis.combine_verdicts(["inconclusive", "does not hold"]) == "does not hold"
    with pytest.raises(ValueError):
        analysis.combine_verdicts(["maybe"])


def test_mean_ci_by_averages_samples_of_a_prompt_first():
    df = pd.DataFrame(
        {
            "method": ["a"] * 4 + ["b"] * 2 + ["c"],
            "prompt_id": ["p0", "p0", "p0", "p1", "p0", "p1", "p0"],
            "v": [1.0, 2.0, 3.0, 10.0, 5.0, 5.0, np.nan],
        }
    )
    t = analysis.mean_ci_by(df, ["method"], "v", n_boot=200).set_index("method")
    assert t.loc["a", "mean"] == pytest.approx((2.0 + 10.0) / 2)  # p0's three samples count once
    assert t.loc["a", "prompts"] == 2 and t.loc["a", "low"] >= 2.0 and t.loc["a", "high"] <= 10.0
    assert (t.loc["b", ["mean", "low", "high"]] == 5.0).all()
    assert "c" not in t.index  # no value at all: left out


def _cloze(fp4_low_factor: float) -> pd.DataFrame:
    """4 prompts at T = 0.2 and 1.0; fp32 and nf4 put r on the answer, fp4 r * factor at T = 0.2 and r at 1.0."""
    rows = []
    for i, r in enumerate([0.2, 0.4, 0.6, 0.8]):
        for T in (0.2, 1.0):
            for method, p in (("fp32", r), ("nf4", r), ("fp4", r * fp4_low_factor if T == 0.2 else r)):
                rows.append(
                    {
                        "model": "m",
                        "method": method,
                        "prompt_id": f"c{i}",
                        "temperature": T,
                        "p_answer": p,
                        "ref_p_answer": r,
                    }
                )
    return pd.DataFrame(rows)


def test_cloze_claims_by_hand():
    index = pd.DataFrame(
        {
            "model": "m",
            "method": ["int8", "nf4", "fp4"],
            "index": [0.0, 0.1, 0.2],
            "index_low": [-0.1, 0.05, 0.1],
            "index_high": [0.1, 0.15, 0.3],
        }
    )
    same = analysis.cloze_claims(_cloze(1.0), index, [0.1, 0.5], [0.8, 1.2], margin=0.05, n_boot=200).set_index("claim")
    assert same.estimate["C1"] == pytest.approx(0) and same.verdict["C1"] == "holds"  # nf4 = fp4: equal
    assert same.verdict["C2"] == "does not hold"  # no difference in either band: inside the margin
    assert same.verdict["C3"] == "holds" and same.estimate["C3"] == pytest.approx(0.15)  # both 4-bit indices > 0
    assert "int8 (8-bit contrast) +0.000" in same.numbers["C3"]
    # fp4 keeps half the reference's probability at low T, all of it at high T
    half = analysis.cloze_claims(_cloze(0.5), index, [0.1, 0.5], [0.8, 1.2], margin=0.05, n_boot=200).set_index("claim")
    assert half.estimate["C1"] == pytest.approx(0.25)  # (Q_nf4 - Q_fp4) / Q_fp32 over both T: (1 - 0.75) / 1
    assert half.verdict["C1"] == "does not hold"
    assert half.estimate["C2"] == pytest.approx(0.5) and half.verdict["C2"] == "holds"  # R_fp4 - R_nf4: 0.5 low, 0 high
    assert set(half.all_models) <= set(analysis.VERDICTS)


def test_int8_cost_words_only_counts_resolved_costs():
    from helpers.analysis import int8_cost_words

    # both within noise (Qwen-1.5B-like): no claim about what the cost is made of
    assert int8_cost_words((-0.0, -0.5, 0.5), (-0.4, -1.0, 0.3)).startswith("int8 costs no perplexity")
    # weights alone unresolved, full cost resolved: activations are the cost
    assert "activation quantization is int8's cost (+1.5%)" in int8_cost_words((0.0, -0.4, 0.4), (1.5, 0.1, 3.0))
    # both resolved: 2.4 - 0.5 = 1.9 of 2.4 is most; 0.6 - 0.4 = 0.2 of 0.6 is less than half
    assert int8_cost_words((0.5, 0.03, 0.9), (2.4, 1.1, 3.9)).endswith("activation quantization is most of int8's cost")
    assert "less than half" in int8_cost_words((0.4, 0.1, 0.8), (0.6, 0.2, 1.0))
    assert int8_cost_words((0.1, 0.0, 0.2), (-2.0, -3.0, -1.0)).startswith("int8 lowers perplexity")


def test_headline_lines_group_instruments_by_verdict():
    answers = pd.DataFrame(
        [{"claim": "C1", "version": "both", "answer": "depends on the instrument", "statistics": 4,
          "running text": "holds", "cloze prompts": "does not hold", "greedy loops": np.nan,
          "generations": "holds"}]
    )  # fmt: skip
    (line,) = analysis.headline_lines(answers)
    assert line == (
        "C1, both versions (nf4 and fp4 lose the same, within the equivalence margin): depends on the instrument "
        "(holds: running text, generations; does not hold: cloze prompts)."
    )


def test_headline_lines_count_the_statistics_of_a_mixed_instrument():
    answers = pd.DataFrame(
        [{"claim": "C1", "version": "both", "answer": "depends on the instrument", "statistics": 6,
          "running text": "depends on the model or method", "cloze prompts": "does not hold"}]
    )  # fmt: skip
    rows = pd.DataFrame(
        {"claim": "C1", "version": "both", "instrument": ["running text"] * 4 + ["cloze prompts"] * 2,
         "verdict": ["holds", "does not hold", "does not hold", "inconclusive", "does not hold", "does not hold"]}
    )  # fmt: skip
    (line,) = analysis.headline_lines(answers, rows)
    assert line.endswith(
        "(depends on the model or method: running text (1 of 4 holds, 2 do not hold, 1 inconclusive); "
        "does not hold: cloze prompts)."
    )
    assert analysis.count_words(pd.Series(["does not hold", "holds", "holds"])) == "2 of 3 hold, 1 does not hold"


def test_sensitivity_table_by_hand():
    # one prompt: the method keeps 0.6 of the reference's 0.8 at T = 0.5 (R = 0.25) and 0.4 of 0.5 at T = 1.5
    # (R = 0.2): S = 0.25 - 0.2, and R is largest at T = 0.5
    df = pd.DataFrame({"model": "m", "method": "nf4", "prompt_id": 1, "temperature": [0.5, 1.5],
                       "p_answer": [0.6, 0.4], "ref_p_answer": [0.8, 0.5]})  # fmt: skip
    curves, index = analysis.sensitivity_table(df, ["nf4"], low=[0.25, 0.8], high=[1.0, 2.0], n_boot=50)
    assert curves["mean"].tolist() == pytest.approx([0.25, 0.2])
    assert index["index"].iloc[0] == pytest.approx(0.05)
    assert index["T_of_largest_R"].iloc[0] == 0.5


def test_check_bands_names_the_bad_band():
    analysis.check_bands([0.25, 0.8], [1.0, 1.5])
    with pytest.raises(ValueError, match="high_band must be"):
        analysis.check_bands([0.25, 0.8], [1.5, 1.0])
    with pytest.raises(ValueError, match="overlap"):
        analysis.check_bands([0.25, 1.0], [1.0, 1.5])


def test_margin_caveats_flag_a_resolved_c2_inside_the_margin():
    rows = pd.DataFrame(
        {
            "claim": ["C2", "C2", "C2", "C1"],
            "version": ["first", "first", "later", "both"],
            "model": ["a", "b", "a", "a"],
            "instrument": ["running text"] * 4,
            "estimate": [-0.03, -0.10, 0.01, 0.02],
            "ci_low": [-0.037, -0.12, 0.002, 0.01],
            "ci_high": [-0.023, -0.08, 0.02, 0.03],
            "verdict": ["holds", "holds", "holds", "holds"],
        }
    )
    c2, c1 = analysis.margin_caveats(rows, 0.05)  # b lies beyond the margin; C2 later is another claim
    assert c2.startswith("C2 (first version) on a, running text: -0.030 [-0.037, -0.023]: the interval excludes 0")
    assert c1.startswith("C1 (both versions) on a, running text: +0.020 [+0.010, +0.030]: the whole interval lies")
    assert analysis.margin_caveats(rows, 0.02) == []  # a's intervals reach beyond ±0.02
    assert set(analysis.HOLDS_WHERE) == set(analysis.CLAIM_WORDS)
