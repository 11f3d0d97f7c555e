"""Generations judged by a model that did not write them, with a measure that loops cannot fool.

**Why another judge.** The sweep scores a generation under its own model's fp32 (``ref_nll``).
That judge is biased at low temperature: fp32's greedy text is its own mode, so any method whose
text differs looks worse whatever its quality. An *independent* judge, the fp32 model of the
other embedded family, reads the prompt and the continuation as text, re-tokenized with its own
tokenizer. Its log-loss is counted per UTF-8 byte of the continuation, so judges with different
tokenizers give comparable numbers (and so does the self-judge, per byte of the same text).

**Why not log-loss alone.** Likelihood rewards repetition (Holtzman et al. 2020, "The Curious
Case of Neural Text Degeneration"): once a phrase has been said, any language model predicts its
copy almost for free, so a loop gets a *lower* log-loss than fluent text. The measure the
verdicts read is therefore **bits per novel byte**: all the judge's bits for the continuation
divided by the bytes that add something new. A byte is *not* novel when the ``NOVEL_SPAN`` bytes
ending at it already occurred earlier in the continuation (a copy). For fluent text nearly every
byte is novel, so the measure is close to bits per byte; a loop's copies add no novel bytes, so
the bits it spends on them and on its first occurrence are spread over that first occurrence
only, and a repeated phrase scores worse than fluent text although its log-loss is lower
(``tests/test_judge.py`` checks this on a real judge; notebook 04 shows it as a control).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from . import analysis, stats
from . import methods as registry
from .generation import token_nll
from .store import ResultStore, code_digest

NOVEL_SPAN = 16  # bytes: a copy of at least this many bytes is repetition, not new text (about 3 words)
LN2 = math.log(2)


def bits_per(column: str) -> analysis.Measure:
    """The judge's bits per ``column`` (summed over a prompt's seeds) relative to the reference's on
    the same prompts and seeds: ``R = (bits / column) / (ref_bits / ref_column) - 1``."""
    return analysis.Measure(
        ("bits", column),
        lambda bits, n, ref_bits, ref_n: (bits / n) / (ref_bits / ref_n) - 1,
        ("prompt_id",),
        lambda s, p: s[f"{p}bits"] / s[f"{p}{column}"],
    )


JUDGED = bits_per("novel_bytes")  #: the generations' measure: bits per novel byte
PER_BYTE = bits_per("bytes")  #: likelihood alone (rewards loops): bits per byte
CONTROL = "ctrl-repeat"  # the control of a degenerate text (:func:`repeated_phrase_control`)


def novel_bytes(text: str, span: int = NOVEL_SPAN) -> int:
    """Bytes of ``text`` (UTF-8) that are not copies: a byte counts unless the ``span`` bytes
    ending at it already occurred, as a whole, earlier in ``text``. The first ``span - 1`` bytes
    always count. Catches loops with or without spaces ("la la la", "=====")."""
    data = text.encode("utf-8")
    seen: set[bytes] = set()
    novel = min(len(data), span - 1)
    for end in range(span, len(data) + 1):
        gram = data[end - span : end]
        if gram not in seen:
            novel += 1
            seen.add(gram)
    return novel


def continuation_nll(
    model, tokenizer, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """``(nats, tokens)``: the judge's total negative log-likelihood (nats) of each continuation
    given its prompt, and the number of judge tokens it was cut into.

    The prompt is tokenized as the judge's own generation would be (with its special tokens), the
    continuation on its own (without), and the two are joined: a valid tokenization of the text,
    scored exactly (:func:`helpers.generation.token_nll`)."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    heads = [tokenizer(p)["input_ids"] for p in prompts]
    tails = [tokenizer(c, add_special_tokens=False)["input_ids"] if c else [] for c in continuations]
    nll = token_nll(model, heads, tails, pad, batch_size)
    return np.array([x.sum().item() for x in nll], dtype=float), np.array([len(t) for t in tails])


