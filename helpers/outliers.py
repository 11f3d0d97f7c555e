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
The paper, too, leaves out the FFN contraction layer (``down_proj``), whose input lives in the
FFN's inner dimension (its Sec. 4.1).

**Scale-relative criterion.** A fixed magnitude is not scale-invariant: a layer whose input is
ten times larger throughout is "hit" everywhere. Next to it we count ``|x| >= c * m``, with ``m``
the median ``|x|`` of the layer's input in the same forward call (one window of text). For a
standard normal input ``m = 0.674``, so ``c = 9`` (:data:`RELATIVE_C`) puts the threshold at
``6.07``: where the paper's 6 sits for unit-scale inputs.

:func:`set_int8_threshold` changes the outlier threshold of a loaded LLM.int8() model in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .models import block_linears, block_of

#: ``c`` of the scale-relative criterion ``|x| >= c * median|x|`` (see the module docstring).
RELATIVE_C = 9.0
#: Values of one call above which the median is estimated from a fixed random sample of this size.
MEDIAN_SAMPLE = 1 << 16

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
    call_median: list[float] = field(default_factory=list)  # per call, the median |x| (the layer's scale)
    relative_hits: dict[float, torch.Tensor] = field(default_factory=dict)  # c -> [dims] positions with |x| >= c m

    @property
    def median_abs(self) -> float:
        """The median over calls of the per-call median ``|x|``."""
        return float(np.median(self.call_median)) if self.call_median else float("nan")


