"""Measuring speed and memory the way benchmark authors do, and what the numbers decide (notebook 03).

* **Fixed-length generation.** ``min_new_tokens = max_new_tokens``, greedy: every method
  decodes exactly the same number of tokens whatever it predicts (an early EOS would flatter a
  method).
* **Prefill and decode apart.** A :class:`StepClock` passed as a stopping criterion records the
  time after every generated token (the first one marks the end of prefill, i.e. the time to
  first token). Decode speed is ``(N - 1) / (t_N - t_1)``, and one N-token run gives the speed
  of every shorter length too.
* **Warm-up, then repeats.** The first calls are discarded (allocations, kernel selection,
  lazy weight repacking on CPU); the median and the spread of the repeats are reported.
* **Synchronized.** On CUDA, queued work is finished before every clock reading.
* **Memory.** Peak resident memory on CPU (``VmHWM``, reset through ``/proc/self/clear_refs``; NaN
  where the kernel does not support the reset),
  ``max_memory_allocated`` and ``max_memory_reserved`` on CUDA; the bytes a model holds, split
  into the parts the memory figure stacks (:func:`memory_breakdown`).
* **Roofline.** Decoding one token reads every weight once (plus the KV cache), so a method
  can decode at most ``bandwidth / bytes_per_token`` tokens per second at batch 1
  (:func:`bytes_per_token`, :func:`memory_bandwidth`).
* **Resumable.** :class:`SpeedBenchmark` times one (model, method, batch size) unit at a time
  and stores each through :class:`helpers.store.ResultStore` (the mechanism of notebook 02's
  sweep too), in a folder per hardware class (:func:`helpers.runtime.hardware_class`).
* **Verdicts** on Roy (2023)'s speed claims C4 and C5 are decided, like every claim's, in
  :mod:`helpers.analysis` (:func:`helpers.analysis.c4_c5_verdicts`), from a summary
  (:func:`summarize`) of this run, of every hardware class stored in ``data/``
  (:func:`class_summaries`) and of lit-gpt's A100 table (:func:`litgpt_a100_summary`).
"""

from __future__ import annotations

import hashlib
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .memory import (
    bytes_per_token,
    kv_cache_bytes,
    memory_breakdown,
    peak_memory,
    release_memory,
    reset_peak_memory,
    rss_mib,
)
from .provenance import device_description, load_table, read_provenance
from .runtime import hardware_class, machine_load, resolve_device, synchronize, timed
from .store import ResultStore, code_digest


class StepClock(StoppingCriteria):
    """A stopping criterion that never stops: it timestamps every decoding step."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.start = 0.0
        self.stamps: list[float] = []

    def reset(self) -> None:
        synchronize(self.device)
        self.stamps = []
        self.start = time.perf_counter()

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class GenerationTiming:
    """One timed fixed-length generation."""

    new_tokens: int
    batch: int
    ttft_s: float  # start -> first token (prefill + first step)
    total_s: float
    step_s: list[float]  # time of each step after the first

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second per sequence after the first token."""
        return (self.new_tokens - 1) / max(self.total_s - self.ttft_s, 1e-12)

    def e2e_tokens_per_s_at(self, n: int) -> float:
        """End-to-end tokens/s (prefill included) of an ``n``-token generation: the first ``n``
        steps of a longer greedy run are the same work as a run of ``n`` tokens."""
        if not 1 <= n <= self.new_tokens:
            raise ValueError(f"n must be in [1, {self.new_tokens}], got {n}")
        return n / max(self.ttft_s + sum(self.step_s[: n - 1]), 1e-12)


def validate(batch_sizes: list[int], max_new_tokens: list[int], repeats: int, warmup: int) -> None:
    """Reject bad benchmark settings with a one-line reason before any model is loaded."""
    for name, values in (("batch_sizes", batch_sizes), ("max_new_tokens", max_new_tokens)):
        if (
            not isinstance(values, (list, tuple))
            or not values
            or not all(isinstance(v, int) and v >= 1 for v in values)
        ):
            raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {values!r}")
    if max(max_new_tokens) < 2:
        raise ValueError("max_new_tokens needs a value >= 2 to separate prefill from decoding")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")


