"""Outlier statistics (helpers.outliers) on hand-built activations."""

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import models, outliers


def test_outlier_dimensions_by_hand():
    # 4 layers x 3 dims: share of positions with |x| >= 6
    share = np.array([[0.10, 0.0, 0.05], [0.07, 0.0, 0.50], [0.00, 0.9, 0.00], [0.00, 0.0, 0.00]])
    # dim 0: hit (>= 6%) in 2 of 4 layers; dim 1: 1 of 4; dim 2: 1 of 4 (0.05 < 0.06)
    assert outliers.outlier_dimensions(share).tolist() == [0, 1, 2]  # all reach 25% = 1 layer
    assert outliers.outlier_dimensions(share, layer_share=0.5).tolist() == [0]
    assert outliers.outlier_dimensions(share, position_share=0.6).tolist() == [1]
    assert outliers.layers_affected(share, np.array([0])) == 0.5
    assert outliers.layers_affected(share, np.array([], dtype=int)) == 0.0
    with pytest.raises(ValueError):
        outliers.outlier_dimensions(np.zeros(3))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(4, 4, bias=False)
        self.down_proj = torch.nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.down_proj(self.q_proj(x))


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for b in self.model.layers:
            x = torch.cat([b(x), b(x)], -1)
        return x


def test_recorder_counts_positions_columns_and_removes_its_hooks():
    net = _Tiny()
    torch.nn.init.zeros_(net.model.layers[0].q_proj.weight)  # the second block sees zeros
    torch.nn.init.zeros_(net.model.layers[0].down_proj.weight)
    x = torch.zeros(1, 5, 4)
    x[0, :, 1] = 7.0  # dim 1: |x| = 7 at all 5 positions
    x[0, 0, 3] = -6.5  # dim 3: one position of 5
    with outliers.ActivationRecorder(net, thresholds=[6.0, 10.0]) as rec:
        net(x)
    assert not net.model.layers[0].q_proj._forward_pre_hooks  # hooks removed
    names, share = rec.hit_share(6.0)
    assert names == ["model.layers.0.q_proj", "model.layers.1.q_proj"]  # hidden-input layers only
    # block 0 called twice on x: 10 positions; dim 1 always >= 6, dim 3 in 2 of 10
    assert share[0].tolist() == pytest.approx([0.0, 1.0, 0.0, 0.2])
    assert share[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert outliers.outlier_dimensions(share, layer_share=0.5).tolist() == [1, 3]
    table = rec.layer_table()
    first = table[(table.layer == "model.layers.0.q_proj") & (table.threshold == 6.0)].iloc[0]
    assert first.positions == 10 and first.max_abs == 7.0
    assert first.block == 0 and first.role == "q_proj" and first.hidden_input
    assert first.cols_16bit_share == pytest.approx(2 / 4)  # dims 1 and 3 in each call
    assert table[table.threshold == 10.0].cols_16bit_share.max() == 0.0
    with pytest.raises(ValueError, match="not recorded"):
        rec.hit_share(3.0)


def test_block_linears_names_block_and_role():
    net = _Tiny()
    net.model.layers[1].mlp = torch.nn.Module()
    net.model.layers[1].mlp.up_proj = torch.nn.Linear(2, 2)
    got = [(name, block, role) for name, block, role, _ in models.block_linears(net)]
    assert got == [
        ("model.layers.0.q_proj", 0, "q_proj"),
        ("model.layers.0.down_proj", 0, "down_proj"),
        ("model.layers.1.q_proj", 1, "q_proj"),
        ("model.layers.1.down_proj", 1, "down_proj"),
        ("model.layers.1.mlp.up_proj", 1, "mlp.up_proj"),
    ]
    assert models.block_of("model.layers.12.self_attn.o_proj") == (12, "self_attn.o_proj")
    assert models.block_of("lm_head") is None and models.block_of("model.layers.norm") is None


def test_relative_criterion_is_scale_invariant_and_counts_by_hand():
    # one call of 3 positions x 4 dims holding 1..12: lower median 6
    net = _Tiny()
    x = torch.arange(1.0, 13.0).reshape(1, 3, 4)
    with outliers.ActivationRecorder(net, thresholds=[6.0], relative=(1.5, 2.0)) as rec:
        net.model.layers[0].q_proj(x)
    s = rec.stats["model.layers.0.q_proj"]
    assert s.call_median == [6.0] and s.median_abs == 6.0
    _, share = rec.hit_share(1.5, relative=True)  # |x| >= 9: the last position, every dim
    assert share[0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1 / 3])
    _, share = rec.hit_share(2.0, relative=True)  # |x| >= 12: one value
    assert share[0].tolist() == pytest.approx([0.0, 0.0, 0.0, 1 / 3])
    # the same input 100x larger: the absolute test changes, the relative one does not
    with outliers.ActivationRecorder(net, thresholds=[6.0], relative=(1.5,)) as big:
        net.model.layers[0].q_proj(-100 * x)
    assert big.hit_share(1.5, relative=True)[1][0].tolist() == pytest.approx([1 / 3] * 4)
    assert big.hit_share(6.0)[1][0].tolist() == [1.0] * 4
    assert rec.hit_share(6.0)[1][0].tolist() == pytest.approx([1 / 3, 2 / 3, 2 / 3, 2 / 3])  # 6, 7, 8 and 9..12
    with pytest.raises(ValueError, match="not recorded"):
        rec.hit_share(3.0, relative=True)
    with outliers.ActivationRecorder(net, thresholds=[6.0]) as zero:  # an all-zero call hits nothing
        net.model.layers[0].q_proj(torch.zeros(1, 3, 4))
    assert zero.hit_share(outliers.RELATIVE_C, relative=True)[1].sum() == 0