class ActivationRecorder:
    """Forward pre-hooks on every Linear inside the transformer blocks (``model.model.layers``).

    ``thresholds``: magnitudes counted per dimension; for each, also the number of columns that
    LLM.int8() would send to 16 bits in each call (a column with any ``|x| >= t`` in the call).
    ``relative``: the ``c`` of the scale-relative criterion ``|x| >= c * m`` (``m``: the call's
    median ``|x|`` (the lower median, exact up to :data:`MEDIAN_SAMPLE` values, above that from a
    seeded sample).
    Use as a context manager; the hooks are removed on exit.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        thresholds: list[float],
        histogram_edges: np.ndarray | None = None,
        relative: tuple[float, ...] = (RELATIVE_C,),
    ):
        self.model = model
        self.thresholds = sorted(float(t) for t in thresholds)
        self.relative = sorted(float(c) for c in relative)
        self._sample = torch.Generator().manual_seed(0)
        self.edges = histogram_edges
        self.histogram = np.zeros(len(histogram_edges) - 1, dtype=np.int64) if histogram_edges is not None else None
        self.stats: dict[str, LayerStats] = {}
        self._handles: list = []

    def __enter__(self) -> ActivationRecorder:
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
            flat = x.reshape(-1)
            if flat.numel() > MEDIAN_SAMPLE:
                flat = flat[torch.randint(flat.numel(), (MEDIAN_SAMPLE,), generator=self._sample).to(flat.device)]
            median = float(flat.median())
            s.call_median.append(median)
            for c in self.relative:  # a zero median (an all-zero call) hits nothing
                ge = (x >= c * median).sum(0).cpu() if median > 0 else torch.zeros(x.shape[1], dtype=torch.long)
                s.relative_hits[c] = ge if c not in s.relative_hits else s.relative_hits[c] + ge
            if self.histogram is not None:
                self.histogram += np.histogram(col_max.numpy(), bins=self.edges)[0]

        return hook

    def layer_table(self) -> pd.DataFrame:
        """One row per (layer, threshold): positions, columns, share of columns sent to 16-bit."""
        rows = []
        for s in self.stats.values():
            for t in self.thresholds:
                cols = s.call_outlier_cols.get(t, [])
                rows.append(
                    {
                        "layer": s.name,
                        "block": s.block,
                        "role": s.role,
                        "hidden_input": s.role in HIDDEN_INPUT,
                        "dims": s.dims,
                        "positions": s.positions,
                        "threshold": t,
                        "max_abs": float(s.max_abs.max()) if s.max_abs is not None else float("nan"),
                        "median_abs": s.median_abs,
                        "cols_16bit_share": float(np.mean(cols)) / s.dims if cols else float("nan"),
                    }
                )
        return pd.DataFrame(rows)

    def hit_share(
        self, threshold: float, hidden_only: bool = True, relative: bool = False
    ) -> tuple[list[str], np.ndarray]:
        """``(layer names, [layers, dims] share of positions with |x| >= threshold)``; with
        ``relative=True``, ``threshold`` is a recorded ``c`` and the test is ``|x| >= c * m``."""
        t = float(threshold)
        recorded = self.relative if relative else self.thresholds
        if t not in recorded:
            raise ValueError(f"{'c' if relative else 'threshold'} {threshold} was not recorded; recorded: {recorded}")
        chosen = [s for s in self.stats.values() if not hidden_only or s.role in HIDDEN_INPUT]
        dims = {s.dims for s in chosen}
        if len(dims) != 1:
            raise ValueError(f"layers of different input widths {sorted(dims)}: pass hidden_only=True")
        hits = [
            (s.relative_hits if relative else s.hits).get(t, torch.zeros(s.dims)) for s in chosen
        ]  # 0: never called
        return [s.name for s in chosen], np.stack([(h / max(s.positions, 1)).numpy() for s, h in zip(chosen, hits)])

    def largest(self) -> dict[str, object]:
        """Where the largest ``|x|`` entered: over all recorded layers and over the hidden-input ones
        (``layer``, ``role``, ``max_abs``, and ``max_abs / median_abs`` of that layer)."""
        out: dict[str, object] = {}
        seen = [s for s in self.stats.values() if s.max_abs is not None]  # layers that were called
        for tag, chosen in (("any", seen), ("hidden", [s for s in seen if s.role in HIDDEN_INPUT])):
            if not chosen:
                continue
            s = max(chosen, key=lambda s: float(s.max_abs.max()))
            peak = float(s.max_abs.max())
            out.update(
                {
                    f"max_abs_{tag}": peak,
                    f"max_abs_{tag}_layer": s.name,
                    f"max_abs_{tag}_role": s.role,
                    f"max_abs_{tag}_over_median": peak / s.median_abs if s.median_abs > 0 else float("inf"),
                }
            )
        return out


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


def feature_summary(
    names: list[str],
    share: np.ndarray,
    relative_share: np.ndarray,
    hidden_median_abs: pd.Series,
    position_share: float = 0.06,
    layer_share: float = 0.25,
) -> dict[str, object]:
    """Notebook 05's row per model: the outlier features of ``share`` (``[layers, dims]`` share of
    positions with |x| >= the magnitude, layers ``names``) and of ``relative_share`` (the
    scale-relative criterion), with the paper's counts (:func:`outlier_dimensions`,
    :func:`layers_affected`), the dimensions hit in any layer, the layers in which half of all
    dimensions are hit (and their blocks: a crowded layer is a scale effect, not a feature), and
    the range of the hidden-input layers' median |x|."""
    out: dict[str, object] = {"hidden_layers": len(names), "hidden_dims": int(np.shape(share)[1])}
    for suffix, s in (("", np.asarray(share)), ("_relative", np.asarray(relative_share))):
        dims = outlier_dimensions(s, position_share, layer_share)
        crowded = (s >= position_share).mean(axis=1) >= 0.5  # layers in which half of all dimensions are hit
        out[f"outlier_dims{suffix}"] = dims.tolist()
        out[f"layers_affected{suffix}"] = layers_affected(s, dims, position_share)
        out[f"dims_hit_anywhere{suffix}"] = int((s >= position_share).any(0).sum())
        out[f"layers_half_dims_hit{suffix}"] = int(crowded.sum())
        if not suffix:
            blocks = [block_of(n)[0] for n in names]
            out["blocks_half_dims_hit"] = sorted({b for b, c in zip(blocks, crowded) if c})
    out["hidden_median_abs_min"] = float(hidden_median_abs.min())
    out["hidden_median_abs_max"] = float(hidden_median_abs.max())
    return out