def fixed_length_kwargs(tokenizer, new_tokens: int) -> dict[str, Any]:
    """``generate`` arguments for exactly ``new_tokens`` greedy tokens, the same for every method."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
        temperature=None,
        top_p=None,
        top_k=None,
    )


@torch.inference_mode()
def timed_generate(
    model, inputs: dict[str, torch.Tensor], tokenizer, new_tokens: int, device: str = "cpu"
) -> GenerationTiming:
    """Run ``model.generate`` for exactly ``new_tokens`` tokens and time every step."""
    clock = StepClock(device)
    kwargs = fixed_length_kwargs(tokenizer, new_tokens)
    clock.reset()
    out = model.generate(**inputs, **kwargs, stopping_criteria=StoppingCriteriaList([clock]))
    synchronize(device)
    end = time.perf_counter()
    produced = out.shape[1] - inputs["input_ids"].shape[1]
    if produced != new_tokens or len(clock.stamps) != new_tokens:
        raise RuntimeError(
            f"expected {new_tokens} new tokens, generate produced {produced} ({len(clock.stamps)} steps timed)"
        )
    stamps = clock.stamps
    return GenerationTiming(
        new_tokens,
        inputs["input_ids"].shape[0],
        stamps[0] - clock.start,
        end - clock.start,
        [b - a for a, b in zip(stamps, stamps[1:])],
    )


def repeat(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[Any]:
    """``warmup`` discarded calls, then ``repeats`` recorded ones (each with the machine load)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        load = machine_load()
        out.append((fn(), load))
    return out


def prompt_inputs(tokenizer, text: str, prompt_tokens: int, batch: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The first ``prompt_tokens`` tokens of ``text``, repeated ``batch`` times (no padding)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:prompt_tokens]
    if len(ids) < prompt_tokens:
        raise ValueError(f"the prompt text has only {len(ids)} tokens, fewer than prompt_tokens={prompt_tokens}")
    return {
        "input_ids": torch.tensor([ids] * batch, device=device),
        "attention_mask": torch.ones(batch, len(ids), dtype=torch.long, device=device),
    }


