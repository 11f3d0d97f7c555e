"""Memory: what a model holds, peak memory while it runs, and the bytes one decoding step reads.

* **What a model holds** (:func:`memory_breakdown`): the parts the memory figures stack, the
  quantization state (absmax, ``SCB``, nested statistics) included, counted from the tensors
  before the first forward pass (some bitsandbytes CPU kernels repack weights then).
* **Peak memory**: peak resident memory on CPU (``VmHWM``, reset through
  ``/proc/self/clear_refs``; NaN where the kernel does not support the reset),
  ``max_memory_allocated`` and ``max_memory_reserved`` on CUDA (neither counts the CUDA context).
* **Roofline**: decoding one token at batch 1 reads every weight once plus the KV cache
  (:func:`bytes_per_token`), so a method decodes at most ``bandwidth / bytes_per_token`` tokens
  per second (:func:`memory_bandwidth`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .runtime import synchronize, timed

#: One colour per part of a model's bytes, the same in every memory figure (notebooks 01 and 03).
PART_COLORS = {
    "float": "#c7c7c7",  # unquantized float tensors (the embedding; every weight of an unquantized model)
    "codes": "#4c72b0",  # the linear layers: int8 or packed 4-bit codes (float weights in notebook 03's fp32/bf16 bars)
    "state": "#dd8452",  # quantization state: absmax, nested statistics, int8 row scales
    "other": "#55a868",  # norms, biases, rotary tables
}


def stacked_bars(ax, frame: pd.DataFrame, parts: list[tuple[str, str, str]], x=None) -> np.ndarray:
    """Stack the ``parts`` columns of ``frame`` (``(column, label, colour)``, bottom first) as one
    bar per row (x positions ``x``, or the row labels), the memory figures of notebooks 01 and 03;
    returns the bars' tops."""
    x = frame.index if x is None else x
    bottom = np.zeros(len(frame))
    for column, label, colour in parts:
        ax.bar(x, frame[column], bottom=bottom, label=label, color=colour, width=0.7, edgecolor="white", lw=0.5)
        bottom += frame[column].to_numpy()
    return bottom


def state_bars(ax, state: pd.Series, x=None, fontsize: float = 7.5) -> None:
    """The quantization state alone (MiB), each bar labelled with its value: the sliver that the
    stacked bars of :func:`stacked_bars` cannot show."""
    x = state.index if x is None else x
    ax.bar(x, state, color=PART_COLORS["state"], width=0.7)
    for xi, v in zip(x, state):
        ax.text(xi, v, f"{v:.2f}" if v else "0", ha="center", va="bottom", fontsize=fontsize)
    ax.set_ylabel("quantization\nstate (MiB)")
    ax.set_ylim(0, max(state.max(), 1e-3) * 1.3)


def four_bit_embedding_note(parts: pd.DataFrame) -> str | None:
    """Why a 4-bit model can hold more bytes than the same model in bf16, or None where it does
    not: bitsandbytes quantizes the linear layers only, and the embedding keeps the float width
    it was loaded in (fp32 where the compute dtype is fp32). ``parts``: one model's
    :func:`memory_breakdown` columns indexed by method."""
    four_bit = [k for k in ("nf4", "fp4") if k in parts.index]
    if not four_bit or "bf16" not in parts.index or parts.total_MiB[four_bit[0]] <= parts.total_MiB["bf16"]:
        return None
    k, emb = four_bit[0], parts.embedding_MiB
    bits = round(16 * emb[k] / emb["bf16"])  # the embedding's float width under k
    what = (
        "embedding stays"
        if parts.get("tied_embeddings", pd.Series(True, parts.index))[k]
        else "embedding and head stay"
    )
    return (
        f"{k} holds more than bf16: its {what}\nunquantized in {bits}-bit floats, "
        f"{emb[k]:.0f} MiB = {emb[k] / parts.total_MiB[k]:.0%} of {k}'s bytes\n"
        f"(bf16 stores it in 16 bits: {emb['bf16']:.0f} MiB)"
    )