def max_pool_columns(values: np.ndarray, max_columns: int = 256) -> tuple[np.ndarray, int]:
    """``(pooled, width)``: ``values`` ``[rows, columns]`` with every ``width`` consecutive columns
    replaced by their maximum, ``width`` the smallest that leaves at most ``max_columns`` columns.
    A heatmap of 1,536 hidden dimensions is drawn under one pixel per dimension; the maximum keeps
    a lone outlier dimension visible where a mean would dilute it."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 2 or max_columns < 1:
        raise ValueError(f"need a 2-D array and max_columns >= 1, got shape {x.shape}, {max_columns}")
    width = -(-x.shape[1] // max_columns)
    padded = np.pad(x, ((0, 0), (0, -x.shape[1] % width)), constant_values=-np.inf)
    return padded.reshape(x.shape[0], -1, width).max(axis=2), width


def interval_words(low: float, high: float) -> str:
    """``"resolved"`` where an interval of a change excludes 0, else ``"within the interval of no
    change"``: how notebook 05 labels each paired perplexity difference."""
    return "resolved" if low > 0 or high < 0 else "within the interval of no change"


def decomposition_summary(sweep: pd.DataFrame, tokens: int) -> str:
    """What one model's threshold sweep (notebook 05) says about LLM.int8()'s decomposition, in
    words. ``sweep`` is indexed by threshold (0: no decomposition) with the paired perplexity
    change against no decomposition (``vs_no_decomposition`` and its ``_low``/``_high``
    interval), ``kl`` from fp32 and ``above_every_activation``. The decomposition *matters* where
    an interval lies below 0, *costs* where one lies above; estimates above 0 inside their
    interval are noise, and then the KL from fp32 (which chance cannot lower) is quoted when it
    fell at the finest threshold."""
    swept = [t for t in sweep.index if t > 0 and not sweep.above_every_activation[t]]
    better = [t for t in swept if sweep.vs_no_decomposition_high[t] < 0]
    worse = [t for t in swept if sweep.vs_no_decomposition_low[t] > 0]
    above = [t for t in swept if sweep.vs_no_decomposition[t] > 0 and t not in worse]
    names = lambda ts: ", ".join(f"{t:g}" for t in ts)  # noqa: E731
    if better:
        short = f"the decomposition matters: perplexity below no decomposition, the paired interval excluding 0 at threshold(s) {names(better)}"
    elif worse:
        short = f"the decomposition costs perplexity: above no decomposition, resolved at threshold(s) {names(worse)}"
    else:
        short = f"perplexity on {tokens} tokens does not resolve the decomposition's effect at any threshold"
    if above:
        short += (
            f"; the estimates above no decomposition at threshold(s) {names(above)} lie within their intervals "
            "(consistent with noise)"
        )
        finest, off = min(t for t in sweep.index if t > 0), sweep.kl[0.0]
        if sweep.kl[finest] < off:
            short += (
                f", while the KL from fp32, which chance cannot lower, falls from {off:.4f} without "
                f"decomposition to {sweep.kl[finest]:.4f} at threshold {finest:g}"
            )
    return short


