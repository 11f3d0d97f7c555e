"""Running text one document at a time: perplexity, a flag for documents a model may have
memorised, and whether a claim's verdict rests on the flagged documents.

A model that has seen a document many times in pretraining predicts it far better than text it
has never seen. Such a document still shows what quantization changes, but a verdict must not
rest on it alone, so every claim is also decided without the flagged documents (notebook 04).
The flag is a stated rule, not a proof of memorisation: the reference model's perplexity on the
document is below ``below`` times its perplexity on the text written for this compendium, which
no model has seen. Code is more predictable than prose to a code model even when unseen, so a
flagged code file means "far more predictable than unseen prose", memorised or not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from .analysis import BLOCK_KEY, columns_ci

#: The document written for this compendium: the one no model has seen (never flagged).
UNSEEN = "heldout_english"


def kinds(manifest: str | Path) -> dict[str, str]:
    """``{document id: kind}`` from the text manifest's ``kind`` column ("Python source code" ...)."""
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    if "kind" not in table:
        return dict.fromkeys(table.id, "")
    return dict(zip(table.id, table.kind))


def perplexity_by_document(
    blocks: pd.DataFrame, reference: str = "fp32", temperature: float = 1.0, n_boot: int = 1000
) -> pd.DataFrame:
    """Per model, document and method: tokens scored, perplexity at ``temperature`` (top-k off),
    and the method's log-loss increase over the reference in percent with a 95% paired bootstrap
    interval over blocks. The reference's own row comes from the ``ref_logloss`` the methods'
    rows carry (the same for every method), so its increase is 0.

    ``blocks``: nominal block sums (:meth:`helpers.textscore.TextStudy.collect`)."""
    at = blocks[(blocks.view == "nominal") & (blocks.top_k == 0) & np.isclose(blocks.temperature, temperature)]
    if at.empty:
        raise ValueError(f"no nominal rows at temperature {temperature} with top-k off")
    rows = []
    for (model, doc), g in at.groupby(["model", "doc"], sort=False):
        ref = g[g.method == g.method.iloc[0]]
        n = float(ref.n.sum())
        rows.append(
            {
                "model": model,
                "doc": doc,
                "method": reference,
                "tokens": int(n),
                "perplexity": float(np.exp(ref.ref_logloss.sum() / n)),
                "increase_pct": 0.0,
                "ci_low": 0.0,
                "ci_high": 0.0,
            }
        )
        for method, h in g.groupby("method", sort=False):
            est, lo, hi = columns_ci(
                {"m": h.logloss.to_numpy(), "r": h.ref_logloss.to_numpy()},
                lambda c: 100 * (c["m"] / c["r"] - 1),
                n_boot,
            )
            rows.append(
                {
                    "model": model,
                    "doc": doc,
                    "method": method,
                    "tokens": int(h.n.sum()),
                    "perplexity": float(np.exp(h.logloss.sum() / h.n.sum())),
                    "increase_pct": est,
                    "ci_low": lo,
                    "ci_high": hi,
                }
            )
    return pd.DataFrame(rows)


def flag_memorized(
    table: pd.DataFrame, reference: str = "fp32", below: float = 0.5, unseen: str = UNSEEN
) -> pd.DataFrame:
    """``table`` (:func:`perplexity_by_document`) with ``unseen_perplexity`` (the reference's on
    the unseen document, same model), ``ratio`` (the reference's perplexity on the document over
    it) and ``flagged`` (``ratio < below``; the unseen document never is)."""
    if not 0 < below <= 1:
        raise ValueError(f"below must be in (0, 1], got {below}")
    ref = table[table.method == reference].set_index(["model", "doc"]).perplexity
    unseen_ppl = ref[ref.index.get_level_values("doc") == unseen].droplevel("doc")
    if missing := sorted(set(table.model) - set(unseen_ppl.index)):
        raise ValueError(f"no {reference} perplexity on the unseen document {unseen!r} for {missing}")
    base = table.model.map(unseen_ppl)
    ratio = pd.Series(pd.MultiIndex.from_frame(table[["model", "doc"]]).map(ref), index=table.index) / base
    return table.assign(unseen_perplexity=base, ratio=ratio, flagged=(ratio < below) & (table.doc != unseen))


