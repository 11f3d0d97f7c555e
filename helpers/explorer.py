"""The temperature explorer of notebook 07: next-token distributions of several methods side by side.

Temperature ``T`` and top-k only reshape the next-token distribution
``p = softmax(topk(logits, k) / T)`` (:func:`helpers.measures.next_token_probs`). So the
explorer runs each model once per method over a list of prompts, keeps the logits at the last
position (:class:`LogitCache`, in memory and optionally on disk), and a slider move only
re-applies the softmax: :func:`view` gives, for every method, its most probable tokens with their
probabilities, the entropy of its distribution and its total variation distance from the
reference method's distribution at the same (T, k).

Conventions as in :mod:`helpers.measures`: ``T == 0`` is greedy (all probability on the argmax),
``top_k == 0`` is off, and top-k keeps exactly k tokens even on ties. Entropies are in nats.

:func:`plot_views` draws a view as horizontal bars (the static figure of the notebook),
:func:`render_html` as HTML (the widget's display), and :func:`build_widget` assembles the
ipywidgets controls; it returns ``None`` with a one-line reason where ipywidgets is missing.
"""

from __future__ import annotations

import hashlib
import html
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import measures
from . import methods as registry
from . import models as zoo
from .provenance import package_versions
from .sweep import last_token_logits

#: Columns of :func:`view`, one row per (method, shown token).
VIEW_COLUMNS = (
    "method",
    "rank",
    "token_id",
    "token",
    "probability",
    "reference_probability",
    "entropy",
    "tv_from_reference",
    "kept_tokens",
)


# --------------------------------------------------------------------------- measures
def entropy(p: torch.Tensor) -> float:
    """Shannon entropy in nats of a probability vector (``0 log 0 = 0``), computed in float64."""
    p = p.double()
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum())


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total variation distance ``0.5 * sum |p - q|`` of two probability vectors, in float64."""
    return float(0.5 * (p.double() - q.double()).abs().sum())


def token_label(text: str) -> str:
    """A decoded token quoted like Python's ``repr``, so leading spaces and newlines are visible.

    Characters that common fonts may lack (outside Latin, Greek, Cyrillic and punctuation) are
    escaped as ``ascii`` does, so a figure never shows an empty box.
    """
    if all(ord(ch) < 0x2500 for ch in text):
        return repr(text)
    return ascii(text)


def label_tokens(tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
    """:func:`token_label` of each token id; ``#id`` where ``tokenizer`` is ``None``.

    A token that is only part of a UTF-8 character decodes to U+FFFD; its id is added then.
    """
    labels = []
    for i in token_ids:
        if tokenizer is None:
            labels.append(f"#{i}")
            continue
        text = tokenizer.decode([int(i)])
        labels.append(token_label(text) + (f" #{i}" if "\ufffd" in text else ""))
    return labels


# --------------------------------------------------------------------------- the view
def view(
    logits_by_method: Mapping[str, torch.Tensor],
    tokenizer: Any,
    temperature: float,
    top_k: int = 0,
    n_top: int = 10,
    reference: str = "fp32",
) -> pd.DataFrame:
    """Every method's next-token distribution at (``temperature``, ``top_k``), as a table.

    ``logits_by_method`` maps a method name to its last-position logits (a ``[V]`` vector); all
    share one vocabulary. One row per method and shown token (:data:`VIEW_COLUMNS`): the
    method's ``n_top`` most probable tokens with non-zero probability (fewer where top-k or
    greedy keeps fewer), most probable first (ties: lower token id first), with the reference
    method's probability of the same token, the method's entropy (nats), its total variation
    distance from the reference and how many tokens keep non-zero probability. Without the
    reference among the methods, the reference columns are NaN.
    """
    measures.validate(temperature=temperature, top_k=top_k)
    if not isinstance(n_top, int) or n_top < 1:
        raise ValueError(f"n_top must be an integer >= 1, got {n_top!r}")
    if not logits_by_method:
        raise ValueError("no methods to show")
    sizes = {m: tuple(x.shape) for m, x in logits_by_method.items()}
    if len(set(sizes.values())) != 1 or len(next(iter(sizes.values()))) != 1:
        raise ValueError(f"every method needs one logit vector over the same vocabulary, got shapes {sizes}")
    probs = {m: measures.next_token_probs(x, temperature, top_k).double() for m, x in logits_by_method.items()}
    ref = probs.get(reference)
    rows = []
    for method, p in probs.items():
        kept = int((p > 0).sum())
        shown = _most_probable(p, min(n_top, kept))
        h = entropy(p)
        tv = total_variation(p, ref) if ref is not None else float("nan")
        for rank, (tid, label) in enumerate(zip(shown, label_tokens(tokenizer, shown)), start=1):
            rows.append(
                {
                    "method": method,
                    "rank": rank,
                    "token_id": tid,
                    "token": label,
                    "probability": float(p[tid]),
                    "reference_probability": float(ref[tid]) if ref is not None else float("nan"),
                    "entropy": h,
                    "tv_from_reference": tv,
                    "kept_tokens": kept,
                }
            )
    return pd.DataFrame(rows, columns=list(VIEW_COLUMNS))


def _most_probable(p: torch.Tensor, n: int) -> list[int]:
    """Ids of the ``n`` largest entries of ``p``, largest first, ties in id order (without sorting all of ``p``)."""
    if n == 0:
        return []
    threshold = p.topk(n).values[-1]
    candidates = (p >= threshold).nonzero().squeeze(1)  # every token tied with the n-th, in id order
    order = torch.sort(p[candidates], descending=True, stable=True).indices
    return candidates[order[:n]].tolist()


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per method of a :func:`view` table: entropy, TV from the reference, the top token
    and its probability, and how many tokens keep non-zero probability."""
    first = table[table["rank"] == 1].set_index("method", drop=False)
    return pd.DataFrame(
        {
            "method": first.method,
            "entropy": first.entropy,
            "tv_from_reference": first.tv_from_reference,
            "top_token": first.token,
            "top_probability": first.probability,
            "kept_tokens": first.kept_tokens,
        }
    ).reset_index(drop=True)


