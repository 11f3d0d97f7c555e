"""Quality per model bit: text scored on shared character spans, paired intervals, precision
families and the equal-memory verdict (notebook 06; notebook 05 scores its text the same way).

**Shared character spans.** Perplexity per token depends on the tokenizer; bits per byte does
not. To compare two models with a *paired* bootstrap, every document is cut into spans of about
``span_bytes`` UTF-8 bytes at whitespace: the same spans for every model. A scored token belongs
to the span that holds its last character and carries the bytes from the end of the previous
token to its own end, so a document's tokens tile its bytes. A model's bits per byte on any set
of spans is ``sum NLL / ln 2 / sum bytes`` over their tokens; resampling spans with replacement,
the same spans for every model, gives paired intervals on differences. Tokens a model does not
score (the first of each window when its tokenizer adds no BOS) leave their bytes out of that
model's sums, so two models' byte counts may differ by a few bytes per window.

**Precision families.** Double quantization (``nf4-dq``) is a replicate of ``nf4``, ``int8-noout``
(no outlier decomposition) of ``int8``, ``fp16`` of ``bf16`` (the same 16 bits): each family is
one piece of evidence, represented by its first method in the registry's order.

**The equal-memory claim** (Dettmers & Zettlemoyer 2022): a larger model at a lower precision
beats a smaller model at a higher precision that needs at least as many bits.
:func:`equal_memory_pairs` lists the pairs of precision families at deployment precisions (16
bits and below); :func:`helpers.analysis.equal_memory_verdict`, with every other claim's verdict,
decides from those that are eligible.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import methods as registry
from .analysis import columns_ci
from .evaluation import token_windows
from .runtime import synchronize

LN2 = math.log(2)


# --------------------------------------------------------------------------- text and spans
@dataclass(frozen=True)
class Span:
    """Characters ``[start, stop)`` of document ``doc``."""

    doc: str
    start: int
    stop: int


def truncate(text: str, max_bytes: int | None) -> str:
    """The longest prefix of ``text`` of at most ``max_bytes`` UTF-8 bytes that ends at a paragraph
    break (or, if none lies in its second half, at whitespace); ``text`` itself if it fits."""
    if max_bytes is None or len(text.encode("utf-8")) <= max_bytes:
        return text
    head = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    cut = head.rfind("\n\n")
    if cut < len(head) // 2:
        cut = max(head.rfind(" "), head.rfind("\n"))
    if cut <= 0:
        raise ValueError(f"no whitespace in the first {max_bytes} bytes to cut the text at")
    return head[:cut].rstrip()


def split_spans(documents: dict[str, str], span_bytes: int) -> list[Span]:
    """Cut each document into spans of at least ``span_bytes`` bytes, ending after whitespace;
    a last piece shorter than half a span joins the span before it."""
    if span_bytes < 1:
        raise ValueError(f"span_bytes must be >= 1, got {span_bytes}")
    spans: list[Span] = []
    for doc, text in documents.items():
        start, size, first = 0, 0, len(spans)
        for word in re.finditer(r"\S+\s*", text):
            size += len(word.group().encode("utf-8"))
            if size >= span_bytes:
                spans.append(Span(doc, start, word.end()))
                start, size = word.end(), 0
        if start < len(text):
            if size < span_bytes / 2 and len(spans) > first:
                spans[-1] = Span(doc, spans[-1].start, len(text))
            else:
                spans.append(Span(doc, start, len(text)))
    return spans


def window_indices(n_tokens: int, window: int, has_bos: bool) -> list[list[int]]:
    """Token indices of each model input: :func:`helpers.evaluation.token_windows` applied to the
    positions ``0 .. n_tokens - 1``, with index 0 as the BOS when there is one (so both cut alike)."""
    return token_windows(list(range(n_tokens)), window, 0 if has_bos else None)


@dataclass
class TokenizedText:
    """One model's inputs for a set of documents and, per scored token (in input order), its span
    index and the UTF-8 bytes it covers."""

    windows: list[list[int]]
    span: np.ndarray  # [scored tokens] index into the spans
    n_bytes: np.ndarray  # [scored tokens]
    n_spans: int

    @property
    def n_scored(self) -> int:
        return len(self.span)

    def span_sums(self, values: np.ndarray) -> np.ndarray:
        """Per-token ``values`` summed over each span: ``[n_spans]``."""
        return np.bincount(self.span, weights=np.asarray(values, dtype=np.float64), minlength=self.n_spans)

    def span_bytes(self) -> np.ndarray:
        """Bytes of the scored tokens of each span."""
        return self.span_sums(self.n_bytes)

    def span_tokens(self) -> np.ndarray:
        """Scored tokens per span."""
        return self.span_sums(np.ones(self.n_scored))


def tokenize(tokenizer, documents: dict[str, str], spans: list[Span], window: int) -> TokenizedText:
    """Windows of every document (as :func:`helpers.evaluation.perplexity` cuts them) with the span
    and byte count of each scored token; ``tokenizer`` must return ``offset_mapping``."""
    bos = tokenizer.bos_token_id
    windows, span_of, nbytes = [], [], []
    for doc, text in documents.items():
        mine = [(i, s) for i, s in enumerate(spans) if s.doc == doc]
        if not mine:
            raise ValueError(f"no spans for document {doc!r}")
        enc = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        has_bos = bos is not None and bool(ids) and ids[0] == bos
        # bytes per token: from the end of the text already covered to the token's own end
        covered, tok_bytes, ends = 0, [], []
        for _, end in offsets:
            tok_bytes.append(len(text[covered:end].encode("utf-8")) if end > covered else 0)
            covered = max(covered, end)
            ends.append(end)
        stops = np.array([s.stop for _, s in mine])
        tok_span = mine[0][0] + np.minimum(np.searchsorted(stops, ends, side="left"), len(mine) - 1)
        for idx in window_indices(len(ids), window, has_bos):
            windows.append([ids[i] for i in idx])
            span_of += [int(tok_span[i]) for i in idx[1:]]
            nbytes += [tok_bytes[i] for i in idx[1:]]
    return TokenizedText(windows, np.array(span_of, dtype=np.int64), np.array(nbytes, dtype=np.float64), len(spans))


# --------------------------------------------------------------------------- scoring
@dataclass
class Scores:
    """Per scored token: negative log-likelihood (nats) and, if a reference was given,
    KL(reference || model) in nats; ``logprobs``: the model's own log-probabilities, kept in
    float16 when asked for (to serve as a later reference); ``window_s``: seconds of each
    window's forward call alone."""

    nll: np.ndarray
    kl: np.ndarray | None = None
    logprobs: list[torch.Tensor] | None = None
    window_s: list[float] | None = None

    def tokens_per_s(self, text: TokenizedText) -> float:
        """Forward speed over every window but the first, which serves as the warm-up call (one-time
        costs: allocation, kernel selection); NaN with a single window."""
        if not self.window_s or len(self.window_s) < 2:
            return float("nan")
        return sum(len(w) for w in text.windows[1:]) / sum(self.window_s[1:])