def llm_int8_matmul(x: torch.Tensor, w: torch.Tensor, threshold: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x @ w.T`` the way LLM.int8() computes it (Dettmers et al. 2022, Sec. 3), in plain torch
    for teaching: every input column holding a value with ``|x| >= threshold`` (an outlier
    feature) is multiplied in full precision; the other columns are quantized vector-wise, each
    row of ``x`` and each row of ``w`` (an output) scaled by 127 over its absmax and rounded,
    multiplied in integers and rescaled. ``threshold`` 0: no decomposition (plain vector-wise
    int8). Returns the product and the mask of outlier columns. bitsandbytes' kernels may take
    other paths on some CPUs (notebook 02, section 5); notebook 05 measures the real layers."""
    x, w = x.double(), w.double()
    outlier = (x.abs() >= threshold).any(0) if threshold > 0 else torch.zeros(x.shape[1], dtype=torch.bool)
    xs, ws = x[:, ~outlier], w[:, ~outlier]
    sx = xs.abs().amax(1, keepdim=True).clamp_min(1e-12)
    sw = ws.abs().amax(1, keepdim=True).clamp_min(1e-12)
    integer = torch.round(xs * 127 / sx) @ torch.round(ws * 127 / sw).T  # what int8 x int8 -> int32 gives
    return integer * sx * sw.T / 127**2 + x[:, outlier] @ w[:, outlier].T, outlier


def set_int8_threshold(model: torch.nn.Module, threshold: float, roles: tuple[str, ...] | None = None) -> int:
    """Set the outlier threshold of every LLM.int8() layer (``bitsandbytes.nn.Linear8bitLt``) of a
    loaded model in place; bitsandbytes reads it on every call, so this equals loading the model
    with that threshold. With ``roles`` (e.g. ``("down_proj",)``) only layers whose name ends
    with one of them get ``threshold``, all others 0 (no decomposition). Returns the number of
    layers set to ``threshold``."""
    import bitsandbytes as bnb

    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    if not layers:
        raise ValueError("the model has no LLM.int8() (Linear8bitLt) layers")
    chosen = 0
    for name, module in layers:
        hit = roles is None or name.endswith(tuple(roles))
        module.state.threshold = float(threshold) if hit else 0.0
        chosen += hit
    return chosen


# --------------------------------------------------------------------------- notebook 05's panels
INPUT_GROUPS = {  # label: which layers, for the input-scale panel
    "q, k, v, gate, up (hidden state)": lambda t: t.hidden_input,
    "o_proj (attention output)": lambda t: t.role == "o_proj",
    "down_proj (FFN inner dimension)": lambda t: t.role == "down_proj",
}


def plot_input_scale(ax, layers: pd.DataFrame, magnitude: float) -> None:
    """One model's largest |x| (solid) and median |x| (dashed) entering each block's layers, one
    colour per group of :data:`INPUT_GROUPS`, against the paper's ``magnitude`` (log scale).
    ``layers``: one model's :meth:`ActivationRecorder.layer_table`."""
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    t = layers[layers.threshold == magnitude]
    for (label, chosen), color in zip(INPUT_GROUPS.items(), sns.color_palette("colorblind", len(INPUT_GROUPS))):
        by = t[chosen(t)].groupby("block")
        ax.plot(by.max_abs.max().index, by.max_abs.max(), "-o", ms=3, color=color, label=f"largest |x|: {label}")
        ax.plot(by.median_abs.median().index, by.median_abs.median(), "--", color=color, label=f"median |x|: {label}")
    ax.axhline(magnitude, color="0.3", ls=":", label=f"magnitude {magnitude:g}")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel("|x| of the layer input (log scale)")


def plot_threshold_panel(ax, sweep: pd.DataFrame, column: str, colors: dict) -> None:
    """One panel of the threshold sweep: ``column`` (with ``_low``/``_high`` bars where the table
    has them) against the threshold on a log axis, one colour per model (``colors``), and "no
    decomposition" (threshold 0) as an open diamond left of a divider; for the 16-bit column share,
    the share within down_proj layers dotted instead. Thresholds above every activation are left
    out (they equal no decomposition)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    shown = sweep[(sweep.threshold > 0) & ~sweep.above_every_activation]
    ticks = sorted(shown.threshold.unique())
    off_x = ticks[0] / 2.2  # where "no decomposition" is drawn
    lo, hi = f"{column}_low", f"{column}_high"
    nudge = dict(zip(colors, np.linspace(0.96, 1.04, len(colors)) if len(colors) > 1 else [1.0]))
    for model_name, c in colors.items():
        s, k = shown[shown.model == model_name], nudge[model_name]
        off = sweep[(sweep.model == model_name) & (sweep.threshold == 0)].iloc[0]
        ax.errorbar(
            s.threshold * k,
            s[column],
            yerr=[s[column] - s[lo], s[hi] - s[column]] if lo in s else None,
            fmt="-o",
            ms=5,
            capsize=3,
            color=c,
        )
        if column == "cols_16bit_share":
            ax.plot(s.threshold * k, s.cols_16bit_share_down_proj, ":s", ms=4, color=c)
        else:
            err = [[off[column] - off[lo]], [off[hi] - off[column]]] if lo in off else None
            ax.errorbar([off_x * k], [off[column]], yerr=err, fmt="D", ms=6, capsize=3, color=c, mfc="white", mew=1.5)
    ax.axvline(np.sqrt(off_x * ticks[0]), color="0.6", lw=1)
    ax.set_xscale("log")
    ax.set_xlim(off_x / 1.5, ticks[-1] * 1.5)
    ax.xaxis.set_major_locator(FixedLocator([off_x, *ticks]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: "off (0)" if v < ticks[0] * 0.9 else f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("int8 outlier threshold α (log scale)")
