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
than the reference's; it then behaves partly like the reference at another temperature ``tau``.
Three definitions of ``tau`` (:mod:`helpers.efftemp`) are fitted on about ``fit_positions``
evenly spaced positions, and two controls run as if they were methods: the reference's logits divided by a
known ``c`` (``ctrl-temp``) and the reference's logits plus Gaussian noise with the KL of a
quantized method (``ctrl-noise``). Comparing a method at ``T`` with the reference at ``tau * T``
("matched" temperature) removes the shift from a sensitivity curve; ``tau`` is cross-fitted, so
the blocks it is fitted on are never the blocks it is applied to.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import efftemp, measures
from . import methods as registry
from .evaluation import read_text, token_windows
from .provenance import load_table
from .runtime import machine_load, timed
from .store import ResultStore, code_digest

SUMMED = ("p_true", "logloss", "entropy", "kl", "tv", "ref_p_true", "ref_logloss")
CONTROLS = efftemp.CONTROLS


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
    controls: tuple[str, ...] = tuple(CONTROLS)
    control_temperature: float = 1.15
    noise_matched_to: str = "fp4"
    control_seed: int = 0

    def validate(self) -> None:
        """Every check that needs no model: fails in one line before any heavy work."""
        super().validate()
        measures.validate_grid(list(self.temperatures), list(self.top_ks), [1])
        for name in ("window", "block", "fit_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
        unknown = set(self.controls) - set(CONTROLS)
        if unknown:
            raise ValueError(f"unknown control(s) {sorted(unknown)}; known: {list(CONTROLS)}")
        if not self.control_temperature > 0:
            raise ValueError(f"control_temperature must be positive, got {self.control_temperature}")
        if "ctrl-noise" in self.controls and self.noise_matched_to not in set(self.methods) - {self.reference}:
            raise ValueError(
                f"ctrl-noise matches the KL of noise_matched_to={self.noise_matched_to!r}, which is not among the "
                f"compared methods {[m for m in self.methods if m != self.reference]}"
            )
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
            controls=tuple(values.get("text_controls", CONTROLS)),
            control_temperature=values.get("control_temperature", cls.control_temperature),
            noise_matched_to=values.get("noise_matched_to", cls.noise_matched_to),
        )


