"""Next-word prediction on running text, exact at every temperature and top-k.

One forward pass per (model, method) over real documents gives, at every token position and
for every (T, k) at once, what sampling one next word at that setting would do:

* ``p_true``: the probability the method puts on the token that actually comes next, i.e. the
  expected next-word accuracy of one sampled token (at ``T = 0``: greedy correct, 0 or 1);
* ``logloss``: ``-log p_true`` (nats; infinite under top-k when the true token is cut);
* ``entropy`` of the method's distribution, and ``kl`` / ``tv``: KL(reference || method) and
  total variation from the reference model at the same (T, k).

The per-position values come from :func:`helpers.measures.next_token_measures` (the true next
token plays the cloze answer). They are summed over *blocks* of consecutive positions, which are
what the paired bootstrap resamples (tokens of one text are not independent; blocks of a few
dozen tokens are, nearly). Every method sees the same windows and blocks, so differences from
the reference are paired.

**Effective temperature.** A method can make every next-token distribution sharper or flatter
than the reference's; it then behaves like the reference at another temperature.
:func:`matching_temperature` finds, for a method, the temperature ``tau`` at which the
reference's distributions are closest (in KL) to the method's at ``T = 1`` (its *effective
temperature*), and, for any model, the temperature that minimises its log-loss on the text.
Comparing a method at ``T`` with the reference at ``tau * T`` ("matched" temperature) removes
that shift from a sensitivity curve.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from . import measures
from . import methods as registry
from .evaluation import read_text, token_windows
from .provenance import load_table
from .runtime import machine_load, timed
from .store import ResultStore, code_digest

SUMMED = ("p_true", "logloss", "entropy", "kl", "tv", "ref_p_true", "ref_logloss")


@dataclass(frozen=True)
class Window:
    """One model input: ``ids`` of a stretch of document ``doc``; positions ``1..`` are scored."""

    doc: str
    index: int  # window number within the document
    ids: list[int]


def read_documents(manifest: str | Path) -> dict[str, str]:
    """``{id: text}`` of the documents listed in a manifest CSV (columns ``id``, ``file``; the
    file paths are relative to the manifest's folder)."""
    manifest = Path(manifest)
    if not manifest.exists():
        raise FileNotFoundError(f"text manifest {manifest} does not exist")
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    missing = {"id", "file"} - set(table.columns)
    if missing:
        raise ValueError(f"{manifest}: missing column(s) {sorted(missing)}")
    return {row.id: read_text(manifest.parent / row.file) for row in table.itertuples()}


def text_windows(tokenizer, documents: dict[str, str], window: int, max_tokens: int | None = None) -> list[Window]:
    """Each document tokenized and cut into windows of at most ``window`` tokens, as
    :func:`helpers.evaluation.perplexity` does (the first token of a window is context only).

    ``max_tokens`` keeps the first tokens of each document (for quick runs)."""
    out = []
    for doc, text in documents.items():
        ids = tokenizer(text)["input_ids"]
        if max_tokens is not None:
            ids = ids[:max_tokens]
        out += [Window(doc, i, w) for i, w in enumerate(token_windows(ids, window, tokenizer.bos_token_id))]
    return out


@torch.inference_mode()
def window_logits(model, window: Window) -> torch.Tensor:
    """Float32 logits ``[len(ids) - 1, V]`` on the CPU: row ``i`` predicts ``ids[i + 1]``."""
    device = next(model.parameters()).device
    x = torch.tensor([window.ids], device=device)
    return model(x).logits[0, :-1].float().cpu()


def block_sums(
    ref_logits: torch.Tensor,
    logits: torch.Tensor,
    targets: list[int],
    temperatures: list[float],
    top_ks: list[int],
    block: int,
) -> pd.DataFrame:
    """Sums of the per-position measures over blocks of ``block`` consecutive positions.

    One row per (T, k, block): ``n`` (positions) and the sum of every measure in ``SUMMED``
    (``ref_*``: the reference's own, on the same positions). Means, and their paired bootstrap
    intervals over blocks, are ratios of these sums (:func:`helpers.analysis.contrast_ci`).
    """
    if block < 1:
        raise ValueError(f"block must be a positive number of tokens, got {block}")
    df = measures.next_token_measures(ref_logits, logits, temperatures, top_ks, torch.tensor(targets, dtype=torch.long))
    df = df.assign(
        p_true=df.p_answer,
        logloss=-df.logp_answer,
        ref_p_true=df.ref_p_answer,
        ref_logloss=-df.ref_logp_answer,
        block=df.prompt_index // block,
        n=1,
    )
    return df.groupby(["temperature", "top_k", "block"], as_index=False)[["n", *SUMMED]].sum()


def _expected_logit(a: torch.Tensor, beta: float, chunk: int = 64) -> tuple[float, float]:
    """``(sum_i E_p[a_i], sum_i Var_p[a_i])`` with ``p_i = softmax(beta a_i)``, in float64 sums."""
    mean = var = 0.0
    for rows in a.split(chunk):
        p = torch.softmax(rows * beta, -1)
        m = (p * rows).sum(-1, keepdim=True)
        mean += float(m.double().sum())
        var += float((p * (rows - m) ** 2).sum(-1).double().sum())
    return mean, var


def matching_temperature(
    a: torch.Tensor, target: torch.Tensor, lo: float = 0.05, hi: float = 20.0, tol: float = 1e-7, max_iter: int = 60
) -> float:
    """The temperature ``tau`` at which ``sum_i E_{softmax(a_i / tau)}[a_i] = sum_i target_i``.

    ``a`` is ``[N, V]`` logits. Two uses, both the minimum of a convex function of
    ``beta = 1 / tau`` whose derivative is that difference:

    * ``target_i = E_{q_i}[a_i]`` for a method's distributions ``q_i`` at ``T = 1`` (see
      :func:`expected_under`): ``tau`` minimises ``sum_i KL(q_i || softmax(a_i / tau))``, the
      reference temperature that imitates the method: its *effective temperature*;
    * ``target_i = a_i[y_i]``, the logit of the true next token: ``tau`` minimises the
      log-loss ``-sum_i log softmax(a_i / tau)[y_i]``, the model's best temperature on the text.

    Newton's method on ``beta`` (the second derivative is the summed variance), kept inside a
    bisection bracket; raises if the answer lies outside ``[lo, hi]``.
    """
    goal = float(target.double().sum())
    b_lo, b_hi = 1.0 / hi, 1.0 / lo  # the summed expectation grows with beta
    if _expected_logit(a, b_lo)[0] > goal or _expected_logit(a, b_hi)[0] < goal:
        raise ValueError(f"the matching temperature lies outside [{lo}, {hi}]")
    beta = 1.0
    for _ in range(max_iter):
        mean, var = _expected_logit(a, beta)
        gap = mean - goal
        if gap > 0:
            b_hi = beta
        else:
            b_lo = beta
        step = beta - gap / var if var > 0 else float("nan")
        beta = step if b_lo < step < b_hi else 0.5 * (b_lo + b_hi)
        if b_hi - b_lo < tol * beta or abs(gap) < tol * max(1.0, abs(goal)):
            break
    return 1.0 / beta


def expected_under(a: torch.Tensor, b: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``E_{softmax(b_i)}[a_i]`` per row: the reference logits ``a`` averaged over the method's
    next-token distribution at ``T = 1`` (the target of the effective temperature)."""
    return torch.cat([(torch.softmax(rb, -1) * ra).sum(-1) for ra, rb in zip(a.split(chunk), b.split(chunk))])


# --------------------------------------------------------------------------- the study
@dataclass
class TextConfig(registry.ComparisonConfig):
    """Every setting that decides the running-text units' numbers (and so their keys)."""

    manifest: str = "data/texts/manifest.csv"
    window: int = 512
    block: int = 64
    max_tokens_per_doc: int | None = None
    temperatures: tuple[float, ...] = (0.0, 0.25, 0.5, 0.65, 0.8, 1.0, 1.25, 1.5, 2.0)
    top_ks: tuple[int, ...] = (0, 5, 50)
    fit_positions: int = 1024

    def validate(self) -> None:
        """Every check that needs no model: fails in one line before any heavy work."""
        super().validate()
        measures.validate_grid(list(self.temperatures), list(self.top_ks), [1])
        for name in ("window", "block", "fit_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
        read_documents(self.manifest)

    @classmethod
    def from_parameters(cls, values: dict[str, Any]) -> TextConfig:
        """The configuration from notebook 04's parameters (``models``, ``device``, ``text_*`` ...)."""
        return cls(
            models=list(values["models"]),
            methods=list(values["text_methods"]),
            reference=values["reference"],
            device=values["device"],
            compute_dtype=values["compute_dtype"],
            manifest=values["text_manifest"],
            window=values["text_window"],
            block=values["text_block"],
            max_tokens_per_doc=values["text_max_tokens_per_doc"],
            temperatures=tuple(values["text_temperatures"]),
            top_ks=tuple(values["text_top_ks"]),
        )


class TextStudy:
    """Runs the (model, method) units of a :class:`TextConfig` that are not stored yet.

    A unit holds the method's and the reference's block sums at every (T, k) ("nominal" rows),
    the reference's own at ``tau * T`` ("matched" rows, ``ref_*`` columns, with ``temperature``
    the method's T; ``tau`` = the method's effective temperature), and, in its provenance,
    ``tau``, the best temperatures and the timings. The reference needs no unit of its own.
    """

    def __init__(self, cfg: TextConfig, folder: str | Path, progress=None):
        cfg.validate()
        self.cfg = cfg
        self.documents = read_documents(cfg.manifest)
        self.store = ResultStore(Path(folder) / "running_text", ("model", "method"))
        if progress is None:
            from tqdm.auto import tqdm as progress
        self.progress = progress
        # the documents and the code a unit runs (helpers.store.code_digest): scheduling code,
        # docstrings and generation code are not part of it
        self.code = code_digest(
            TextStudy._unit, TextStudy._reference_logits, TextStudy._windows, extra="".join(self.documents.values())
        )

    def key(self, model: str, method: str) -> dict[str, Any]:
        c = self.cfg
        return {
            "model": model,
            "method": method,
            "reference": c.reference,
            "compute_dtype": c.compute_dtype,
            "device": c.device.split(":")[0],
            "window": c.window,
            "block": c.block,
            "max_tokens_per_doc": c.max_tokens_per_doc,
            "temperatures": list(c.temperatures),
            "top_ks": list(c.top_ks),
            "fit_positions": c.fit_positions,
            "code": self.code,
        }

    def pending(self) -> list[tuple[str, str]]:
        return [(m, x) for m in self.cfg.models for x in self.compared if not self.store.done(self.key(m, x))]

    @property
    def compared(self) -> list[str]:
        """The methods compared with the reference (every method but the reference)."""
        return [m for m in self.cfg.methods if m != self.cfg.reference]

    def collect(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(blocks, fits)``: every unit's block sums, and one row per unit with ``tau``, the best
        temperatures, the token count and the timings."""
        blocks, fits = [], []
        for m in self.cfg.models:
            for x in self.compared:
                path = self.store.path(self.key(m, x))
                df, meta = load_table(path)
                blocks.append(df)
                fits.append({"model": m, "method": x, **meta["fit"], **meta["timing"]})
        return pd.concat(blocks, ignore_index=True), pd.DataFrame(fits)

    def run(self, workers=None) -> None:
        """Compute every pending unit; each is stored the moment it is finished.

        ``workers`` (:class:`helpers.workers.Workers`): compute only this process's share."""
        todo = workers.share(self.pending()) if workers is not None else self.pending()
        if not todo:
            return
        c = self.cfg
        windows_of = {m: self._windows(m) for m in dict.fromkeys(m for m, _ in todo)}  # tokenized once per model
        bar = self.progress(total=sum(len(windows_of[m]) for m, _ in todo), desc="running-text windows")
        for model_name, windows in windows_of.items():
            methods = [x for m, x in todo if m == model_name]
            ref_s, ref_logits = timed(lambda: self._reference_logits(model_name, windows), c.device)  # noqa: B023 (called at once)
            for method in methods:
                if self.store.done(self.key(model_name, method)):
                    continue  # finished by another process meanwhile
                model = registry.load(model_name, method, c.device, c.compute_dtype)[0]
                self._unit(model_name, method, model, windows, ref_logits, ref_s, bar)
                del model
        bar.close()

    def _reference_logits(self, model_name: str, windows: list[Window]) -> list[torch.Tensor]:
        c = self.cfg
        ref_model = registry.load(model_name, c.reference, c.device, c.compute_dtype)[0]
        return [window_logits(ref_model, w) for w in windows]

    def _windows(self, model_name: str) -> list[Window]:
        tok = registry.load_tokenizer(model_name)
        return text_windows(tok, self.documents, self.cfg.window, self.cfg.max_tokens_per_doc)

    def _unit(self, model_name, method, model, windows, ref_logits, ref_s, bar) -> None:
        c = self.cfg
        n_rows = sum(len(w.ids) - 1 for w in windows)
        stride = max(1, math.ceil(n_rows / c.fit_positions))  # every stride-th position feeds the fits
        forward_s = measures_s = 0.0
        nominal, fit_ref, fit_x, fit_y, first = [], [], [], [], 0
        for w, ref in zip(windows, ref_logits):
            s, logits = timed(lambda: window_logits(model, w), c.device)  # noqa: B023 (called at once)
            forward_s += s
            targets = w.ids[1:]
            s, sums = timed(lambda: block_sums(ref, logits, targets, list(c.temperatures), list(c.top_ks), c.block))  # noqa: B023 (called at once)
            measures_s += s
            nominal.append(sums.assign(doc=w.doc, window=w.index))
            picked = [i for i in range(len(targets)) if (first + i) % stride == 0]
            fit_ref.append(ref[picked])
            fit_x.append(logits[picked])
            fit_y += [targets[i] for i in picked]
            first += len(targets)
            bar.update(1)
        a, b, y = torch.cat(fit_ref), torch.cat(fit_x), torch.tensor(fit_y)[:, None]
        tau = matching_temperature(a, expected_under(a, b))
        fit = {
            "tau": tau,
            "best_T": matching_temperature(b, b.gather(1, y).squeeze(1)),
            "ref_best_T": matching_temperature(a, a.gather(1, y).squeeze(1)),
            "fit_positions": len(fit_y),
            "tokens": n_rows,
        }
        # the reference at tau * T: what the method at T is compared with once its shift is removed
        hot = [T for T in c.temperatures if T > 0]
        matched_s, matched = timed(
            lambda: pd.concat(
                [
                    block_sums(ref, ref, w.ids[1:], [tau * T for T in hot], [0], c.block).assign(
                        doc=w.doc, window=w.index
                    )
                    for w, ref in zip(windows, ref_logits)
                ]
            )
        )
        matched = matched[["temperature", "top_k", "block", "n", "ref_p_true", "ref_logloss", "doc", "window"]].assign(
            view="matched",
            ref_temperature=matched.temperature,
            temperature=matched.temperature.map(dict(zip((tau * T for T in hot), hot))),
        )
        rows = pd.concat([pd.concat(nominal).assign(view="nominal"), matched], ignore_index=True)
        timing = {
            "forward_s": forward_s,
            "measures_s": measures_s,
            "matched_s": matched_s,
            "reference_forward_s": ref_s,
            "load_average": machine_load(),
        }
        self.store.write(
            self.key(model_name, method),
            rows,
            notebook="04_temperature_sensitivity",
            device=c.device,
            config=asdict(c),
            fit=fit,
            timing=timing,
        )