def over_prompts(
    logits_by_method: Mapping[str, torch.Tensor], temperatures: Sequence[float], top_k: int = 0, reference: str = "fp32"
) -> pd.DataFrame:
    """Mean total variation from the reference, entropy and top-1 agreement over many prompts.

    ``logits_by_method`` maps a method to ``[P, V]`` logits (one row per prompt, the same
    prompts in the same order for every method). One row per (method, temperature) with
    ``mean_tv``, ``max_tv``, ``mean_entropy`` (nats), ``top1_agree`` (share of prompts whose
    argmax equals the reference's) and the mean TV over the prompts where the argmax agrees
    (``mean_tv_top1_same``) and where it differs (``mean_tv_top1_differs``; NaN where there are
    none), computed by :func:`helpers.measures.next_token_measures`.
    """
    if reference not in logits_by_method:
        raise ValueError(f"the reference method {reference!r} is not among {list(logits_by_method)}")
    ref = logits_by_method[reference]
    rows = []
    for method, x in logits_by_method.items():
        m = measures.next_token_measures(ref, x, list(temperatures), [top_k])
        for T, g in m.groupby("temperature", sort=False):
            rows.append(
                {
                    "method": method,
                    "temperature": T,
                    "top_k": top_k,
                    "prompts": len(g),
                    "mean_tv": g.tv.mean(),
                    "max_tv": g.tv.max(),
                    "mean_entropy": g.entropy.mean(),
                    "top1_agree": g.top1_agree.mean(),
                    "mean_tv_top1_same": g.tv[g.top1_agree].mean(),
                    "mean_tv_top1_differs": g.tv[~g.top1_agree].mean(),
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the logit cache
@dataclass
class LogitCache:
    """Last-position logits per (model, method, prompt text), each computed once.

    :meth:`fill` runs every method over a list of prompts, one method loaded at a time (and
    freed after), reading and writing ``cache_dir`` when given. :meth:`logits` answers from
    memory, or, for a prompt never seen (one typed in the widget), loads each method of that
    model once, keeps it loaded for later prompts, and runs one forward pass per method.
    """

    methods: list[str]
    device: str = "cpu"
    compute_dtype: str = "auto"
    cache_dir: str | Path | None = None
    loader: Callable[[str, str], tuple[Any, Any]] | None = None  # (model, method) -> (network, tokenizer)
    tokenizer: Callable[[str], Any] = registry.load_tokenizer  # model -> its tokenizer
    _logits: dict[tuple[str, str], dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _loaded: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        registry.validate_methods(self.methods)
        if self.loader is None:
            self.loader = lambda model, method: registry.load(model, method, self.device, self.compute_dtype)

    def _disk_path(self, model: str, method: str) -> Path | None:
        """Cache file of one (model, method): its name carries a hash of everything the logits depend on."""
        if not self.cache_dir:
            return None
        path = Path(zoo.resolve(model))  # a Hub id stays a name: its weights are identified by name only
        weights = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in path.glob("*.safetensors"))
        settings = (method, self.device, self.compute_dtype, package_versions(), "one prompt per pass")
        key = repr((model, str(path), weights, *settings))
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
        return Path(self.cache_dir) / f"{safe}__{method}__{digest}.pt"

    def fill(self, model: str, prompts: Sequence[str]) -> dict[str, Any]:
        """Compute (or read from disk) every method's logits for ``prompts``; return what it did:
        ``seconds``, the methods ``computed`` and those ``read`` from disk. One prompt per forward
        pass (:func:`helpers.sweep.last_token_logits`): what one user gets, whatever the batch
        would have done to a batch-dependent method."""
        start = time.perf_counter()
        computed, read = [], []
        prompts = list(dict.fromkeys(prompts))
        for method in self.methods:
            store = self._logits.setdefault((model, method), {})
            path = self._disk_path(model, method)
            if path is not None and path.exists():
                saved = torch.load(path, weights_only=True)
                store.update(zip(saved["texts"], saved["logits"]))
            missing = [p for p in prompts if p not in store]
            if not missing:
                read.append(method)
                continue
            net, tokenizer = self._model(model, method)
            with torch.inference_mode():
                store.update(zip(missing, last_token_logits(net, tokenizer, missing)))
            del net, tokenizer  # free this method's model before the next one is loaded (unless kept)
            computed.append(method)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                texts = list(store)
                tmp = path.with_suffix(".tmp")
                torch.save({"texts": texts, "logits": torch.stack([store[t] for t in texts])}, tmp)
                tmp.replace(path)
        return {
            "model": model,
            "prompts": len(prompts),
            "computed": computed,
            "read": read,
            "seconds": time.perf_counter() - start,
        }

    def _model(self, model: str, method: str, keep: bool = False) -> tuple[Any, Any]:
        if (model, method) in self._loaded:
            return self._loaded[(model, method)]
        loaded = self.loader(model, method)
        if keep:
            for key in [k for k in self._loaded if k[0] != model]:  # one model's methods in memory at a time
                del self._loaded[key]
            self._loaded[(model, method)] = loaded
        return loaded

    def logits(self, model: str, prompt: str) -> dict[str, torch.Tensor]:
        """Method -> ``[V]`` logits of ``prompt``; a prompt not cached costs one forward pass per method
        (and, the first time for this model, loading each method)."""
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        out = {}
        for method in self.methods:
            store = self._logits.setdefault((model, method), {})
            if prompt not in store:
                net, tokenizer = self._model(model, method, keep=True)
                with torch.inference_mode():
                    store[prompt] = last_token_logits(net, tokenizer, [prompt])[0]
            out[method] = store[prompt]
        return out

    def stacked(self, model: str, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Method -> ``[P, V]`` logits of cached ``prompts`` (in that order)."""
        return {m: torch.stack([self._logits[(model, m)][p] for p in prompts]) for m in self.methods}


# --------------------------------------------------------------------------- figures and HTML
def plot_views(
    views: Sequence[tuple[str, pd.DataFrame]],
    colors: Mapping[str, str] | None = None,
    reference: str = "fp32",
    title: str = "",
):
    """One row of panels per ``(row label, view table)``, one panel per method: horizontal bars of
    the method's top tokens labelled with their probabilities, a black tick at the reference's
    probability of the same token, and the share of probability the shown tokens hold.

    Returns the matplotlib figure. The probability axis is shared along a row and scaled to it,
    so a flat distribution at high temperature stays readable.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    colors = dict(registry.METHOD_COLORS if colors is None else colors)
    methods = list(dict.fromkeys(views[0][1].method))
    n_top = int(max(t["rank"].max() for _, t in views))
    fig, axes = plt.subplots(
        len(views), len(methods), figsize=(3.8 * len(methods), (0.34 * n_top + 1.7) * len(views)), squeeze=False
    )
    tick = dict(linestyle="none", marker="|", markersize=12, markeredgewidth=2, color="black")
    for row, (label, table) in enumerate(views):
        top = float(np.nanmax(table[["probability", "reference_probability"]].to_numpy()))
        xmax = min(1.0, top) * 1.45  # room for the numbers after the bars
        for col, method in enumerate(methods):
            ax = axes[row, col]
            t = table[table.method == method].sort_values("rank")
            y = np.arange(len(t))
            ax.barh(y, t.probability, color=colors.get(method, "C0"), height=0.7)
            show_ref = method != reference and t.reference_probability.notna().all()
            if show_ref:
                ax.plot(t.reference_probability, y, **tick)
            for yi, pr, ref in zip(y, t.probability, t.reference_probability):
                x = pr + 0.02 * xmax  # the number follows the bar, or the tick where the tick would cover it
                if show_ref and pr - 0.02 * xmax <= ref <= x + 0.14 * xmax:
                    x = max(x, ref + 0.03 * xmax)
                ax.text(x, yi, f"{pr:.1%}" if pr >= 0.0005 else "<0.1%", va="center", fontsize=7)
            ax.set_yticks(y, t.token, fontsize=8, fontfamily="monospace")
            ax.set_ylim(n_top - 0.5, -0.5)  # most probable on top, same bar height in every panel
            ax.set_xlim(0, xmax)
            ax.set_xticks([v for v in ax.get_xticks() if 0 <= v <= min(1.0, xmax)])
            ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
            ax.set_xlabel("probability of the next token (%)", fontsize=8)
            ax.tick_params(axis="x", labelsize=8)
            first = t.iloc[0]
            measure = "" if method == reference else f" · TV from {reference} {first.tv_from_reference:.3f}"
            ax.set_title(
                f"{method} · {label}\nentropy {first.entropy:.2f} nats{measure}\n"
                f"the {len(t)} tokens shown hold {t.probability.sum():.0%}",
                fontsize=9,
            )
        axes[row, 0].set_ylabel(f"{label}: top tokens, most probable first", fontsize=9)
    handles = [Patch(color=colors.get(m, "C0"), label=m) for m in methods]
    handles.append(Line2D([], [], label=f"{reference}'s probability of the same token", **tick))
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=len(handles),
        fontsize=8,
        frameon=False,
        title="bars: each method's probability of its own top tokens (quoted as decoded, spaces visible)",
        title_fontsize=8,
        bbox_to_anchor=(0.5, 0.0),
    )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def render_html(table: pd.DataFrame, colors: Mapping[str, str] | None = None, reference: str = "fp32") -> str:
    """A :func:`view` table as HTML: one column per method with its entropy, TV from the reference
    and its top tokens as bars (the widget's display)."""
    colors = dict(registry.METHOD_COLORS if colors is None else colors)
    panels = []
    for method, t in table.groupby("method", sort=False):
        first = t.iloc[0]
        measure = "" if method == reference else f" · TV from {html.escape(reference)} {first.tv_from_reference:.3f}"
        lines = [
            f"<div style='min-width:230px;margin-right:18px'><b>{html.escape(method)}</b><br>"
            f"<small>entropy {first.entropy:.2f} nats{measure} · {int(first.kept_tokens)} tokens kept</small>"
            "<table style='border-collapse:collapse;font-size:12px'>"
        ]
        for r in t.itertuples():
            ref = "" if method == reference or np.isnan(r.reference_probability) else f"{r.reference_probability:.1%}"
            lines.append(
                f"<tr><td style='font-family:monospace;text-align:right;padding-right:6px'>{html.escape(r.token)}</td>"
                f"<td style='width:110px'><div style='background:{colors.get(method, '#1f77b4')};height:10px;"
                f"width:{100 * r.probability:.1f}%'></div></td>"
                f"<td style='text-align:right;padding-left:4px'>{r.probability:.1%}</td>"
                f"<td style='text-align:right;padding-left:6px;color:#777'>{ref}</td></tr>"
            )
        lines.append("</table></div>")
        panels.append("".join(lines))
    note = f"<small style='color:#777'>grey numbers: {html.escape(reference)}'s probability of the same token</small>"
    return f"<div style='display:flex;flex-wrap:wrap'>{''.join(panels)}</div>{note}"


# --------------------------------------------------------------------------- the widget
def build_widget(
    cache: LogitCache,
    models: Sequence[str],
    prompts: pd.DataFrame,
    temperature: float = 1.0,
    top_k: int = 0,
    n_top: int = 10,
    reference: str = "fp32",
):
    """The explorer's controls: model and prompt pickers, a text box for a prompt of one's own,
    temperature, top-k and shown-token sliders, and the :func:`render_html` display.

    ``prompts`` has columns ``id`` and ``prompt`` (their logits should be in ``cache`` already,
    see :meth:`LogitCache.fill`). Returns ``(widget, reason)``: the widget and ``""``, or
    ``None`` and a one-line reason where ipywidgets is not installed.
    """
    try:
        import ipywidgets as w
    except ImportError:
        return None, "ipywidgets is not installed (pip install ipywidgets): only the static figure is shown"

    options = [(f"{r.id}: {r.prompt}", r.prompt) for r in prompts.itertuples()]
    model_box = w.Dropdown(options=list(models), value=models[0], description="model")
    prompt_box = w.Dropdown(options=options, value=options[0][1], description="prompt", layout=w.Layout(width="520px"))
    own = w.Text(
        placeholder="or type a prompt and press Enter", continuous_update=False, layout=w.Layout(width="520px")
    )
    t_slider = w.FloatSlider(
        value=temperature, min=0.0, max=2.0, step=0.05, description="temperature", readout_format=".2f"
    )
    k_slider = w.IntSlider(value=top_k, min=0, max=100, step=1, description="top-k (0 off)")
    n_slider = w.IntSlider(value=n_top, min=1, max=20, step=1, description="tokens shown")
    status = w.HTML()
    display = w.HTML()

    def redraw(*_):
        try:
            logits = cache.logits(model_box.value, prompt_box.value)
            table = view(
                logits, cache.tokenizer(model_box.value), t_slider.value, k_slider.value, n_slider.value, reference
            )
            display.value = render_html(table, reference=reference)
            status.value = "T = 0 is greedy" if t_slider.value == 0 else ""
        except Exception as err:  # shown in the widget, not raised into the event loop
            status.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"

    def typed(_):
        text = own.value
        if not text.strip():
            status.value = "<span style='color:#b00'>the prompt is empty</span>"
            return
        status.value = "computing the logits of every method (the first time, each method is loaded) ..."
        try:
            cache.logits(model_box.value, text)
        except Exception as err:
            status.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
            return
        if text not in [v for _, v in prompt_box.options]:
            prompt_box.options = [*prompt_box.options, (f"typed: {text}", text)]
        prompt_box.value = text
        redraw()

    for control in (model_box, prompt_box, t_slider, k_slider, n_slider):
        control.observe(redraw, names="value")
    own.observe(typed, names="value")  # continuous_update=False: on Enter or when the box loses focus
    redraw()
    controls = w.VBox([w.HBox([model_box, prompt_box]), own, w.HBox([t_slider, k_slider, n_slider]), status])
    return w.VBox([controls, display]), ""