def peak_below_held(parts: pd.DataFrame) -> list[str]:
    """One line per method whose peak growth (``peak_growth_MiB``) lies below the bytes it holds
    (``total_MiB``), and why that can be: a model loaded in its checkpoint's own dtype (fp32 from an
    fp32 file) is a memory map of the file, whose pages count in the resident set only once read;
    an input embedding that is not tied to the output head is read only in the rows a prompt looks
    up. ``parts``: one model's rows indexed by method, with ``embedding_MiB`` (the embedding, plus
    the head where the model holds it separately) and ``tied_embeddings``."""
    lines = []
    for method, r in parts[parts.peak_growth_MiB < parts.total_MiB].iterrows():
        peak, held = round(r.peak_growth_MiB), round(r.total_MiB)
        line = f"{method}: peak growth {peak} MiB, below the {held} MiB it holds"
        if not r.tied_embeddings:  # the input embedding is half of embedding_MiB (the head has its shape)
            rows = round(r.embedding_MiB / 2)
            line += (
                f"; a run reads all but the input embedding ({rows} MiB, a memory map read only in the looked-up "
                f"rows): {held - rows} MiB, "
                + (
                    f"and the other {peak - held + rows} MiB of the peak are activations, the KV cache and "
                    "other allocations"
                    if peak >= held - rows
                    else f"{held - rows - peak} MiB above the peak growth"
                )
            )
        lines.append(line)
    return lines


# --------------------------------------------------------------------------- peak memory
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_SLACK_MIB = 8.0  # after a reset the high-water mark equals the resident size, give or take this
_peak_window = False  # whether VmHWM has counted from a reset that took (see reset_peak_rss)


