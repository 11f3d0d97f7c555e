"""Outlier statistics (helpers.outliers) on hand-built activations."""

import numpy as np
import pytest
import torch

from helpers import models, outliers


def test_outlier_dimensions_by_hand():
    # 4 layers x 3 dims: share of positions with |x| >= 6
    share = np.array([[0.10, 0.0, 0.05],
                      [0.07, 0.0, 0.50],
                      [0.00, 0.9, 0.00],
                      [0.00, 0.0, 0.00]])
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
    assert got == [("model.layers.0.q_proj", 0, "q_proj"), ("model.layers.0.down_proj", 0, "down_proj"),
                   ("model.layers.1.q_proj", 1, "q_proj"), ("model.layers.1.down_proj", 1, "down_proj"),
                   ("model.layers.1.mlp.up_proj", 1, "mlp.up_proj")]