def kl_from_reference(reference: torch.Tensor, logp: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``KL(p || q)`` per row, ``p`` from stored reference log-probabilities (renormalised, since
    they are kept in float16), ``q = exp(logp)``; float32, in chunks of rows."""
    out = []
    for r, q in zip(reference.split(chunk), logp.split(chunk)):
        lp = torch.log_softmax(r.float(), dim=-1)
        out.append((lp.exp() * (lp - q.float())).sum(-1))
    return torch.cat(out)


@torch.inference_mode()
def score(
    model, text: TokenizedText, reference: list[torch.Tensor] | None = None, keep_logprobs: bool = False
) -> Scores:
    """Score every window of ``text``; log-softmax in float32 whatever the model's dtype. The
    forward calls are timed (device synchronised on both sides), the scoring around them is not."""
    if reference is not None and len(reference) != len(text.windows):
        raise ValueError(f"reference has {len(reference)} windows, text has {len(text.windows)}")
    device = next(model.parameters()).device
    nll, kl, kept, seconds = [], [], [], []
    for i, win in enumerate(text.windows):
        x = torch.tensor([win], device=device)
        synchronize(str(device))
        t0 = time.perf_counter()
        logits = model(x).logits
        synchronize(str(device))
        seconds.append(time.perf_counter() - t0)
        logp = torch.log_softmax(logits[0, :-1].float(), dim=-1).cpu()
        del logits
        nll.append(-logp.gather(1, x[0, 1:, None].cpu()).squeeze(1))
        if reference is not None:
            kl.append(kl_from_reference(reference[i], logp))
        if keep_logprobs:
            kept.append(logp.to(torch.float16))
        del logp
    return Scores(
        torch.cat(nll).double().numpy(),
        torch.cat(kl).double().numpy() if kl else None,
        kept if keep_logprobs else None,
        seconds,
    )


# --------------------------------------------------------------------------- paired intervals
def bpb_ci(nll: np.ndarray, n_bytes: np.ndarray, **kw) -> tuple[float, float, float]:
    """Bits per byte ``sum nll / ln 2 / sum bytes`` (per-span sums) with its interval."""
    return columns_ci({"nll": nll, "bytes": n_bytes}, lambda c: c["nll"] / c["bytes"] / LN2, **kw)


def bpb_difference_ci(
    nll_a: np.ndarray, bytes_a: np.ndarray, nll_b: np.ndarray, bytes_b: np.ndarray, **kw
) -> tuple[float, float, float]:
    """Bits per byte of A minus that of B on the same spans (negative: A is better), paired."""
    return columns_ci(
        {"na": nll_a, "ba": bytes_a, "nb": nll_b, "bb": bytes_b},
        lambda c: (c["na"] / c["ba"] - c["nb"] / c["bb"]) / LN2,
        **kw,
    )


def perplexity_change_ci(nll_a: np.ndarray, nll_b: np.ndarray, tokens: np.ndarray, **kw) -> tuple[float, float, float]:
    """``ppl_A / ppl_B - 1`` for two scorings of the same tokens (per-span sums), paired."""
    est, low, high = columns_ci({"a": nll_a, "b": nll_b, "n": tokens}, lambda c: (c["a"] - c["b"]) / c["n"], **kw)
    return math.expm1(est), math.expm1(low), math.expm1(high)


def mean_ci(values: np.ndarray, tokens: np.ndarray, **kw) -> tuple[float, float, float]:
    """Mean per token of a per-span sum (e.g. KL), with its interval."""
    return columns_ci({"v": values, "n": tokens}, lambda c: c["v"] / c["n"], **kw)


def cost_by_size(
    scored: dict[tuple[str, str], np.ndarray], reps: pd.DataFrame, reference: str = "fp32", **kw
) -> pd.DataFrame:
    """The cost of each precision against model size: for every (model, method) scored besides the
    reference, the relative increase of its log-loss over the same model's reference on the same
    spans (``sum nll / sum nll_ref - 1``, equal to the relative change in bits per byte), with its
    paired interval. ``reps``: one row per (model, method) with ``params`` and ``model_family``."""
    rows = []
    for r in reps.itertuples():
        if r.method == reference or (r.model, r.method) not in scored or (r.model, reference) not in scored:
            continue
        cols = {"m": scored[(r.model, r.method)], "ref": scored[(r.model, reference)]}
        est, low, high = columns_ci(cols, lambda c: c["m"] / c["ref"] - 1, **kw)
        rows.append(
            {
                "model": r.model,
                "model_family": r.model_family,
                "params": r.params,
                "method": r.method,
                "family": r.family,
                "logloss_increase": est,
                "low": low,
                "high": high,
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- families and the verdict
def precision_family(method: str) -> str:
    """``fp32``, ``16-bit`` (bf16, fp16), ``int8`` (int8, int8-noout), ``nf4`` (nf4, nf4-dq) or
    ``fp4`` (fp4, fp4-dq)."""
    spec = registry.get_method(method)
    if spec.kind == "float":
        return "fp32" if spec.nominal_bits >= 32 else f"{int(spec.nominal_bits)}-bit"
    return "int8" if spec.kind == "int8" else str(spec.quant_type)


def family_members(methods: Iterable[str]) -> dict[str, list[str]]:
    """``{family: [representative, *replicates]}`` for the given methods, in the registry's order
    (so ``bf16``, ``int8``, ``nf4``, ``fp4`` represent their families when present)."""
    given = set(methods)
    out: dict[str, list[str]] = {}
    for name in registry.METHODS:
        if name in given:
            out.setdefault(precision_family(name), []).append(name)
    unknown = given - set(registry.METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}")
    return out


def equal_memory_pairs(table: pd.DataFrame, max_precision_bits: float = 16, tolerance: float = 0.0) -> pd.DataFrame:
    """Candidate pairs for the equal-memory claim.

    ``table``: one row per (model, family) with ``model``, ``family``, ``params``,
    ``precision_bits`` (nominal bits per quantized weight) and ``total_bits``, optionally
    ``model_family`` (the architecture, e.g. ``qwen2``). A pair is the larger model (more
    parameters) at a family of fewer precision bits against the smaller model at a family of
    more, both at ``<= max_precision_bits``. Columns: ``larger``, ``larger_family``, ``smaller``,
    ``smaller_family``, both ``*_bits``, ``memory_ratio`` (larger / smaller), ``eligible`` (the
    larger needs at most ``1 + tolerance`` times the bits) and ``same_family`` (one model family:
    the pair differs in size and precision only; always true without ``model_family``).
    """
    need = {"model", "family", "params", "precision_bits", "total_bits"}
    if need - set(table.columns):
        raise ValueError(f"table lacks columns {sorted(need - set(table.columns))}")
    t = table[table.precision_bits <= max_precision_bits]
    arch = t.model_family if "model_family" in t else pd.Series("", index=t.index)
    rows = []
    for L, L_arch in zip(t.itertuples(), arch):
        for S, S_arch in zip(t.itertuples(), arch):
            if L.params > S.params and L.precision_bits < S.precision_bits:
                rows.append(
                    {
                        "larger": L.model,
                        "larger_family": L.family,
                        "smaller": S.model,
                        "smaller_family": S.family,
                        "larger_bits": L.total_bits,
                        "smaller_bits": S.total_bits,
                        "memory_ratio": L.total_bits / S.total_bits,
                        "eligible": L.total_bits <= S.total_bits * (1 + tolerance),
                        "same_family": L_arch == S_arch,
                    }
                )
    columns = ["larger", "larger_family", "smaller", "smaller_family", "larger_bits", "smaller_bits"]
    return pd.DataFrame(rows, columns=[*columns, "memory_ratio", "eligible", "same_family"])


def budget_pair(reps: pd.DataFrame) -> tuple[str, str]:
    """``(smaller, larger)`` model for the equal-memory reference lines: the smallest and largest
    model of the model family with the most models (ties: the family holding the largest model),
    or of all models when no ``model_family`` column is given."""
    sizes = reps.groupby("model").params.first()
    if "model_family" in reps:
        arch = reps.groupby("model").model_family.first()
        counts = arch.value_counts()
        best = max(counts.index, key=lambda a: (counts[a], sizes[arch == a].max()))
        sizes = sizes[arch == best]
    ordered = sizes.sort_values().index
    return ordered[0], ordered[-1]


# --------------------------------------------------------------------------- the GGUF-grid confound
def grid_confound(
    model: torch.nn.Module,
    gguf_types: dict[str, str],
    text: TokenizedText,
    methods: Iterable[str],
    noise_seed: int,
    fp32_nll: np.ndarray | None = None,
    **boot,
) -> tuple[pd.DataFrame, dict[tuple[str, str], np.ndarray]]:
    """Is a weight already on a coarse GGUF grid easier or harder to quantize than one that is not?

    For every block Linear of the fp32 ``model`` that ``gguf_types`` (GGUF tensor name -> type)
    names, two copies of its weight: the GGUF weights as loaded (``"GGUF grid"``), and the same
    plus uniform noise of +-half their GGUF step (``"off grid"``, :func:`helpers.gguf.off_grid`,
    seeded by ``noise_seed``). Each copy is round-tripped through every method (and ``"none"``), written
    into the model, and scored on ``text``. Rows: ``weights``, ``method``, ``perplexity``, the
    relative weight error ||q(W) - W|| / ||W|| over layers (mean, min, max), ``gguf_types`` and
    ``increase_over_own_fp32`` with its paired bootstrap interval (``boot``: ``n_boot``, ``seed``)
    against the same copy unquantized. ``fp32_nll``: the GGUF-grid copy's span sums when already
    scored (notebook 06 scores fp32 in its section 1). The model's weights are restored at the end.
    Returns ``(rows, {(weights, method): nll per span})``."""
    from .gguf import TENSOR_NAMES, off_grid
    from .models import block_linears
    from .quantization import roundtrip

    layers = {}
    for name, block, role, module in block_linears(model):
        gguf_type = gguf_types.get(f"blk.{block}.{TENSOR_NAMES.get(role, '?')}.weight")
        if gguf_type is not None:
            layers[name] = (module, gguf_type)
    if not layers:
        raise ValueError("no block Linear of the model has a GGUF type in gguf_types")
    original = {n: m.weight.detach().clone() for n, (m, _) in layers.items()}
    g = torch.Generator().manual_seed(noise_seed)
    noisy = {n: off_grid(original[n], t, g) for n, (_, t) in layers.items()}
    rows, scores = [], {}
    try:
        for variant, base in (("GGUF grid", original), ("off grid", noisy)):
            for method in ["none", *methods]:
                errors = []
                with torch.no_grad():
                    for n, (m, _) in layers.items():
                        w = base[n] if method == "none" else roundtrip(base[n], method).dequantized
                        errors.append(((w - base[n]).norm() / base[n].norm()).item())
                        m.weight.copy_(w)
                reuse = variant == "GGUF grid" and method == "none" and fp32_nll is not None
                nll = fp32_nll if reuse else text.span_sums(score(model, text).nll)
                scores[(variant, method)] = nll
                rows.append(
                    {
                        "weights": variant,
                        "method": method,
                        "perplexity": float(np.exp(nll.sum() / text.n_scored)),
                        "weight_rel_error": float(np.mean(errors)),
                        "weight_rel_error_min": float(np.min(errors)),
                        "weight_rel_error_max": float(np.max(errors)),
                        "gguf_types": ", ".join(sorted({t for _, t in layers.values()})),
                    }
                )
    finally:
        with torch.no_grad():
            for n, (m, _) in layers.items():
                m.weight.copy_(original[n])
    rows = pd.DataFrame(rows)
    cis = [
        perplexity_change_ci(scores[(r.weights, r.method)], scores[(r.weights, "none")], text.span_tokens(), **boot)
        for r in rows.itertuples()
    ]
    rows["increase_over_own_fp32"], rows["increase_low"], rows["increase_high"] = (list(x) for x in zip(*cis))
    return rows, scores


def grid_effect(
    confound: pd.DataFrame,
    scores: dict[tuple[str, str], np.ndarray],
    text: TokenizedText,
    bnb_nll: dict[str, np.ndarray],
    **boot,
) -> pd.DataFrame:
    """One row per method of :func:`grid_confound`'s ``confound`` and ``scores`` (one model): the
    perplexity increase on and off the grid, ``grid_vs_off_ppl_ratio`` = (1 + increase on the
    grid) / (1 + increase off it) - 1 with its paired bootstrap interval over spans, the weight
    errors and their ratio, and ``bpb_round_trip_minus_bnb_method``: bits per byte of the
    on-grid round trip minus those of the bitsandbytes method of the same name (``bnb_nll``, NaN
    where absent), which is 0 where both dequantize the same weights."""
    out = []
    for method in [m for m in dict.fromkeys(confound.method) if m != "none"]:
        c = confound[confound.method == method].set_index("weights")
        none = confound[confound.method == "none"].set_index("weights")
        cols = {
            k: scores[(w, m)]
            for k, w, m in (
                ("qg", "GGUF grid", method),
                ("ng", "GGUF grid", "none"),
                ("qo", "off grid", method),
                ("no", "off grid", "none"),
            )
        }
        est, lo, hi = columns_ci(
            {**cols, "n": text.span_tokens()}, lambda x: ((x["qg"] - x["ng"]) - (x["qo"] - x["no"])) / x["n"], **boot
        )
        bnb = bnb_nll.get(method)
        vs_bnb = (cols["qg"].sum() - bnb.sum()) / math.log(2) / text.span_bytes().sum() if bnb is not None else np.nan
        out.append(
            {
                "method": method,
                "increase_on_grid": c.increase_over_own_fp32["GGUF grid"],
                "increase_on_grid_low": c.increase_low["GGUF grid"],
                "increase_on_grid_high": c.increase_high["GGUF grid"],
                "increase_off_grid": c.increase_over_own_fp32["off grid"],
                "increase_off_grid_low": c.increase_low["off grid"],
                "increase_off_grid_high": c.increase_high["off grid"],
                "grid_vs_off_ppl_ratio": np.expm1(est),
                "grid_vs_off_low": np.expm1(lo),
                "grid_vs_off_high": np.expm1(hi),
                "weight_error_on_grid": c.weight_rel_error["GGUF grid"],
                "weight_error_off_grid": c.weight_rel_error["off grid"],
                "weight_error_ratio": c.weight_rel_error["GGUF grid"] / c.weight_rel_error["off grid"],
                "unquantized_perplexity_on_grid": none.perplexity["GGUF grid"],
                "unquantized_perplexity_off_grid": none.perplexity["off grid"],
                "bpb_round_trip_minus_bnb_method": vs_bnb,
            }
        )
    return pd.DataFrame(out)


def confound_words(effect: pd.DataFrame, tolerance: float = 0.05) -> str:
    """What :func:`grid_effect` says about the GGUF-grid confound, in one sentence: whether the
    grid changes the weight error (every on-grid / off-grid ratio within ``tolerance`` of 1, or
    not), and in how many (model, method) pairs the perplexity response on the grid is smaller,
    larger or not resolved (its 95% interval containing 0)."""
    ratio = effect.weight_error_ratio
    same = bool(((ratio - 1).abs() <= tolerance).all())
    weights = (
        f"the GGUF grid changes the weight error by less than {tolerance:.0%} (on-grid / off-grid {ratio.min():.3f} to "
        f"{ratio.max():.3f})"
        if same
        else f"the weight error differs on and off the grid (on-grid / off-grid {ratio.min():.3f} to {ratio.max():.3f})"
    )
    smaller = int((effect.grid_vs_off_high < 0).sum())
    larger = int((effect.grid_vs_off_low > 0).sum())
    rest = len(effect) - smaller - larger
    return (
        f"{weights}; the perplexity response on the grid is smaller in {smaller}, larger in {larger} and not resolved "
        f"in {rest} of {len(effect)} (model, method) pairs"
    )


# --------------------------------------------------------------------------- figures of notebook 06
def kbit_panel(ax, reps: pd.DataFrame, y: str, low: str, high: str, x: str, colors: dict, markers: dict) -> None:
    """One panel of the k-bit figure: per model (``colors``) a line through its precision families
    from most to fewest bits, each family's marker (``markers``) with its interval ``low``..``high``.
    fp4 stays off the line, a lone marker drawn 3% right of nf4 (they hold the same bits). ``x``:
    a column of total bits, drawn in Mbit on a log axis with plain tick labels."""
    from .notebook import log_axis

    for model, t in reps.dropna(subset=[y]).groupby("model", sort=False):
        t = t.sort_values(x, ascending=False)
        path = t[t.family != "fp4"]
        ax.plot(path[x] / 1e6, path[y], "-", color=colors[model], lw=1.5, zorder=1)
        for r in t.itertuples():
            value = getattr(r, y)
            ax.errorbar(getattr(r, x) / 1e6 * (1.03 if r.family == "fp4" else 1.0), value,
                        yerr=[[value - getattr(r, low)], [getattr(r, high) - value]], fmt=markers.get(r.family, "o"),
                        color=colors[model], ms=7, capsize=3, zorder=2)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlim(reps[x].min() / 1e6 / 1.25, reps[x].max() / 1e6 * 1.25)
    log_axis(ax.xaxis, subs=(1, 2, 4))


def plot_confound(confound: pd.DataFrame, models: list[str], methods: list[str]):
    """Notebook 06's GGUF-grid figure from :func:`grid_confound` rows (with ``model``): per model
    (columns) the relative weight error (top, log scale, bars min-max over layers) and the
    perplexity response (bottom, bars 95% intervals) of each weight round trip, on the GGUF grid and
    off it, each value printed beside its marker. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from .notebook import log_axis

    fig, axes = plt.subplots(2, len(models), figsize=(5.6 * len(models), 8), squeeze=False, sharey="row")
    variants = {"GGUF grid": ("C0", "o", -0.15, -1), "off grid": ("C1", "s", 0.15, 1)}  # colour, marker, dx, label side
    rows = (("weight_rel_error", "weight_rel_error_min", "weight_rel_error_max", "weight error", "{:.3f}"),
            ("increase_over_own_fp32", "increase_low", "increase_high", "perplexity response", "{:+.1%}"))  # fmt: skip
    x_of = {m: i for i, m in enumerate(methods)}
    for col, model in enumerate(models):
        c = confound[(confound.model == model) & (confound.method != "none")]
        for row, (y, lo, hi, what, fmt) in enumerate(rows):
            ax = axes[row, col]
            for variant, (color, marker, dx, side) in variants.items():
                v = c[c.weights == variant]
                xs = np.array([x_of[m] for m in v.method]) + dx
                ax.errorbar(xs, v[y], yerr=[v[y] - v[lo], v[hi] - v[y]], fmt=marker, color=color, ms=7, capsize=4,
                            label=variant)  # fmt: skip
                for x, value in zip(xs, v[y]):
                    ax.annotate(fmt.format(value), (x, value), xytext=(7 * side, 0), textcoords="offset points",
                                fontsize=8, va="center", ha="left" if side > 0 else "right", color=color,
                                bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.85))  # fmt: skip
            ax.set_xticks(range(len(methods)), methods)
            ax.set_xlim(-0.6, len(methods) - 0.4)
            ax.set_xlabel("weight round trip (bitsandbytes)")
            ax.set_title(f"{model}: {what}", fontsize=10)
        axes[0, col].set_yscale("log")
        log_axis(axes[0, col].yaxis)
        axes[1, col].axhline(0, color="0.5", lw=0.8)
        axes[1, col].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+.0%}"))
    axes[0, 0].set_ylabel("relative weight error ‖q(W) − W‖ / ‖W‖\n(log scale; mean over layers, bars: min–max)")
    axes[1, 0].set_ylabel("perplexity increase over the same\nweights unquantized (bars: 95% interval)")
    axes[0, 0].legend(title="weights quantized", fontsize=9, loc="upper left")
    fig.suptitle("Does the GGUF grid the baselines sit on change the quantization error?", fontsize=12, y=1.01)
    fig.tight_layout()
    return fig