def flagged_pairs(table: pd.DataFrame) -> set[tuple[str, str]]:
    """The ``(model, document)`` pairs flagged by :func:`flag_memorized`."""
    return set(map(tuple, table.loc[table.flagged, ["model", "doc"]].drop_duplicates().to_numpy()))


def claims_by_document(
    blocks: pd.DataFrame,
    flagged: Iterable[tuple[str, str]],
    claims_of: Callable[[pd.DataFrame], pd.DataFrame],
) -> pd.DataFrame:
    """Every claim per model decided on each document alone, on all documents (``all``) and on
    the documents not flagged for that model (``unflagged``), in a ``documents`` column.

    ``blocks``: one view's block sums of every model (columns ``model``, ``doc`` ...);
    ``claims_of``: one model's blocks -> its claim rows
    (:func:`helpers.analysis.temperature_claims` with the notebook's bands)."""
    flagged = set(flagged)
    out = []
    for model, g in blocks.groupby("model", sort=False):
        subsets = {"all": g, "unflagged": g[[(model, d) not in flagged for d in g.doc]]}
        subsets.update({doc: h for doc, h in g.groupby("doc", sort=False)})
        for name, h in subsets.items():
            if not h.empty:
                out.append(claims_of(h).assign(model=model, documents=name, blocks=len(h.drop_duplicates(BLOCK_KEY))))
    return pd.concat(out, ignore_index=True)