def test_relative_criterion_c9_matches_six_for_unit_gaussian_inputs():
    # for standard normal inputs the median |x| is 0.674: 9 x median is about 6
    torch.manual_seed(0)
    net = _Tiny()
    with outliers.ActivationRecorder(net, thresholds=[6.0]) as rec:
        net.model.layers[0].q_proj(torch.randn(1, 200_000, 4))  # above MEDIAN_SAMPLE: sampled median
    m = rec.stats["model.layers.0.q_proj"].median_abs
    assert m == pytest.approx(0.6745, rel=0.02)
    assert outliers.RELATIVE_C * m == pytest.approx(6.07, rel=0.02)


def test_largest_names_the_layer_and_its_scale():
    net = _Tiny()
    small = torch.tensor([[[0.5, 1.0, -2.0, 1.0]]])
    big = torch.tensor([[[30.0, 1.0, 1.0, 1.0]]])
    with outliers.ActivationRecorder(net, thresholds=[6.0]) as rec:
        net.model.layers[0].q_proj(small)
        net.model.layers[0].down_proj(big)
    got = rec.largest()
    assert got["max_abs_any"] == 30.0 and got["max_abs_any_role"] == "down_proj"
    assert got["max_abs_any_layer"] == "model.layers.0.down_proj"
    assert got["max_abs_any_over_median"] == 30.0  # lower median of (30, 1, 1, 1) is 1
    assert got["max_abs_hidden"] == 2.0 and got["max_abs_hidden_role"] == "q_proj"
    assert got["max_abs_hidden_over_median"] == 2.0  # lower median of (0.5, 1, 2, 1) is 1
    table = rec.layer_table()
    assert table.set_index(["layer", "threshold"]).loc[("model.layers.0.q_proj", 6.0), "median_abs"] == 1.0


def _int8_layer(weight: torch.Tensor, threshold: float):
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(
        weight.shape[1], weight.shape[0], bias=False, has_fp16_weights=False, threshold=threshold
    )
    layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu").eval()  # in training mode bitsandbytes' CPU path ignores the threshold