def text_scores(nats: np.ndarray, texts: Sequence[str]) -> pd.DataFrame:
    """Per text: ``bits`` (the judge's, for the whole continuation), ``bytes``, ``novel_bytes``,
    ``bits_per_byte`` and ``bits_per_novel_byte`` (NaN for an empty text)."""
    n_bytes = np.array([len(t.encode("utf-8")) for t in texts], dtype=float)
    novel = np.array([novel_bytes(t) for t in texts], dtype=float)
    bits = np.asarray(nats, dtype=float) / LN2
    with np.errstate(divide="ignore", invalid="ignore"):
        return pd.DataFrame(
            {
                "bits": bits,
                "bytes": n_bytes,
                "novel_bytes": novel,
                "bits_per_byte": np.where(n_bytes > 0, bits / n_bytes, np.nan),
                "bits_per_novel_byte": np.where(novel > 0, bits / novel, np.nan),
            }
        )


def self_judge(generations: pd.DataFrame) -> pd.DataFrame:
    """The sweep's own judge (the generating model's fp32, ``ref_nll`` per token on the model's
    own tokens) in the same units: :func:`text_scores` of ``ref_nll * n_tokens``. Needs no model."""
    texts = generations.text.fillna("").tolist()
    nats = (generations.ref_nll * generations.n_tokens).fillna(0.0).to_numpy()
    out = text_scores(nats, texts)
    out.index = generations.index
    return out


def repeated_phrase(text: str, words: int = 6) -> str:
    """The control of a degenerate continuation: the first ``words`` words of ``text`` repeated
    until it is at least as long (in bytes) as ``text``. Fluent in every piece, a loop as a whole."""
    pieces = text.split(" ")
    lead = "" if pieces[0] else " "  # keep a leading space, the continuation's first character
    phrase = " ".join(p for p in pieces[: words + (0 if pieces[0] else 1)] if p)
    if not phrase:
        return text
    out = lead + phrase
    while len(out.encode("utf-8")) < len(text.encode("utf-8")):
        out += " " + phrase
    return out


def check_judges(judges: dict[str, str], models: Sequence[str], prompt_ids: set[str], used_ids: set[str]) -> None:
    """Fail before any model loads: every generating model needs a judge other than itself, and
    the prompts file must hold every prompt the generations used."""
    missing = [m for m in models if m not in judges]
    if missing:
        raise ValueError(f"no independent judge for {missing}: add them to independent_judges {judges}")
    same = [m for m in models if judges[m] == m]
    if same:
        raise ValueError(f"{same} would judge their own generations: an independent judge is another model")
    unknown = sorted(used_ids - prompt_ids)
    if unknown:
        raise ValueError(f"the generations used prompts {unknown[:5]} that the prompts file does not hold")


def _texts_digest(rows: pd.DataFrame) -> str:
    payload = "\x1e".join(f"{p}\x1f{s}\x1f{t}" for p, s, t in zip(rows.prompt_id, rows["sample"], rows.text))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