class TextStudy:
    """Runs the (model, method) units of a :class:`TextConfig` that are not stored yet.

    A unit holds the method's and the reference's block sums at every (T, k) ("nominal" rows),
    the reference's own at ``tau * T`` under each definition of :data:`helpers.efftemp.DEFINITIONS`
    (``matched:<definition>`` rows, ``ref_*`` columns, with ``temperature`` the method's T),
    the effective-temperature curves summed per block on :data:`helpers.efftemp.GRID` ("fit" rows,
    whose ``temperature`` is the grid point), and, in its provenance, the fitted temperatures and
    the timings. The reference needs no unit of its own; the controls (:data:`CONTROLS`) have
    units like methods, computed from the reference's logits.
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
            TextStudy._unit,
            TextStudy._reference_logits,
            TextStudy._windows,
            TextStudy._control,
            extra="".join(self.documents.values()),
        )

    def key(self, model: str, method: str) -> dict[str, Any]:
        c = self.cfg
        control = {}
        if method == "ctrl-temp":
            control = {"control_temperature": c.control_temperature}
        elif method == "ctrl-noise":  # its noise scale comes from the matched method's unit
            control = {
                "control_seed": c.control_seed,
                "matched_to": self.store.path(self.key(model, c.noise_matched_to)).name,
            }
        return {
            **control,
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
        """The methods compared with the reference (every method but the reference), then the
        controls (``ctrl-noise`` needs its matched method's unit first)."""
        return [m for m in self.cfg.methods if m != self.cfg.reference] + list(self.cfg.controls)

    def collect(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """``(blocks, fits, curves)``: every unit's block sums (nominal and matched rows), one row
        per unit with its fitted temperatures, token count and timings, and the per-block
        effective-temperature curves that :func:`helpers.efftemp.unit_intervals` refits."""
        blocks, fits = [], []
        for m in self.cfg.models:
            for x in self.compared:
                path = self.store.path(self.key(m, x))
                df, meta = load_table(path)
                blocks.append(df)
                fits.append({"model": m, "method": x, **meta["fit"], **meta["timing"]})
        blocks = pd.concat(blocks, ignore_index=True)
        fit = blocks.view == "fit"
        curves = blocks[fit].dropna(axis=1, how="all").drop(columns="view")
        return blocks[~fit].drop(columns=list(efftemp.CURVES) + ["half"]), pd.DataFrame(fits), curves

    def run(self, workers=None) -> None:
        """Compute every pending unit; each is stored the moment it is finished.

        ``workers`` (:class:`helpers.workers.Workers`): compute only this process's share, whole models
        at a time (a model's ``ctrl-noise`` needs its ``noise_matched_to`` unit first)."""
        todo = self.pending()
        if workers is not None:
            mine = set(workers.share(self.cfg.models))
            todo = [(m, x) for m, x in todo if m in mine]
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
                if method in CONTROLS:
                    logits_of, settings = self._control(model_name, method, windows, ref_logits)
                    self._unit(model_name, method, logits_of, windows, ref_logits, ref_s, bar, settings)
                    continue
                model = registry.load(model_name, method, c.device, c.compute_dtype)[0]
                self._unit(
                    model_name, method, lambda w, ref, m=model: window_logits(m, w), windows, ref_logits, ref_s, bar
                )
                del model
        bar.close()

    def _control(self, model_name: str, method: str, windows: list[Window], ref_logits: list[torch.Tensor]):
        """``(logits_of(window, ref), settings)`` of a control; the settings go to its provenance."""
        c = self.cfg
        if method == "ctrl-temp":
            return lambda w, ref: efftemp.scaled(ref, c.control_temperature), {"c": c.control_temperature}
        path = self.store.path(self.key(model_name, c.noise_matched_to))
        if not path.exists():
            raise RuntimeError(f"ctrl-noise of {model_name} needs the {c.noise_matched_to} unit first ({path})")
        rows = load_table(path)[0]
        at_one = rows[(rows.view == "nominal") & (rows.top_k == 0) & (rows.temperature == 1.0)]
        target = float(at_one.kl.sum() / at_one.n.sum())  # the matched method's mean KL from fp32 at T = 1
        calib = _every_nth_row(ref_logits, max(1, sum(len(r) for r in ref_logits) // 256), 256)
        sigma = efftemp.noise_scale(calib, efftemp.noise(calib.shape, c.control_seed), target)
        seeds = {(w.doc, w.index): c.control_seed + 1 + i for i, w in enumerate(windows)}
        settings = {"noise_sigma": sigma, "noise_target_kl": target, "noise_matched_to": c.noise_matched_to}
        return lambda w, ref: ref + sigma * efftemp.noise(ref.shape, seeds[(w.doc, w.index)]), settings

    def _reference_logits(self, model_name: str, windows: list[Window]) -> list[torch.Tensor]:
        c = self.cfg
        ref_model = registry.load(model_name, c.reference, c.device, c.compute_dtype)[0]
        return [window_logits(ref_model, w) for w in windows]

    def _windows(self, model_name: str) -> list[Window]:
        tok = registry.load_tokenizer(model_name)
        return text_windows(tok, self.documents, self.cfg.window, self.cfg.max_tokens_per_doc)

    def _unit(self, model_name, method, logits_of, windows, ref_logits, ref_s, bar, settings=None) -> None:
        c = self.cfg
        n_rows = sum(len(w.ids) - 1 for w in windows)
        stride = max(1, math.ceil(n_rows / c.fit_positions))  # every stride-th position feeds the fits
        forward_s = measures_s = fit_s = 0.0
        nominal, curves, first, ordinal = [], [], 0, 0
        for w, ref in zip(windows, ref_logits):
            s, logits = timed(lambda: logits_of(w, ref), c.device)  # noqa: B023 (called at once)
            forward_s += s
            targets = torch.tensor(w.ids[1:])
            s, sums = timed(lambda: block_sums(ref, logits, w.ids[1:], list(c.temperatures), list(c.top_ks), c.block))  # noqa: B023 (called at once)
            measures_s += s
            nominal.append(sums.assign(doc=w.doc, window=w.index, half=(ordinal + sums.block) % 2))
            picked = [i for i in range(len(targets)) if (first + i) % stride == 0]
            s, per_position = timed(lambda: efftemp.position_curves(ref[picked], logits[picked], targets[picked]))  # noqa: B023 (called at once)
            fit_s += s
            curves.append(_curve_rows(per_position, [i // c.block for i in picked]).assign(doc=w.doc, window=w.index))
            ordinal += math.ceil(len(targets) / c.block)
            first += len(targets)
            bar.update(1)
        nominal = pd.concat(nominal, ignore_index=True)
        halves = nominal.groupby(["doc", "window", "block"]).half.first()
        curves = pd.concat(curves, ignore_index=True).join(halves, on=["doc", "window", "block"])
        fit = {"fit_positions": int(curves.n.sum() / len(efftemp.GRID)), "tokens": n_rows, **(settings or {})}
        fit |= efftemp.fit(_curve_sums(curves))
        taus = {}  # cross-fitting: the tau applied to blocks of one half is fitted on the other half
        for h in (0, 1):
            half_fit = efftemp.fit(_curve_sums(curves[curves.half == 1 - h]))
            taus[h] = {d: half_fit[d] for d in efftemp.DEFINITIONS}
            fit |= {f"{d}_from_half{1 - h}": half_fit[d] for d in efftemp.DEFINITIONS}
        bad = {d for t in taus.values() for d, v in t.items() if not v > 0}
        if bad:
            raise ValueError(
                f"{model_name} {method}: effective temperature ({sorted(bad)}) outside {efftemp.GRID[0]:.2f}"
                f"-{efftemp.GRID[-1]:.2f}, the grid of helpers.efftemp"
            )
        hot = [T for T in c.temperatures if T > 0]
        matched_s, matched = timed(lambda: _matched_rows(windows, ref_logits, halves, taus, hot, c.block))
        rows = pd.concat([nominal.assign(view="nominal"), matched, curves.assign(view="fit")], ignore_index=True)
        timing = {
            "forward_s": forward_s,
            "measures_s": measures_s,
            "fit_s": fit_s,
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


def _every_nth_row(parts: list[torch.Tensor], step: int, limit: int) -> torch.Tensor:
    """Rows ``0, step, 2 * step ...`` (at most ``limit``) of the parts stacked end to end, without
    the copy of every row that ``torch.cat(parts)[::step]`` would make."""
    picked, first = [], 0
    for part in parts:
        picked.append(part[(-first) % step :: step])
        first += len(part)
    return torch.cat(picked)[:limit]


def _curve_rows(per_position, blocks: list[int]) -> pd.DataFrame:
    """Per-position effective-temperature curves (``[N, 4, G]``) summed per block: one row per
    (block, grid temperature) with ``n`` and a column per curve."""
    n, k, g = per_position.shape
    frame = pd.DataFrame(per_position.transpose(0, 2, 1).reshape(n * g, k), columns=list(efftemp.CURVES))
    frame = frame.assign(block=[b for b in blocks for _ in range(g)], temperature=list(efftemp.GRID) * n, n=1)
    return frame.groupby(["block", "temperature"], as_index=False)[["n", *efftemp.CURVES]].sum()


def _curve_sums(curves: pd.DataFrame) -> np.ndarray:
    """``[4, G]``: the curves summed over every block of ``curves`` (rows of :func:`_curve_rows`)."""
    return curves.groupby("temperature")[list(efftemp.CURVES)].sum().loc[list(efftemp.GRID)].to_numpy().T


def _matched_rows(windows, ref_logits, halves: pd.Series, taus: dict, hot: list[float], block: int) -> pd.DataFrame:
    """The reference at ``tau * T`` for every hot T and definition, summed per block: ``ref_p_true``
    and ``ref_logloss`` of ``matched:<definition>`` rows (``temperature`` = the method's T). A
    block of half ``h`` gets the ``tau`` fitted on the other half (``taus[h]``)."""
    rows = []
    for w, ref in zip(windows, ref_logits):
        targets = torch.tensor(w.ids[1:])
        block_of = torch.arange(len(targets)) // block
        half_of = torch.tensor([halves[(w.doc, w.index, int(b))] for b in block_of])
        for h in (0, 1):
            at = (half_of == h).nonzero().squeeze(1)
            if len(at) == 0:
                continue
            settings = [(d, T, tau * T) for d, tau in taus[h].items() for T in hot]
            logloss = efftemp.reference_at(ref[at], targets[at], [t for _, _, t in settings])
            frame = pd.DataFrame(logloss, columns=range(len(settings))).assign(block=block_of[at].numpy())
            frame = frame.melt(id_vars="block", var_name="setting", value_name="ref_logloss")
            frame["ref_p_true"] = np.exp(-frame.ref_logloss)
            frame = frame.groupby(["setting", "block"], as_index=False).agg(
                n=("ref_logloss", "size"), ref_logloss=("ref_logloss", "sum"), ref_p_true=("ref_p_true", "sum")
            )
            d, T, t = zip(*(settings[i] for i in frame.setting))
            rows.append(
                frame.drop(columns="setting").assign(
                    view=[f"matched:{x}" for x in d],
                    temperature=T,
                    ref_temperature=t,
                    top_k=0,
                    doc=w.doc,
                    window=w.index,
                )
            )
    return pd.concat(rows, ignore_index=True)