def test_set_int8_threshold_equals_loading_with_that_threshold():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    x = torch.randn(6, 32)
    x[:, 5] = 40.0  # one outlier column
    net = torch.nn.Module()
    net.q_proj, net.down_proj = _int8_layer(w, 0.0), _int8_layer(w, 0.0)
    fresh = _int8_layer(w, 6.0)
    with torch.no_grad():
        off = net.q_proj(x)
        assert outliers.set_int8_threshold(net, 6.0) == 2
        assert torch.equal(net.q_proj(x), fresh(x))
        assert not torch.equal(off, fresh(x))  # the decomposition changed the result
        exact = x @ w.T
        assert (fresh(x) - exact).abs().max() < (off - exact).abs().max()
    assert outliers.set_int8_threshold(net, 6.0, roles=("down_proj",)) == 1
    assert net.q_proj.state.threshold == 0.0 and net.down_proj.state.threshold == 6.0
    with pytest.raises(ValueError):
        outliers.set_int8_threshold(torch.nn.Linear(2, 2), 6.0)
    with pytest.raises(ValueError):
        outliers.set_int8_threshold(net, -1.0)


def test_int8_outlier_columns_are_chosen_over_the_whole_batch():
    torch.manual_seed(1)
    w = torch.randn(8, 32)
    quiet, loud = torch.randn(1, 32), torch.randn(1, 32)
    loud[0, 5] = 40.0  # an outlier in column 5 of the other row only
    for threshold, coupled in ((6.0, True), (0.0, False)):
        layer = _int8_layer(w, threshold)
        with torch.no_grad():
            alone, together = layer(quiet)[0], layer(torch.cat([quiet, loud]))[0]
        change = float((alone - together).abs().max())
        # with the decomposition, column 5 of the quiet row moves to the 16-bit matmul because of
        # the other row; without it every row is quantized on its own
        assert (change > 1e-3) if coupled else (change < 1e-5), (threshold, change)


def test_max_pool_columns_keeps_a_lone_outlier_visible():
    x = np.zeros((2, 10))
    x[1, 7] = 0.9
    pooled, width = outliers.max_pool_columns(x, max_columns=4)
    assert width == 3 and pooled.shape == (2, 4)  # columns 0-2, 3-5, 6-8, 9 (padded)
    assert pooled[1].tolist() == [0.0, 0.0, 0.9, 0.0] and pooled[0].max() == 0
    same, one = outliers.max_pool_columns(x, max_columns=10)
    assert one == 1 and np.array_equal(same, x)


def test_llm_int8_matmul_by_hand():
    """Column 2 holds 8 and 6.5 (>= 6): it is multiplied exactly. The rest, by hand: rows of x
    [1, 0.5] and [-0.5, 1] become [127, 64] and [-64, 127] (absmax 1; 63.5 rounds to even), w's
    [1, -1] becomes [127, -127]: 8001 / 127² and -24257 / 127², plus 8 * 0.5 and 6.5 * 0.5."""
    x = torch.tensor([[1.0, 0.5, 8.0], [-0.5, 1.0, 6.5]])
    w = torch.tensor([[1.0, -1.0, 0.5]])
    y, outlier = outliers.llm_int8_matmul(x, w, threshold=6.0)
    assert outlier.tolist() == [False, False, True]
    assert y[:, 0].tolist() == pytest.approx([8001 / 16129 + 4.0, -24257 / 16129 + 3.25], abs=1e-12)
    # no decomposition: row 0's absmax is the outlier 8, so 1 and 0.5 keep 16 and 8 of 127 levels
    y0, none = outliers.llm_int8_matmul(x, w, threshold=0.0)
    assert not none.any()
    assert y0[0, 0].item() == pytest.approx((16 * 127 - 8 * 127 + 127 * 64) * 8 / 16129, abs=1e-12)
    assert abs(y0[0, 0].item() - 4.5) > 5 * abs(y[0, 0].item() - 4.5)  # the outlier costs the others precision