def judge_generations(
    generations: pd.DataFrame,
    prompts: pd.DataFrame,
    judges: dict[str, str],
    folder,
    device: str = "cpu",
    compute_dtype: str = "auto",
    batch_size: int = 8,
    progress: Callable | None = None,
) -> pd.DataFrame:
    """Score the generations (``text`` of the longest length) of each model in ``judges`` with the
    fp32 model it maps to; one stored unit per (judge, model, method, temperature, top-k), keyed by
    its texts, so a rerun resumes and changed generations are scored again. Identical (prompt,
    text) pairs are scored once per judge. Returns :func:`text_scores` per generation with the
    generation's key columns and ``judge``. ``progress``: a tqdm-like class (default
    ``tqdm.auto.tqdm``), one bar of texts per judge and model."""
    if progress is None:
        from tqdm.auto import tqdm as progress
    store = ResultStore(folder, ("judge", "model", "method", "temperature", "top_k"))
    code = code_digest(continuation_nll, text_scores, novel_bytes, registry.load)
    gen = generations[generations.max_new_tokens == generations.max_new_tokens.max()]
    gen = gen.assign(text=gen.text.fillna(""))
    prompt_text = prompts.set_index("id").prompt
    unit_by = ["model", "method", "temperature", "top_k"]
    groups = {key: g for key, g in gen.groupby(unit_by)}

    keys = {
        u: {"judge": judges[u[0]], **dict(zip(unit_by, u)), "texts": _texts_digest(g), "code": code}
        for u, g in groups.items()
        if u[0] in judges
    }
    for model, judge in judges.items():
        todo = {u: g for u, g in groups.items() if u[0] == model and not store.done(keys[u])}
        if not todo:
            continue
        pairs = list(dict.fromkeys((prompt_text[p], t) for g in todo.values() for p, t in zip(g.prompt_id, g.text)))
        judge_model, judge_tok = registry.load(judge, "fp32", device, compute_dtype)
        nats: dict[tuple[str, str], tuple[float, int]] = {}
        chunk = 16 * batch_size
        with progress(total=len(pairs), desc=f"{judge} judging {model}'s texts") as bar:
            for start in range(0, len(pairs), chunk):  # chunks only to drive the progress bar
                part = pairs[start : start + chunk]
                n, k = continuation_nll(judge_model, judge_tok, *zip(*part), batch_size=batch_size)
                nats.update(zip(part, zip(n, k)))
                bar.update(len(part))
        for unit, g in todo.items():
            scored = [nats[(prompt_text[p], t)] for p, t in zip(g.prompt_id, g.text)]
            rows = text_scores(np.array([s[0] for s in scored]), g.text.tolist())
            rows.insert(0, "judge_tokens", [s[1] for s in scored])
            rows.insert(0, "sample", g["sample"].to_numpy())
            rows.insert(0, "prompt_id", g.prompt_id.to_numpy())
            store.write(keys[unit], rows, notebook="04_temperature_sensitivity", device=device)
        del judge_model
    wanted = {tuple(k.values()) for k in keys.values()}
    out = store.read()
    fields = ["judge", *unit_by, "texts", "code"]
    return out[[tuple(r) in wanted for r in out[fields].itertuples(index=False)]].reset_index(drop=True)


def paired_blocks(scored: pd.DataFrame, reference: str = "fp32") -> pd.DataFrame:
    """Per (model, judge view, method, T, top-k, prompt): the method's ``bits`` and ``novel_bytes``
    summed over the seeds, beside the reference's (``ref_bits``, ``ref_novel_bytes``) on the same
    prompts and seeds; a seed missing on either side is left out of both. ``scored``: one row per
    generation with ``model, view, method, temperature, top_k, prompt_id, sample, bits,
    novel_bytes``. The rows :func:`helpers.analysis.temperature_claims` reads with :data:`JUDGED`."""
    key = ["model", "view", "temperature", "top_k", "prompt_id", "sample"]
    summed = ["bits", "bytes", "novel_bytes"]
    ref = scored[scored.method == reference].set_index(key)[summed].add_prefix("ref_")
    pairs = scored.join(ref, on=key).dropna(subset=[*summed, *ref.columns])
    keep = ["model", "view", "method", "temperature", "top_k", "prompt_id"]
    return pairs.groupby(keep, as_index=False)[[*summed, *ref.columns]].sum()


def repeated_phrase_control(generations: pd.DataFrame, reference: str, temperature: float) -> pd.DataFrame:
    """The reference's generations at ``temperature`` (the nearest sampled one), each turned into
    :func:`repeated_phrase` of itself, as rows of method :data:`CONTROL`: fluent pieces, a loop as
    a whole. Judged like a method, it must come out worse than the reference."""
    ref = generations[(generations.method == reference) & (generations.temperature > 0)]
    if ref.empty:
        return ref.assign(method=CONTROL)
    nearest = min(ref.temperature.unique(), key=lambda t: abs(t - temperature))
    ref = ref[ref.temperature == nearest]
    return ref.assign(method=CONTROL, text=ref.text.fillna("").map(repeated_phrase))