def document_check(claims: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, claim, version, subject) of :func:`claims_by_document`: the verdict on
    each subset of documents side by side, and ``changes_without_flagged``: the verdict on all
    documents is not the verdict without the flagged ones (they carried it, or, where the verdict
    appears only without them, they masked it; fewer blocks can also widen an interval)."""
    keys = ["model", "claim", "version", "subject"]
    order = list(dict.fromkeys(claims.documents))
    wide = claims.pivot_table(index=keys, columns="documents", values="verdict", aggfunc="first", sort=False)[order]
    wide.columns.name = None
    return wide.assign(changes_without_flagged=wide["all"] != wide["unflagged"]).reset_index()


def summary_lines(table: pd.DataFrame, check: pd.DataFrame, below: float, near_rule: float = 0.1) -> list[str]:
    """Plain lines: which documents are flagged for which model (perplexity against the unseen
    text's), which lie within ``near_rule`` (relative) of the rule either way, and which verdicts
    on all documents are not the verdicts without the flagged documents."""
    ref = table[table.flagged].drop_duplicates(["model", "doc"])
    flagged = "; ".join(
        f"{r.model} on {r.doc} ({r.ratio:.2f}x: perplexity {r.perplexity_ref:.1f} against {r.unseen_perplexity:.1f})"
        for r in ref.assign(perplexity_ref=ref.unseen_perplexity * ref.ratio).itertuples()
    )
    lines = [
        f"Flagged as possibly memorised (reference perplexity below {below:g}x the unseen text's): {flagged or 'none'}."
    ]
    rows = table.drop_duplicates(["model", "doc"])
    near = rows[(rows.doc != UNSEEN) & ((rows.ratio / below - 1).abs() < near_rule)]
    if len(near):
        lines.append(
            f"Within {near_rule:.0%} of the rule, so flagged or not by a small change of it: "
            + "; ".join(f"{r.model} on {r.doc} ({r.ratio:.2f}x)" for r in near.itertuples())
            + "."
        )
    moved = check[check.changes_without_flagged]
    if moved.empty:
        lines.append("No verdict changes without the flagged documents.")
    else:
        lines.append(
            "Verdicts that change without the flagged documents (all documents -> without them): "
            + "; ".join(
                f"{r.claim} ({r.version}) {r.subject} on {r.model}: {r.all} -> {r.unflagged}"
                for r in moved.itertuples()
            )
            + "."
        )
    return lines


def plot_by_document(
    table: pd.DataFrame,
    models: list[str],
    methods: list[str],
    palette: dict[str, str],
    kind: dict[str, str],
    reference: str = "fp32",
    below: float = 0.5,
    model_colors: dict | None = None,
):
    """Left: the reference's perplexity per document and model (log scale; flagged documents
    hatched; ``model_colors``, by default matplotlib's tab10 from its fifth colour). Then one panel
    per model: each method's log-loss increase over the reference per document, with its interval,
    0 always in view. ``table``: :func:`flag_memorized`."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import LogLocator, ScalarFormatter

    docs = list(dict.fromkeys(table.doc))
    ncol = (len(models) + 1) // 2
    grid = [["ppl", *models[i * ncol : (i + 1) * ncol]] for i in range(2)]
    grid[1] += ["."] * (len(grid[0]) - len(grid[1]))
    fig, panel = plt.subplot_mosaic(
        grid, figsize=(4.4 * (ncol + 1.3), 8.6), gridspec_kw={"width_ratios": [1.3] + [1] * ncol}
    )
    axes = [panel["ppl"], *(panel[m] for m in models)]

    def bars(ax, groups: dict[str, pd.DataFrame], height: str, colors: dict[str, str], err=None):
        """One bar per document and group member, side by side; flagged documents hatched."""
        width = 0.8 / len(groups)
        for i, (name, rows) in enumerate(groups.items()):
            rows = rows.set_index("doc").reindex(docs)
            x = np.arange(len(docs)) + (i - (len(groups) - 1) / 2) * width
            yerr = None if err is None else [rows[height] - rows[err[0]], rows[err[1]] - rows[height]]
            drawn = ax.bar(x, rows[height], width, color=colors[name], label=name, yerr=yerr, capsize=2)
            for patch, flagged in zip(drawn, rows.flagged.fillna(False)):
                patch.set_hatch("///" if flagged else "")

    ref = table[table.method == reference]
    colors = model_colors or dict(zip(models, plt.get_cmap("tab10").colors[4:]))
    bars(axes[0], {m: ref[ref.model == m] for m in models}, "perplexity", colors)
    axes[0].set(yscale="log", ylabel=f"{reference} perplexity (log scale)")
    axes[0].yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axes[0].yaxis.set_major_formatter(ScalarFormatter())
    axes[0].yaxis.set_minor_formatter(plt.NullFormatter())
    axes[0].set_title(
        f"{reference} perplexity per document\n(hatched: flagged, below {below:g}x the unseen text's)", fontsize=9
    )
    handles = [Patch(color=colors[m], label=m) for m in models] + [
        Patch(facecolor="white", edgecolor="0.3", hatch="///", label="flagged")
    ]
    axes[0].legend(handles=handles, fontsize=7)
    for ax, model in zip(axes[1:], models):
        d = table[table.model == model]
        bars(ax, {m: d[d.method == m] for m in methods}, "increase_pct", palette, err=("ci_low", "ci_high"))
        ax.axhline(0, color="0.4", lw=0.8)
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, -0.04 * high), high)  # the zero line off the frame's edge
        ax.set_title(f"{model} (own y scale)", fontsize=9)
        ax.set_ylabel(f"log-loss increase over {reference}\n(%, 95% interval)", fontsize=8)
    for ax in axes:
        ax.set_xticks(range(len(docs)), [f"{d}\n{kind.get(d, '')}" for d in docs], rotation=30, ha="right", fontsize=7)
    method_handles = [Patch(color=palette[m], label=m) for m in methods]
    method_handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="///", label="flagged for that model"))
    fig.legend(handles=method_handles, loc="lower center", ncol=len(method_handles), fontsize=8,
               title="method panels", title_fontsize=8, bbox_to_anchor=(0.6, 0), frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