@torch.inference_mode()
def harness_check(
    model, inputs: dict[str, torch.Tensor], tokenizer, new_tokens: int, repeats: int, device: str = "cpu"
) -> pd.DataFrame:
    """The same generation timed two ways, alternating after one warm-up: a bare ``model.generate``
    timed from outside (``bare_s``) and :func:`timed_generate` (``harness_s``), one row per repeat."""
    kwargs = fixed_length_kwargs(tokenizer, new_tokens)
    model.generate(**inputs, **kwargs)  # warm-up
    rows = []
    for _ in range(repeats):
        bare_s = timed(lambda: model.generate(**inputs, **kwargs), device)[0]
        rows.append(
            {"bare_s": bare_s, "harness_s": timed_generate(model, inputs, tokenizer, new_tokens, device).total_s}
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- resumable timed units
@dataclass
class SpeedConfig:
    """Everything that decides notebook 03's timed numbers (and so the stored units' keys)."""

    models: list[str]
    methods: list[str]
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    max_new_tokens: list[int] = field(default_factory=lambda: [16])  # runs generate the longest
    prompt_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    device: str = "cpu"
    compute_dtype: str = "auto"
    threads: int = 2

    def validate(self) -> None:
        """Every check that needs no model: fails in one line before anything is loaded."""
        from . import methods as registry

        if not self.models:
            raise ValueError("the list of models is empty")
        registry.validate_methods(self.methods)
        resolve_device(self.device)
        for m in self.methods:
            registry.compute_dtype_for(registry.get_method(m), self.device, self.compute_dtype)
        validate(self.batch_sizes, self.max_new_tokens, self.repeats, self.warmup)
        if not isinstance(self.prompt_tokens, int) or self.prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be an integer >= 1, got {self.prompt_tokens!r}")

    @property
    def new_tokens(self) -> int:
        """Tokens every timed run generates (shorter lengths are read from its step times)."""
        return max(self.max_new_tokens)

    @property
    def ordered_methods(self) -> list[str]:
        """``methods`` in the registry's order (the order of every figure)."""
        from . import methods as registry

        return [m for m in registry.METHODS if m in self.methods]


class SpeedBenchmark:
    """Times the (model, method, batch size) units of a :class:`SpeedConfig` not stored yet.

    Units are stored under ``folder/<hardware class>`` by a :class:`helpers.store.ResultStore`.
    A unit's key holds every setting that changes its rows, the hardware class and the hash of
    the measuring code (:func:`code_digest`): a rerun recomputes nothing finished and reuses no
    timing of other settings, other code or other hardware. ``load(model, method)`` returns
    ``(model, tokenizer)`` (default: :func:`helpers.methods.load` with the configuration's device
    and compute dtype); ``progress`` is called like ``tqdm(total=..., desc=...)``.
    """

    LABEL_FIELDS = ("model", "method", "batch")

    def __init__(
        self,
        cfg: SpeedConfig,
        folder: str | Path,
        prompt_text: str,
        load: Callable[[str, str], tuple[Any, Any]] | None = None,
        progress: Callable | None = None,
    ):
        cfg.validate()
        if torch.get_num_threads() != cfg.threads:
            raise ValueError(
                f"torch runs {torch.get_num_threads()} threads but threads={cfg.threads}: call "
                f"helpers.runtime.configure_threads({cfg.threads}) first"
            )
        self.cfg = cfg
        self.prompt_text = prompt_text
        self.hardware = hardware_class(cfg.device)
        machine = device_description(cfg.device)
        self.device_name = machine.get("gpu", machine.get("cpu"))
        self.store = ResultStore(Path(folder) / self.hardware, self.LABEL_FIELDS)
        from . import methods as registry

        if load is None:

            def load(model: str, method: str):
                return registry.load(model, method, cfg.device, cfg.compute_dtype)

        self.load = load
        self.progress = progress
        # the code a timed unit runs (helpers.store.code_digest), the default loader included
        self.code = code_digest(SpeedBenchmark._measure, registry.load)
        self._prompt_digest = hashlib.sha256(prompt_text.encode()).hexdigest()[:10]

    def key(self, model: str, method: str, batch: int) -> dict[str, Any]:
        """The unit's key: every setting that changes its rows."""
        c = self.cfg
        return {
            "model": model,
            "method": method,
            "batch": batch,
            "code": self.code,
            "device": c.device.split(":")[0],
            "hardware_class": self.hardware,
            "device_name": self.device_name,
            "compute_dtype": c.compute_dtype,
            "threads": c.threads,
            "prompt": self._prompt_digest,
            "prompt_tokens": c.prompt_tokens,
            "new_tokens": c.new_tokens,
            "lengths": sorted(c.max_new_tokens),
            "repeats": c.repeats,
            "warmup": c.warmup,
        }

    def units(self) -> list[tuple[str, str, int]]:
        """Every (model, method, batch) of the configuration, in the order they run."""
        c = self.cfg
        return [(m, x, b) for m in c.models for x in c.ordered_methods for b in c.batch_sizes]

    def pending(self) -> list[tuple[str, str, int]]:
        """Units still to time, in the order they will run."""
        return [u for u in self.units() if not self.store.done(self.key(*u))]

    def bandwidth(self, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
        """The memory bandwidth to set beside this configuration's timings (the roofline's limit).

        While a unit is still to be timed, ``measure()`` now: pass the result to :meth:`run`, which
        stores it with every unit it times. Once every unit is stored, the best read and copy rates
        stored with them, so that a rerun which times nothing draws the same roofline instead of
        setting old timings against a new reading of the bandwidth."""
        if self.pending():
            return measure()
        stored = [read_provenance(self.store.path(self.key(*u))).get("bandwidth") for u in self.units()]
        if any(b is None for b in stored):
            return measure()  # units timed without a bandwidth reading
        return {k: max(b[k] for b in stored) for k in stored[0]}

    def run(self, **meta: Any) -> int:
        """Time every pending unit, storing each the moment it is finished (``meta`` goes to its
        provenance); a model is loaded once for all its pending batch sizes. Returns how many
        units were timed."""
        todo = self.pending()
        bar = self.progress(total=len(todo), desc="model x method x batch") if todo and self.progress else None
        for model_name in self.cfg.models:
            for method in self.cfg.ordered_methods:
                batches = [b for m, x, b in todo if (m, x) == (model_name, method)]
                if batches:
                    self._measure(model_name, method, batches, bar, meta)
        if bar is not None:
            bar.close()
        return len(todo)

    def collect(self) -> pd.DataFrame:
        """Every timed run of this configuration's units (a store folder may also hold units of
        other settings or older code), one row per run, in :meth:`units` order."""
        frames = [self.store.read_unit(self.key(*u)) for u in self.units()]
        runs = pd.concat(frames, ignore_index=True)
        return runs.assign(device_kind=runs.device)

    def _measure(self, model_name: str, method: str, batches: list[int], bar, meta: dict[str, Any]) -> None:
        """Load once, count the bytes, then time each batch size and store it."""
        c, device = self.cfg, self.cfg.device
        release_memory(device)
        if not reset_peak_memory(device):
            warnings.warn(
                "this kernel cannot reset the process's peak RSS (/proc/self/clear_refs): peak memory is stored as NaN",
                stacklevel=2,
            )
        baseline = rss_mib() if device == "cpu" else float("nan")
        load_s, (model, tok) = timed(lambda: self.load(model_name, method), device)
        parts = memory_breakdown(model)  # before the first forward (CPU kernels may repack)
        with torch.inference_mode():
            first_s, _ = timed(
                lambda: model(**prompt_inputs(tok, self.prompt_text, c.prompt_tokens, 1, device)), device
            )
        emb = model.get_input_embeddings().weight
        kv = kv_cache_bytes(
            model.config,
            c.prompt_tokens + c.new_tokens // 2,
            2 if model.dtype in (torch.float16, torch.bfloat16) else 4,
        )
        per_token = bytes_per_token(
            round(parts["total_MiB"] * 2**20), emb.numel() * emb.element_size(), parts["tied_embeddings"], kv
        )
        for batch in batches:
            inputs = prompt_inputs(tok, self.prompt_text, c.prompt_tokens, batch, device)
            runs = repeat(lambda: timed_generate(model, inputs, tok, c.new_tokens, device), c.repeats, c.warmup)  # noqa: B023 (called at once)
            rows = []
            for i, (t, load) in enumerate(runs):
                row = {
                    "batch": batch,
                    "run": i,
                    "ttft_s": t.ttft_s,
                    "total_s": t.total_s,
                    "decode_tokens_per_s": t.decode_tokens_per_s,
                    "load_average": load,
                }
                for n in sorted(c.max_new_tokens):  # end-to-end tokens/s of an n-token generation, prefill included
                    row[f"e2e_tokens_per_s_{n}"] = t.e2e_tokens_per_s_at(n)
                rows.append(row)
            df = pd.DataFrame(rows).assign(  # peak memory: since loading, so it includes the load
                load_s=load_s,
                first_forward_s=first_s,
                **parts,
                bytes_per_token=per_token,
                baseline_rss_MiB=baseline,
                **peak_memory(device),
            )
            self.store.write(self.key(model_name, method, batch), df, device=device, **meta)
            if bar is not None:
                bar.update(1)
        model = None  # the last reference (the closures above hold the name, not the model)
        release_memory(device)


# --------------------------------------------------------------------------- summary
#: Columns that are the same for every run of a (model, method): carried into the summary.
UNIT_COLUMNS = (
    "load_s",
    "first_forward_s",
    "linear_MiB",
    "embedding_MiB",
    "other_MiB",
    "quant_state_MiB",
    "weights_MiB",
    "total_MiB",
    "hf_footprint_MiB",
    "bytes_per_token",
    "tied_embeddings",
    "baseline_rss_MiB",
    "peak_rss_MiB",
    "max_memory_allocated_MiB",
    "max_memory_reserved_MiB",
    "prompt_tokens",
    "new_tokens",
    "hardware_class",
    "device_kind",
    "device_name",
)


def summarize(runs: pd.DataFrame, read_GBps: float) -> pd.DataFrame:
    """One row per (model, method, batch): the median decode tokens/s with the range of the runs
    (``decode_min``, ``decode_max``), the median time to first token, the highest load average,
    the (model, method)'s memory columns (of its first unit), and the batch-1 roofline
    ``read_GBps / bytes_per_token`` (:data:`UNIT_COLUMNS` that ``runs`` lacks are left out)."""
    keys = ["model", "method", "batch"]
    s = (
        runs.groupby(keys, sort=False)
        .agg(
            decode_tokens_per_s=("decode_tokens_per_s", "median"),
            decode_min=("decode_tokens_per_s", "min"),
            decode_max=("decode_tokens_per_s", "max"),
            ttft_s=("ttft_s", "median"),
            max_load_average=("load_average", "max"),
        )
        .reset_index()
    )
    static = runs.groupby(["model", "method"], sort=False)[[c for c in UNIT_COLUMNS if c in runs]].first()
    s = s.merge(static.reset_index(), on=["model", "method"], how="left")
    return s.assign(roofline_tokens_per_s=read_GBps * 1e9 / s.bytes_per_token)


# --------------------------------------------------------------------------- claims C4 and C5
#: lit-gpt's quantization tutorial: falcon-7b on one A100, 256 new tokens, (tokens/s, GB of GPU memory).
LITGPT_A100 = {
    "bf16": (47.66, 14.50),
    "nf4": (37.62, 5.72),
    "nf4-dq": (30.87, 5.38),
    "fp4": (36.98, 5.72),
    "fp4-dq": (25.54, 5.38),
    "int8": (12.66, 8.70),
}
LITGPT_A100_SOURCE = "https://github.com/Lightning-AI/litgpt/blob/main/tutorials/quantize.md"
LITGPT_A100_LABEL = "lit-gpt A100"


def litgpt_a100_summary() -> pd.DataFrame:
    """lit-gpt's A100 table (:data:`LITGPT_A100`) as a summary that :func:`helpers.analysis.c4_c5_verdicts`
    and :func:`helpers.analysis.speed_ratios` take: falcon-7b, batch 1, 256 new tokens."""
    return pd.DataFrame(
        [
            {
                "hardware_class": LITGPT_A100_LABEL,
                "model": "falcon-7b",
                "batch": 1,
                "method": m,
                "decode_tokens_per_s": tps,
                "memory_GB": gb,
                "new_tokens": 256,
            }
            for m, (tps, gb) in LITGPT_A100.items()
        ]
    )


def non_finite_methods(methods_table: pd.DataFrame) -> set[tuple[str, str]]:
    """``(model, method)`` pairs whose forward pass gave non-finite logits in notebook 01's methods
    table (fp16 on Gemma-3 overflows): fast output that cannot be used is no speed reference."""
    bad = methods_table[~methods_table.finite_logits.astype(bool)]
    return set(zip(bad.model, bad.method))


# --------------------------------------------------------------------------- hardware classes side by side
_CLASS_NAME = re.compile(r"[a-z]+(-[a-z0-9]+)+")  # cpu-avx2-amd-epyc, cuda-h100


def class_tables(folder: str | Path, notebook: str, table: str) -> dict[str, Path]:
    """``{hardware class: path}`` of the ``{notebook}_{class}_{table}.csv`` files in ``folder``."""
    prefix, suffix = f"{notebook}_", f"_{table}.csv"
    found = {}
    for path in sorted(Path(folder).glob(f"{prefix}*{suffix}")):
        cls = path.name[len(prefix) : -len(suffix)]
        if _CLASS_NAME.fullmatch(cls):
            found[cls] = path
    return found


def class_summaries(folder: str | Path, notebook: str) -> pd.DataFrame:
    """Every hardware class's summary table in ``folder`` (:func:`class_tables`), stacked, each
    row tagged with its class (the file name's), the run's ``new_tokens``, ``prompt_tokens``,
    ``repeats`` and ``date`` (from the provenance where a table lacks the column)."""
    frames = []
    for cls, path in class_tables(folder, notebook, "summary").items():
        df, meta = load_table(path)
        if "hardware_class" in df and (df.hardware_class != cls).any():
            raise ValueError(f"{path.name} holds rows of hardware class {sorted(set(df.hardware_class))}, not {cls}")
        params = meta.get("parameters", {})
        df = df.assign(hardware_class=cls, repeats=params.get("repeats"), date=meta.get("date"))
        if "new_tokens" not in df:
            df["new_tokens"] = max(params.get("max_new_tokens", [0]))
        if "prompt_tokens" not in df:
            df["prompt_tokens"] = params.get("prompt_tokens")
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def class_runs(folder: str | Path, notebook: str, hardware: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The timed runs of one hardware class stored in ``folder`` and their provenance, each row
    tagged with the class (to redraw that class's figures without timing anything)."""
    tables = class_tables(folder, notebook, "runs")
    if hardware not in tables:
        raise FileNotFoundError(
            f"no {notebook}_{hardware}_runs.csv in {folder}; classes there: {sorted(tables) or 'none'}"
        )
    runs, meta = load_table(tables[hardware])
    return runs.assign(hardware_class=hardware), meta


def c4_c5_panel(
    ax,
    ratios: pd.DataFrame,
    verdicts: pd.DataFrame,
    rows: dict[str, int],
    markers: dict[str, str],
    palette: dict[str, str],
    title: str,
) -> None:
    """One panel of notebook 03's C4/C5 figure: each model's decode speed relative to the best
    unquantized 16-bit method (``ratios``, :func:`helpers.analysis.speed_ratios` rows) on the row
    of its method (``rows``), one marker per model (``markers``, each model a little above or below
    the others in a row, so equal ratios stay visible; a star for a model not in it, such as
    lit-gpt's falcon-7b), C4's threshold with its tie band on the int8 row, C5's tie band around 1,
    and under ``title`` each claim's verdicts over the models (``verdicts``,
    :func:`helpers.analysis.c4_c5_verdicts` rows)."""
    from .analysis import C4_MAX_RATIO, C4_TIE, C5_TIE, count_words

    dodge = {m: 0.14 * (i - (len(markers) - 1) / 2) for i, m in enumerate(markers)}  # models apart within a row
    for model, d in ratios.groupby("model", sort=False):
        star = model not in markers
        ax.scatter(d.ratio_to_16bit, d.method.map(rows) + dodge.get(model, 0.0), c=[palette[m] for m in d.method],
                   marker="*" if star else markers[model], s=90 if star else 55, edgecolor="k", lw=0.6, zorder=3)  # fmt: skip
    ax.axvline(C4_MAX_RATIO, color="C2", ls=":", lw=1.2)
    if "int8" in rows:  # C4's tie band, on the int8 row it reads
        ax.fill_betweenx([rows["int8"] - 0.45, rows["int8"] + 0.45], C4_MAX_RATIO * (1 - C4_TIE),
                         C4_MAX_RATIO * (1 + C4_TIE), color="#c7e9c0", lw=0, zorder=0)  # fmt: skip
    ax.axvline(1.0, color="k", ls="-", lw=0.8)
    ax.axvspan(1 - C5_TIE, 1 + C5_TIE, color="0.85", lw=0, zorder=0)
    ax.tick_params(labelbottom=True)  # every panel keeps its x scale
    lines = [f"{claim} {count_words(v.verdict, of=' models')}" for claim, v in verdicts.groupby("claim")]
    ax.set_title("\n".join([title, *lines]), fontsize=8.5)
    ax.set_xlabel("decode speed / best 16-bit")