def scored_views(
    generations: pd.DataFrame, independent: pd.DataFrame, self_control: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per judged generation and view: ``self`` (:func:`self_judge`, and the stored
    re-tokenized scores of the control under its own model, ``self_control``) and ``independent``
    (:func:`judge_generations`); generations whose logits overflowed are left out. Keeps the
    generations' loop and distinct-n columns beside the scores."""
    key = ["model", "method", "temperature", "top_k", "prompt_id", "sample"]
    gen = generations[generations.finite.astype(bool)]
    extra = gen.set_index(key)[["in_loop", "distinct_2"]]
    own = gen[key].join(self_judge(gen)).assign(view="self")
    parts = [own]
    if self_control is not None and len(self_control):
        parts.append(self_control.assign(view="self"))
    parts.append(independent.assign(view="independent"))
    cols = [*key, "view", "bits", "bytes", "novel_bytes", "bits_per_byte", "bits_per_novel_byte"]
    out = pd.concat([p[cols] for p in parts], ignore_index=True).join(extra, on=key)
    return out[out.method.eq(CONTROL) | out.in_loop.notna()].reset_index(drop=True)


def greedy_loop_claims(
    generations: pd.DataFrame, reference: str = "fp32", n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """The greedy-loop instrument (the longest greedy generations, one per prompt): C3, per 4-bit
    family, ``loop share(method) - loop share(reference) > 0`` (4-bit degenerates more at the
    lowest temperature), and C2's later version, ``loop share(fp4) - loop share(nf4) > 0`` (nf4
    more resilient at low T), paired per prompt, twins averaged. One row per statistic per model."""
    g = generations[(generations.temperature == 0) & generations.finite]
    g = g[g.max_new_tokens == g.max_new_tokens.max()].assign(method=lambda d: d.method.map(analysis.family))
    rows = []
    for model, m in g.groupby("model", sort=False):
        loops = m.pivot_table(index="prompt_id", columns="method", values="in_loop", aggfunc="mean")
        tests = [
            ("C3", "first", f, f, reference, "loops more than fp32 at greedy", "loops less") for f in ("nf4", "fp4")
        ]
        tests.append(("C2", "later", "nf4 vs fp4", "fp4", "nf4", "nf4 more resilient at low T", "fp4 more resilient"))
        for claim, version, subject, a, b, positive, negative in tests:
            if not {a, b} <= set(loops.columns):
                continue
            x = loops[[a, b]].dropna().to_numpy()
            est, lo, hi = stats.bootstrap_ci_of(x, lambda c: c[..., 0] - c[..., 1], n_boot, level, seed)
            rows.append(
                {
                    "model": model,
                    "claim": claim,
                    "version": version,
                    "subject": subject,
                    "statistic": f"loop share {a} - {b} at greedy",
                    "estimate": est,
                    "ci_low": lo,
                    "ci_high": hi,
                    "verdict": analysis.sign_verdict(lo, hi),
                    "direction": positive if est > 0 else negative,
                }
            )
    return pd.DataFrame(rows)


def own_rates(judged: pd.DataFrame) -> pd.DataFrame:
    """Every method's own loop share and distinct-2 per (model, method, T), from the judged
    generations (:func:`scored_views`; one view, so each generation counts once)."""
    return judged[judged.view == "self"].groupby(["model", "method", "temperature"])[["in_loop", "distinct_2"]].mean()


def plot_generations(
    curve: pd.DataFrame,
    rates: pd.DataFrame,
    models: Sequence[str],
    judges: dict[str, str],
    methods: Sequence[str],
    palette: dict[str, str],
    bands: dict[str, Sequence[float]],
    reference: str = "fp32",
):
    """Notebook 04's generations figure, one column per model. Rows 1-2: the relative loss ``R``
    under the independent judge and the self-judge (``curve``: :func:`helpers.analysis.loss_curve`
    rows with a ``measure`` column), per novel byte (solid, with intervals) and per byte (dotted),
    greedy as separate markers and :data:`CONTROL` as a diamond; rows 3-4: every method's own loop
    share and distinct-2 (``rates``, :func:`own_rates`). ``bands``: ``name -> (T low, T high)``,
    hatched on every panel (:func:`helpers.notebook.shade_bands`). Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from .notebook import band_handles, shade_bands

    rows = [
        ("independent", "R, independent judge\n(> 0: worse than fp32)"),
        ("self", "R, self-judge\n(> 0: worse than fp32)"),
    ]
    fig, axes = plt.subplots(4, len(models), figsize=(6.4 * len(models), 12.5), sharex=True, squeeze=False)
    for col, model in enumerate(models):
        for row, (view, label) in enumerate(rows):
            ax = axes[row, col]
            for method in [*methods, CONTROL]:
                for name, ls in (("bits per novel byte", "-"), ("bits per byte", ":")):
                    t = curve[(curve.model == model) & (curve.view == view) & (curve.method == method)]
                    t = t[t.measure == name].sort_values("temperature")
                    if method == CONTROL:  # its per-byte R (about -0.6) would squeeze the axis: printed instead
                        if ls == "-":
                            err = [t.R - t.R_low, t.R_high - t.R]
                            ax.errorbar(t.temperature, t.R, yerr=err, color=palette[method], marker="D", ms=6,
                                        ls="none", capsize=3)  # fmt: skip
                        continue
                    hot, greedy = t[t.temperature > 0], t[t.temperature == 0]
                    solid = ls == "-"
                    ax.plot(hot.temperature, hot.R, color=palette[method], ls=ls, marker="o" if solid else None, ms=3,
                            lw=1.8 if solid else 1, alpha=1 if solid else 0.8)  # fmt: skip
                    ax.plot(greedy.temperature, greedy.R, color=palette[method], ls="none",
                            marker="s" if solid else "_", ms=6)  # fmt: skip
                    if solid:
                        ax.fill_between(hot.temperature, hot.R_low, hot.R_high, color=palette[method], alpha=0.15, lw=0)
            ax.axhline(0, color="black", lw=1)
            ax.set_ylabel(label)
        axes[0, col].set_title(f"{model}: judged by {judges.get(model, '?')}")
        axes[1, col].set_title(f"{model}: judged by itself (fp32)")
        for row, (metric, label) in enumerate((("in_loop", "share ending in a loop"), ("distinct_2", "distinct-2")), 2):
            for method in [reference, *methods]:
                t = rates.loc[(model, method)][metric]
                hot, greedy = t[t.index > 0], t[t.index == 0]
                colour = palette.get(method, "black")
                axes[row, col].plot(hot.index, hot.to_numpy(), color=colour, ls="--" if method == reference else "-",
                                    marker="o", ms=3)  # fmt: skip
                axes[row, col].plot(greedy.index, greedy.to_numpy(), color=colour, marker="s", ms=6)
            axes[row, col].set_ylabel(label)
        for ax in axes[:, col]:
            shade_bands(ax, bands)
        axes[-1, col].set_xlabel("temperature T (0 = greedy)")
    handles = [
        *(Line2D([], [], color=palette[m], lw=1.8, label=m) for m in methods),
        Line2D([], [], color=palette.get(reference, "black"), ls="--", label=f"{reference} (rows 3-4)"),
        Line2D([], [], color="black", lw=1, label="R = 0: as good as fp32 (rows 1-2)"),
        Line2D([], [], color="0.3", ls="-", lw=1.8, marker="o", ms=3, label="R in bits per novel byte (the measure)"),
        Line2D([], [], color="0.3", ls=":", label="R in bits per byte (likelihood alone)"),
        Line2D([], [], color="0.3", marker="s", ls="none", label="greedy (T = 0)"),
        Line2D([], [], color=palette[CONTROL], marker="D", ls="none", label=f"{CONTROL} control, per novel byte"),
        *band_handles(bands),
    ]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9, bbox_to_anchor=(0.5, -0.05))
    return fig