def test_decomposition_summary_reads_the_sweep():
    def sweep(change, low, high, kl):
        return pd.DataFrame({"vs_no_decomposition": change, "vs_no_decomposition_low": low,
                             "vs_no_decomposition_high": high, "kl": kl,
                             "above_every_activation": [False, False, False, True]},
                            index=pd.Index([0.0, 2.0, 6.0, 1e6], name="threshold"))  # fmt: skip

    matters = sweep([0, -0.02, -0.01, 0], [0, -0.03, -0.02, 0], [0, -0.01, 0.005, 0], [0.05, 0.01, 0.02, 0.05])
    assert outliers.decomposition_summary(matters, 700).startswith(
        "the decomposition matters"
    ) and "threshold(s) 2" in (outliers.decomposition_summary(matters, 700))
    noise = sweep([0, 0.01, 0.005, 0], [0, -0.01, -0.01, 0], [0, 0.03, 0.02, 0], [0.05, 0.003, 0.01, 0.05])
    words = outliers.decomposition_summary(noise, 767)
    assert words.startswith("perplexity on 767 tokens does not resolve")
    assert "threshold(s) 2, 6 lie within their intervals" in words and "falls from 0.0500" in words
    costs = sweep([0, 0.02, 0.0, 0], [0, 0.01, -0.01, 0], [0, 0.03, 0.01, 0], [0.05, 0.06, 0.05, 0.05])
    assert outliers.decomposition_summary(costs, 700).startswith("the decomposition costs perplexity")


def test_feature_summary_by_hand():
    names = [f"model.layers.{b}.self_attn.{r}" for b in (0, 1) for r in ("q_proj", "k_proj")]
    share = np.array([[0.1, 0.0, 0.07], [0.2, 0.0, 0.0], [0.5, 0.01, 0.08], [0.0, 0.0, 0.0]])  # [layers, dims]
    relative = np.zeros_like(share)
    out = outliers.feature_summary(names, share, relative, pd.Series([0.5, 2.0]), position_share=0.06, layer_share=0.5)
    # dim 0 is hit in 3 of 4 layers (>= half): an outlier feature; dim 2 in 2 of 4: also; dim 1 never
    assert out["outlier_dims"] == [0, 2] and out["outlier_dims_relative"] == []
    assert out["layers_affected"] == 0.75  # layers 0, 1 and 2 hit one of them
    assert out["dims_hit_anywhere"] == 2 and out["dims_hit_anywhere_relative"] == 0
    assert out["layers_half_dims_hit"] == 2 and out["blocks_half_dims_hit"] == [0, 1]  # layers 0 and 2: 2 of 3 dims
    assert (out["hidden_layers"], out["hidden_dims"]) == (4, 3)
    assert (out["hidden_median_abs_min"], out["hidden_median_abs_max"]) == (0.5, 2.0)
    assert outliers.interval_words(0.01, 0.2) == "resolved" == outliers.interval_words(-0.3, -0.1)
    assert outliers.interval_words(-0.01, 0.2) == "within the interval of no change"


def test_notebook_05_panels_draw_every_model():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = pd.DataFrame(
        {
            "model": ["a"] * 3 + ["b"] * 3,
            "threshold": [0.0, 1.0, 6.0] * 2,
            "above_every_activation": [False] * 6,
            "kl": [0.03, 0.01, 0.02, 0.04, 0.02, 0.03],
        }
    ).assign(kl_low=lambda d: d.kl / 2, kl_high=lambda d: d.kl * 2)
    fig, ax = plt.subplots()
    outliers.plot_threshold_panel(ax, sweep, "kl", {"a": "C0", "b": "C1"})
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["off (0)", "1", "6"]  # no decomposition left of the divider
    assert len(ax.containers) == 4  # per model: the sweep and its "off" diamond, both with bars
    layers = pd.DataFrame(
        {
            "threshold": 6.0,
            "block": [0, 0, 1, 1],
            "hidden_input": [True, False, True, False],
            "role": ["q_proj", "down_proj", "q_proj", "down_proj"],
            "max_abs": [3.0, 40.0, 4.0, 60.0],
            "median_abs": [0.5, 1.0, 0.6, 1.2],
        }
    )
    outliers.plot_input_scale(ax, layers, 6.0)
    assert [ln.get_label() for ln in ax.get_lines()][-1] == "magnitude 6"
    plt.close(fig)
