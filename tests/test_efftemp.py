"""Effective temperature: every definition on controls with a known answer, brute-force curves,
the bootstrap refit, and the matched verdict that noise must not pass."""

import math

import numpy as np
import pytest
import torch

from helpers import efftemp


def _case(n=192, v=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = 3 * torch.randn(n, v, generator=g)
    y = torch.multinomial(torch.softmax(a, -1), 1, generator=g).squeeze(1)  # the text follows the reference
    return a, y


def test_curves_equal_a_brute_force_computation():
    a, y = _case(n=8, v=50)
    b = a + torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    grid = (0.5, 1.0, 1.7)
    got = efftemp.position_curves(a, b, y, grid)
    a64, b64 = a.double(), b.double()
    for j, t in enumerate(grid):
        lp, lq = torch.log_softmax(a64, -1), torch.log_softmax(b64, -1)
        lp_t, lq_t = torch.log_softmax(a64 / t, -1), torch.log_softmax(b64 / t, -1)
        kl_mr = (lq.exp() * (lq - lp_t)).sum(-1)
        kl_rm = (lp.exp() * (lp - lq_t)).sum(-1)
        ll_ref, ll_m = -lp_t.gather(1, y[:, None]).squeeze(1), -lq_t.gather(1, y[:, None]).squeeze(1)
        for k, want in enumerate((kl_mr, kl_rm, ll_ref, ll_m)):
            np.testing.assert_allclose(got[:, k, j], want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c", [0.8, 1.3])
def test_every_definition_returns_the_temperature_of_a_pure_temperature_change(c):
    a, y = _case()
    fitted = efftemp.fit(efftemp.position_curves(a, efftemp.scaled(a, c), y).sum(0))
    for name in efftemp.DEFINITIONS:
        assert fitted[name] == pytest.approx(c, rel=0.01), name
    assert fitted["removed_kl_method_ref"] > 0.99 and fitted["removed_kl_ref_method"] > 0.99


def test_noise_is_not_a_temperature_shift():
    """The reference plus i.i.d. noise: the best temperature removes little of its KL."""
    a, y = _case()
    b = a + 1.0 * efftemp.noise(a.shape, seed=3)
    fitted = efftemp.fit(efftemp.position_curves(a, b, y).sum(0))
    assert 0 <= fitted["removed_kl_method_ref"] < 0.2
    assert 0 <= fitted["removed_kl_ref_method"] < 0.2


def test_noise_scale_reaches_the_target_kl():
    a, _ = _case(n=64)
    eps = efftemp.noise(a.shape, seed=5)
    sigma = efftemp.noise_scale(a, eps, 0.05)
    assert efftemp.mean_kl(a, a + sigma * eps) == pytest.approx(0.05, rel=1e-3)
    with pytest.raises(ValueError, match="positive"):
        efftemp.noise_scale(a, eps, 0.0)


def test_best_temperature_minimises_the_log_loss():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(300, 50, generator=g) * 2
    y = torch.multinomial(torch.softmax(a / 1.6, -1), 1, generator=g).squeeze(1)  # text drawn at T = 1.6
    fitted = efftemp.fit(efftemp.position_curves(a, a, y).sum(0))

    def nll(T):
        return float(-torch.log_softmax(a.double() / T, -1).gather(1, y[:, None]).sum())

    grid = np.linspace(0.5, 2.4, 951)
    assert fitted["ref_best_T"] == pytest.approx(grid[np.argmin([nll(T) for T in grid])], abs=0.005)
    assert fitted["best_T"] == fitted["ref_best_T"] and fitted["logloss"] == pytest.approx(1.0)


def test_grid_minimum_of_a_parabola_in_log_t_and_at_the_edge():
    grid = efftemp.GRID
    v = (np.log(grid) - math.log(1.23)) ** 2 + 0.5
    t, value = efftemp.grid_minimum(v, grid)
    assert t == pytest.approx(1.23, rel=1e-9) and value == pytest.approx(0.5)
    assert math.isnan(efftemp.grid_minimum(np.arange(len(grid), dtype=float), grid)[0])  # lowest at an end


def test_bootstrap_refits_tau_in_every_replicate():
    """Blocks that disagree on the temperature give an interval around the pooled fit."""
    a, y = _case(n=240)
    parts = []
    for i, c in enumerate([0.9, 1.2] * 6):
        rows = slice(20 * i, 20 * i + 20)
        parts.append(efftemp.position_curves(a[rows], efftemp.scaled(a[rows], c), y[rows]).sum(0))
    table = efftemp.fit_intervals(np.stack(parts), n_boot=200).set_index("quantity")
    for name in efftemp.DEFINITIONS:
        r = table.loc[name]
        assert r.ci_low < r.estimate < r.ci_high and r.ci_high - r.ci_low > 0.02, name
        assert 0.9 < r.ci_low and r.ci_high < 1.2, name


def test_reference_at_is_the_log_loss_at_each_temperature():
    a, y = _case(n=5, v=30)
    got = efftemp.reference_at(a, y, [0.5, 2.0])
    for j, t in enumerate((0.5, 2.0)):
        want = -torch.log_softmax(a.double() / t, -1).gather(1, y[:, None]).squeeze(1)
        np.testing.assert_allclose(got[:, j], want.numpy(), rtol=1e-5, atol=1e-5)


def test_robust_matched_verdict():
    v = efftemp.robust_matched_verdict
    assert v(["holds"] * 3, ["does not hold", "inconclusive", "does not hold"]) == "holds"
    assert v(["holds"] * 3, ["does not hold", "holds", "does not hold"]) == "also found in noise"
    assert v(["holds", "does not hold", "holds"], []) == "depends on the definition"
    assert (
        v(["holds", "does not hold", "does not hold"], ["holds", "does not hold", "does not hold"])
        == "depends on the definition; where it holds, so does the noise control"
    )
    assert v(["inconclusive"] * 3, ["holds"] * 3) == "inconclusive"
    with pytest.raises(ValueError):
        v([], [])


def test_summary_lines_check_the_temperature_control():
    rows = []
    for method, tau, removed in (("ctrl-temp", 1.15, 1.0), ("nf4", 1.08, 0.07)):
        for quantity in (*efftemp.DEFINITIONS, "removed_kl_method_ref"):
            value = removed if quantity.startswith("removed") else tau
            rows.append(
                {
                    "model": "m",
                    "method": method,
                    "quantity": quantity,
                    "estimate": value,
                    "ci_low": value,
                    "ci_high": value,
                }
            )
    import pandas as pd

    temp, nf4 = efftemp.summary_lines(pd.DataFrame(rows), control_temperature=1.15)
    assert "every definition returns c = 1.15" in temp and "NOT" not in temp
    assert "removes 7% of its KL (mostly not a temperature shift)" in nf4
    assert "NOT every" in efftemp.summary_lines(pd.DataFrame(rows), control_temperature=1.3)[0]
    assert efftemp.shift_words(0.5) == "partly a temperature shift"
