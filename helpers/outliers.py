"""LLM.int8() outlier features: record the inputs of linear layers and count outlier dimensions.

LLM.int8() (Dettmers et al. 2022) multiplies in 8 bits except the *feature dimensions* (columns
of the layer input X) in which some value reaches the threshold alpha = 6: those go through a
16-bit matmul. Its outlier criteria: magnitude >= 6, in >= 25% of the layers, at >= 6% of the
sequence positions.

We read them as follows (stated in notebook 05): a (layer, dimension) pair is *hit* when
``|x| >= magnitude`` at ``>= position_share`` of the positions of that layer's input; a
dimension is an *outlier feature* when it is hit in ``>= layer_share`` of the layers whose
inputs live in the model's hidden dimension (the attention projections and the first FFN
layers read the normalised residual stream, so a dimension index means the same feature there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .models import block_linears

#: Input-side names of the Linear layers that bitsandbytes quantizes, by role.
HIDDEN_INPUT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # read the (normed) residual stream
OTHER_INPUT = ("o_proj", "down_proj")  # read attention outputs / the FFN's inner activations


@dataclass
class LayerStats:
    """Running statistics of one Linear layer's input over every call."""

    name: str
    block: int
    role: str  # the Linear's own name: q_proj, ..., down_proj
    dims: int
    positions: int = 0
    max_abs: torch.Tensor | None = None  # [dims]
    hits: dict[float, torch.Tensor] = field(default_factory=dict)  # threshold -> [dims] positions with |x| >= t
    call_outlier_cols: dict[float, list[int]] = field(default_factory=dict)  # threshold -> per call, columns >= t


class ActivationRecorder:
    """Forward pre-hooks on every Linear inside the transformer blocks (``model.model.layers``).

    ``thresholds``: magnitudes counted per dimension; for each, also the number of columns that
    LLM.int8() would send to 16 bits in each call (a column with any ``|x| >= t`` in the call).
    Use as a context manager; the hooks are removed on exit.
    """

    def __init__(self, model: torch.nn.Module, thresholds: list[float], histogram_edges: np.ndarray | None = None):
        self.model = model
        self.thresholds = sorted(float(t) for t in thresholds)
        self.edges = histogram_edges
        self.histogram = np.zeros(len(histogram_edges) - 1, dtype=np.int64) if histogram_edges is not None else None
        self.stats: dict[str, LayerStats] = {}
        self._handles: list = []

    def __enter__(self) -> "ActivationRecorder":
        for name, block, role, module in block_linears(self.model):
            role = role.rsplit(".", 1)[-1]
            if role in HIDDEN_INPUT + OTHER_INPUT:
                self.stats[name] = LayerStats(name, block, role, module.in_features)
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        if not self.stats:
            raise ValueError("no Linear layers named like q_proj/k_proj/.../down_proj inside model layers")
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs()
            s = self.stats[name]
            s.positions += x.shape[0]
            col_max = x.amax(0).cpu()
            s.max_abs = col_max if s.max_abs is None else torch.maximum(s.max_abs, col_max)
            for t in self.thresholds:
                ge = (x >= t).sum(0).cpu()
                s.hits[t] = ge if t not in s.hits else s.hits[t] + ge
                s.call_outlier_cols.setdefault(t, []).append(int((col_max >= t).sum()))
            if self.histogram is not None:
                self.histogram += np.histogram(col_max.numpy(), bins=self.edges)[0]
        return hook

    def layer_table(self) -> pd.DataFrame:
        """One row per (layer, threshold): positions, columns, share of columns sent to 16-bit."""
        rows = []
        for s in self.stats.values():
            for t in self.thresholds:
                cols = s.call_outlier_cols.get(t, [])
                rows.append({"layer": s.name, "block": s.block, "role": s.role, "hidden_input": s.role in HIDDEN_INPUT,
                             "dims": s.dims, "positions": s.positions, "threshold": t,
                             "max_abs": float(s.max_abs.max()) if s.max_abs is not None else float("nan"),
                             "cols_16bit_share": float(np.mean(cols)) / s.dims if cols else float("nan")})
        return pd.DataFrame(rows)

    def hit_share(self, threshold: float, hidden_only: bool = True) -> tuple[list[str], np.ndarray]:
        """``(layer names, [layers, dims] share of positions with |x| >= threshold)``."""
        t = float(threshold)
        if t not in self.thresholds:
            raise ValueError(f"threshold {threshold} was not recorded; recorded: {self.thresholds}")
        chosen = [s for s in self.stats.values() if not hidden_only or s.role in HIDDEN_INPUT]
        dims = {s.dims for s in chosen}
        if len(dims) != 1:
            raise ValueError(f"layers of different input widths {sorted(dims)}: pass hidden_only=True")
        return [s.name for s in chosen], np.stack([(s.hits[t] / max(s.positions, 1)).numpy() for s in chosen])


def outlier_dimensions(hit_share: np.ndarray, position_share: float = 0.06, layer_share: float = 0.25) -> np.ndarray:
    """Indices of the outlier features, from a ``[layers, dims]`` array of the share of positions
    at which each (layer, dimension) reaches the magnitude (see the module docstring)."""
    h = np.asarray(hit_share, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] == 0:
        raise ValueError(f"hit_share must be [layers, dims], got shape {h.shape}")
    hit = h >= position_share  # [layers, dims]
    return np.flatnonzero(hit.mean(axis=0) >= layer_share)


def layers_affected(hit_share: np.ndarray, dims: np.ndarray, position_share: float = 0.06) -> float:
    """Share of layers in which at least one of ``dims`` is hit (the paper's "layers affected")."""
    h = np.asarray(hit_share)
    if len(dims) == 0:
        return 0.0
    return float((h[:, dims] >= position_share).any(axis=1).mean())