def _status_mib(field: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` in MiB; None where there is no such file or field."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark and check that the reset took.

    Writing ``5`` to ``/proc/self/clear_refs`` sets ``VmHWM`` to the current ``VmRSS`` (Linux).
    Some kernels and sandboxes refuse the write, and some accept it and do nothing; ``VmHWM``
    then stays the lifetime peak, and a "peak while loading and generating" read from it would
    be wrong. Returns True only if ``VmHWM`` is back near ``VmRSS`` afterwards; otherwise
    :func:`peak_memory` reports NaN until a later reset succeeds.
    """
    global _peak_window
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        _peak_window = False
        return False
    hwm, rss = _status_mib("VmHWM"), _status_mib("VmRSS")
    _peak_window = hwm is not None and rss is not None and hwm - rss <= RESET_SLACK_MIB
    return _peak_window


def rss_mib(field: str = "VmRSS") -> float:
    """Current (``VmRSS``) or peak (``VmHWM``: since the last reset, or over the process's life
    where resets do not work, see :func:`reset_peak_rss`) resident memory, MiB."""
    value = _status_mib(field)
    if value is not None:
        return value
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # fallback: lifetime peak


def reset_peak_memory(device: str) -> bool:
    """Start a new peak-memory window on ``device`` (CUDA counters, or RSS on CPU).

    False where the CPU high-water mark cannot be reset (then the CPU peak is NaN)."""
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return reset_peak_rss()


def peak_memory(device: str) -> dict[str, float]:
    """Peak memory since :func:`reset_peak_memory`, MiB, under the names the plots use.

    On CPU, NaN if the last reset did not take: a lifetime peak is not what the plots mean."""
    if device.startswith("cuda"):
        synchronize(device)
        return {
            "max_memory_allocated_MiB": torch.cuda.max_memory_allocated(device) / 2**20,
            "max_memory_reserved_MiB": torch.cuda.max_memory_reserved(device) / 2**20,
        }
    return {"peak_rss_MiB": rss_mib("VmHWM") if _peak_window else float("nan")}


# --------------------------------------------------------------------------- roofline
def memory_bandwidth(size_mib: int = 256, repeats: int = 5, device: str = "cpu") -> dict[str, float]:
    """Measured memory bandwidth, GB/s (1e9 bytes): the best of ``repeats``.

    *read*: ``x.sum()`` reads every byte once (what decoding does to the weights);
    *copy*: ``y.copy_(x)`` reads and writes (counted as 2 bytes moved per byte).
    Use arrays much larger than the last-level cache.
    """
    n = size_mib * 2**20 // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    best = {"read_GBps": 0.0, "copy_GBps": 0.0}
    for _ in range(repeats + 1):  # the first round is warm-up (page faults)
        read_s, _ = timed(x.sum, device)
        copy_s, _ = timed(lambda: y.copy_(x), device)
        best["read_GBps"] = max(best["read_GBps"], x.nbytes / read_s / 1e9)
        best["copy_GBps"] = max(best["copy_GBps"], 2 * x.nbytes / copy_s / 1e9)
    return best


def kv_cache_bytes(config, context_tokens: int, bytes_per_value: int) -> int:
    """Bytes of keys and values of ``context_tokens`` positions for one sequence."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * head_dim * context_tokens * bytes_per_value


def bytes_per_token(weight_bytes: int, input_embedding_bytes: int, tied_embeddings: bool, kv_bytes: int) -> int:
    """Bytes read from memory to decode one token at batch 1.

    Every weight is read once per step (quantized payload + its quantization state + the
    layers left unquantized), except the input embedding table, of which a lookup reads one
    row, unless it is tied to the output head, which reads all of it. Plus the KV cache.
    """
    if min(weight_bytes, input_embedding_bytes, kv_bytes) < 0 or input_embedding_bytes > weight_bytes:
        raise ValueError("byte counts must be >= 0 and the embedding part of the weights")
    return weight_bytes - (0 if tied_embeddings else input_embedding_bytes) + kv_bytes


def memory_breakdown(model) -> dict[str, Any]:
    """What ``model`` holds, in the parts the memory figure stacks, MiB (count before the first
    forward: some bitsandbytes CPU kernels repack weights then).

    ``linear_MiB``: linear layers of the blocks (packed int8/4-bit codes, or float weights);
    ``quant_state_MiB``: their absmax / ``SCB`` / nested statistics; ``embedding_MiB``: the token
    embedding, plus the output head when it is not tied to it (both stay unquantized);
    ``other_MiB``: norms, biases and buffers such as rotary tables. ``weights_MiB`` is everything
    but the quantization state, ``hf_footprint_MiB`` what ``get_memory_footprint()`` reports.
    """
    import bitsandbytes as bnb

    from .quantization import storage_report

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    report = storage_report(model)
    emb = model.get_input_embeddings().weight
    head_module = model.get_output_embeddings()
    head = head_module.weight if head_module is not None else None
    tied = head is not None and head.data_ptr() == emb.data_ptr()
    embedding = nbytes(emb) + (nbytes(head) if head is not None and not tied else 0)
    float_linear = sum(
        nbytes(m.weight)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
        and m is not head_module
        and not isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    )
    mib = 2**20
    return {
        "linear_MiB": (report.quantized_payload_bytes + float_linear) / mib,
        "quant_state_MiB": report.quant_state_bytes / mib,
        "embedding_MiB": embedding / mib,
        "other_MiB": (report.other_bytes - embedding - float_linear) / mib,
        "weights_MiB": (report.quantized_payload_bytes + report.other_bytes) / mib,
        "total_MiB": report.total_bytes / mib,
        "hf_footprint_MiB": model.get_memory_footprint() / mib,
        "tied_embeddings": tied,
    }


def release_memory(device: str = "cpu") -> None:
    """Return freed memory to the operating system after a model is deleted, so the next
    model's resident-memory reading does not start from the previous one's leftovers."""
    import ctypes
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: readings then include the allocator's cache


def add_memory_breakdown(runs: pd.DataFrame, load: Callable[[str, str], tuple[Any, Any]]) -> pd.DataFrame:
    """``runs`` with the :func:`memory_breakdown` columns, counted on each (model, method) loaded
    again by ``load(model, method)``, timing nothing: for runs stored before those columns were.
    Raises if a count differs from the stored ``weights_MiB`` or ``quant_state_MiB`` (the loaded
    models would then not be the ones that were timed)."""
    rows = []
    for (model_name, method), g in runs.groupby(["model", "method"], sort=False):
        model, _ = load(model_name, method)
        parts = memory_breakdown(model)
        del model
        release_memory()
        for col in ("weights_MiB", "quant_state_MiB"):
            if abs(parts[col] - g[col].iloc[0]) > 0.01:
                raise ValueError(
                    f"{model_name} {method}: {col} counted {parts[col]:.2f} MiB, stored {g[col].iloc[0]:.2f}"
                )
        rows.append(
            {
                "model": model_name,
                "method": method,
                **{k: parts[k] for k in ("linear_MiB", "embedding_MiB", "other_MiB", "total_MiB")},
            }
        )
    return runs.merge(pd.DataFrame(rows), on=["model", "method"], how="left")


# --------------------------------------------------------------------------- roofline figure
#: Size of the zoomed inset of crowded roofline markers and its title, as a fraction of its panel's width and height.
INSET = 0.4


def _fractions(values, limits) -> np.ndarray:
    """Where ``values`` sit along a log-scaled axis with ``limits``, as fractions of its length."""
    return np.log(np.asarray(values, float) / limits[0]) / np.log(limits[1] / limits[0])


def crowded(xs, ys, xlim, ylim, radius: float = 0.045) -> list[int]:
    """Indices of the largest group of points (two or more) that lie within ``radius`` of each other,
    chained, measured in fractions of a log-log panel with limits ``xlim`` and ``ylim``: markers
    there cover each other. Empty when no two points are that close."""
    fx, fy = _fractions(xs, xlim), _fractions(ys, ylim)
    group = list(range(len(fx)))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for i in range(len(fx)):
        for j in range(i):
            if np.hypot(fx[i] - fx[j], fy[i] - fy[j]) < radius:
                group[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i in range(len(fx)):
        members.setdefault(root(i), []).append(i)
    largest = max(members.values(), key=len, default=[])
    return largest if len(largest) >= 2 else []


def free_corner(fx, fy, pad: float = 0.03) -> tuple[float, float] | None:
    """Lower-left corner (panel fractions) of an :data:`INSET`-sized box in a corner of the panel
    that holds none of the points ``(fx, fy)`` (panel fractions; pass the samples of a line too),
    trying upper right, lower right, lower left, upper left; ``None`` if every corner is taken."""
    fx, fy = np.asarray(fx, float), np.asarray(fy, float)
    for x0, y0 in ((0.58, 0.57), (0.58, 0.08), (0.1, 0.08), (0.1, 0.57)):  # room for its tick labels
        inside = (fx > x0 - pad) & (fx < x0 + INSET + pad) & (fy > y0 - pad) & (fy < y0 + INSET + pad)
        if not inside.any():
            return x0, y0
    return None


def _zoom(ax, near: pd.DataFrame, corner: tuple[float, float], draw: Callable) -> None:
    """The inset of :func:`roofline_panel` at ``corner``: ``near``'s markers (``draw``), spread over
    the middle 60% of each axis, and a grey box on ``ax`` (its limits set) around the range it
    shows, padded by the markers' size and drawn over them."""
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import NullLocator

    inset = ax.inset_axes([*corner, INSET, INSET - 0.08])  # the top of the free corner holds its title
    draw(inset, near, 70, False)
    inset.set(xscale="log", yscale="log")
    box = []  # marked on the panel by a box, without connectors (they would cross markers)
    for axis, values, least in (
        (inset.xaxis, near.MiB_per_token, 1.005),
        (inset.yaxis, near.decode_tokens_per_s, 1.02),
    ):
        lo_v, hi_v = values.min(), values.max()
        half = max(hi_v / lo_v, least) ** 0.8  # the axis spans 1.6x the markers' spread (at least ``least``)
        low, high = np.sqrt(lo_v * hi_v) / half, np.sqrt(lo_v * hi_v) * half
        axis.set_view_interval(low, high, ignore=True)
        box.append((low, high))
        ticks = [lo_v, hi_v] if hi_v > lo_v * 1.001 else [lo_v]  # data values only: the lowest and the highest
        axis.set_ticks(ticks, [f"{t:.0f}" if t >= 100 else f"{t:.3g}" for t in ticks])
        axis.set_minor_locator(NullLocator())
    inset.tick_params(labelsize=6.5)
    inset.set_title("zoom: " + ", ".join(near.index), fontsize=7)  # the box on the panel marks its range
    for side in inset.spines.values():
        side.set_edgecolor("0.3")
    (x0, x1), (y0, y1) = box
    (xa, xb), (ya, yb) = ax.get_xlim(), ax.get_ylim()
    px, py = (xb / xa) ** 0.025, (yb / ya) ** 0.035  # 2.5% and 3.5% of the panel: about a marker's radius
    ax.add_patch(Rectangle((x0 / px, y0 / py), x1 * px - x0 / px, y1 * py - y0 / py, fill=False, edgecolor="0.3",
                           lw=1.1, zorder=5))  # fmt: skip


def roofline_panel(
    ax, d: pd.DataFrame, read_GBps: float, colors: dict, markers: dict, flagged: dict[str, str] | None = None
) -> None:
    """One model's batch-1 roofline on ``ax``: the bandwidth limit ``read_GBps`` (dashed), one marker
    per method (``d`` indexed by method with ``MiB_per_token``, ``decode_tokens_per_s``,
    ``roofline_tokens_per_s`` and ``share_of_limit``), a legend giving each method's speed and share
    of the limit, and, where markers cover each other (:func:`crowded`), a zoomed inset of them in a
    free corner (:func:`free_corner`; the y range grows until one is free). ``flagged``: method ->
    a note (such as "non-finite logits"), drawn hollow and named in the legend."""
    flagged = flagged or {}
    lo, hi = d.MiB_per_token.min() / 1.4, d.MiB_per_token.max() * 1.6
    xs = np.geomspace(lo, hi, 60)
    limit = read_GBps * 1e9 / (xs * 2**20)

    def draw(a, rows, size: float, label: bool) -> None:
        for method, r in rows.iterrows():
            text = f"{method}: {r.decode_tokens_per_s:.3g} tok/s, {r.share_of_limit:.0%} of the limit"
            a.scatter(r.MiB_per_token, r.decode_tokens_per_s, marker=markers[method], s=size, zorder=3,
                      facecolor="none" if method in flagged else colors[method],
                      edgecolor=colors[method] if method in flagged else "k", lw=1.4 if method in flagged else 0.6,
                      label=(text + (f" ({flagged[method]})" if method in flagged else "")) if label else None)  # fmt: skip

    ax.plot(xs, limit, "k--", lw=1, label=f"bandwidth limit ({read_GBps:.0f} GB/s read)")
    draw(ax, d, 60, True)
    ylim = (d.decode_tokens_per_s.min() / 1.8, d.roofline_tokens_per_s.max() * 1.3)
    near = d.iloc[crowded(d.MiB_per_token, d.decode_tokens_per_s, (lo, hi), ylim)]
    corner = None
    widened = [(ylim[0] / 1.4**g, ylim[1] * 1.4**h) for n in range(10) for g, h in ((n, 0), (0, n + 1))]
    points_x = np.r_[_fractions(d.MiB_per_token, (lo, hi)), _fractions(xs, (lo, hi))]  # x stays; y widens
    for y in widened if len(near) else []:  # widen the y range, least first, until a corner is free
        corner = free_corner(points_x, np.r_[_fractions(d.decode_tokens_per_s, y), _fractions(limit, y)])
        if corner is not None:
            ylim = y
            break
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=ylim)
    if corner is not None:
        _zoom(ax, near, corner, draw)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
