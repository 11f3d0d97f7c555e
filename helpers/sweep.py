"""The sampling sweep of notebook 02: exact next-token analysis and sampled generations.

Two kinds of work units, each stored by :class:`helpers.store.ResultStore` as soon as it is
finished (so a killed sweep resumes where it stopped):

* **exact** (model, method): one forward pass over every prompt, then
  :func:`helpers.sampling.next_token_measures` for every (T, k) of the fine grid against the
  reference method's logits;
* **generation** (model, method, T, k): seeded fixed-length generations for a subset of prompts
  x ``n_seeds`` samples, scored for every prefix length in ``max_new_tokens`` at once (an
  N-token generation is the prefix of the longest one with the same seed). Quality: perplexity
  of the generated tokens under the reference model, distinct-1/2, 3-gram repetition, first-word
  cloze accuracy, and agreement with the reference's generation under the same seed.

The reference method is run first for every model; its generations are what the other methods'
agree with.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from . import methods as registry
from . import models as zoo
from . import sampling
from .runtime import machine_load, resolve_device, timed
from .store import ResultStore

PROMPT_COLUMNS = ("id", "kind", "category", "prompt", "answer")


def code_digest() -> str:
    """Hash of the code that computes a unit's rows (this file and sampling.py).

    It is part of every unit key, so units stored by an older version of the measures are not
    silently mixed with new ones: after a change they are recomputed.
    """
    h = hashlib.sha256()
    for mod in (sampling.__file__, __file__):
        h.update(Path(mod).read_bytes())
    return h.hexdigest()[:10]


def read_prompts(path: str | Path) -> pd.DataFrame:
    """Read a prompts CSV (id, kind, category, prompt, answer) and check it.

    ``kind`` is ``cloze`` (the next word has one accepted ``answer``) or ``open``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    df = pd.read_csv(path, keep_default_na=False, dtype=str)
    missing = [c for c in PROMPT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(PROMPT_COLUMNS)}")
    if df.id.duplicated().any():
        raise ValueError(f"{path}: duplicate prompt ids {sorted(df.id[df.id.duplicated()])[:5]}")
    bad_kind = sorted(set(df.kind) - {"cloze", "open"})
    if bad_kind:
        raise ValueError(f"{path}: kind must be 'cloze' or 'open', found {bad_kind}")
    no_answer = df[(df.kind == "cloze") & (df.answer.str.strip() == "")]
    if len(no_answer):
        raise ValueError(f"{path}: cloze prompts without an answer: {list(no_answer.id[:5])}")
    if (df.prompt.str.strip() == "").any():
        raise ValueError(f"{path}: empty prompt text")
    return df.reset_index(drop=True)


def generation_subset(prompts: pd.DataFrame, per_kind: int) -> pd.DataFrame:
    """The first ``per_kind`` cloze and ``per_kind`` open prompts (0 = all prompts)."""
    if per_kind <= 0:
        return prompts
    return pd.concat([prompts[prompts.kind == k].head(per_kind) for k in ("cloze", "open")], ignore_index=True)


def answer_token_ids(tokenizer, answers: list[str]) -> torch.Tensor:
    """First token of ``" " + answer`` for each answer (-1 where there is none)."""
    ids = [tokenizer(" " + a.strip(), add_special_tokens=False)["input_ids"][0] if a.strip() else -1 for a in answers]
    return torch.tensor(ids, dtype=torch.long)


@torch.inference_mode()
def last_token_logits(model, tokenizer, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Float32 logits at the last position of every prompt, ``[P, V]`` on the CPU."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for start in range(0, len(prompts), batch_size):
        x, mask, pos = sampling.left_pad([tokenizer(p)["input_ids"] for p in prompts[start:start + batch_size]],
                                         pad, device)
        # logits_to_keep=1: the lm_head runs for the last position only (a 262k vocabulary is costly)
        logits = model(input_ids=x, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
        out.append(logits[:, -1].float().cpu())
    return torch.cat(out)


@dataclass
class SweepConfig:
    """Everything that decides the sweep's numbers (and so the stored units' keys)."""

    models: list[str]
    methods: list[str]
    reference: str = "fp32"
    device: str = "cpu"
    compute_dtype: str = "auto"
    prompts_file: str = "data/prompts.csv"
    exact_temperatures: list[float] = field(default_factory=lambda: [0.0] + [round(0.1 * i, 1) for i in range(1, 21)])
    exact_top_ks: list[int] = field(default_factory=lambda: [0, 5, 20, 50, 200])
    gen_prompts_per_kind: int = 12
    gen_temperatures: list[float] = field(default_factory=lambda: [0.0, 0.7, 1.3])
    gen_top_ks: list[int] = field(default_factory=lambda: [0])
    max_new_tokens: list[int] = field(default_factory=lambda: [1, 8, 32])
    n_seeds: int = 5
    base_seed: int = 0
    batch_size: int = 64

    def validate(self) -> None:
        """Every check that needs no model: fails in one line before any heavy work."""
        registry.validate_methods(self.methods)
        registry.get_method(self.reference)
        if self.reference not in self.methods:
            raise ValueError(f"the reference method {self.reference!r} must be in methods {self.methods}")
        resolve_device(self.device)
        for m in self.methods:
            registry.compute_dtype_for(registry.get_method(m), self.device, self.compute_dtype)
        sampling.validate_grid(self.exact_temperatures, self.exact_top_ks, self.max_new_tokens)
        sampling.validate_grid(self.gen_temperatures, self.gen_top_ks, self.max_new_tokens)
        for name in ("n_seeds", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.models:
            raise ValueError("the list of models is empty")
        read_prompts(self.prompts_file)

    @property
    def ordered_methods(self) -> list[str]:
        return [self.reference] + [m for m in self.methods if m != self.reference]


def _prompts_digest(prompts: pd.DataFrame) -> str:
    return hashlib.sha256(prompts.to_csv(index=False).encode()).hexdigest()[:12]


class Sweep:
    """Runs the units of a :class:`SweepConfig` that are not stored yet."""

    def __init__(self, cfg: SweepConfig, folder: str | Path, progress: Callable | None = None):
        cfg.validate()
        self.cfg = cfg
        self.prompts = read_prompts(cfg.prompts_file)
        self.gen_prompts = generation_subset(self.prompts, cfg.gen_prompts_per_kind)
        self.digest = _prompts_digest(self.prompts)
        folder = Path(folder)
        self.exact_store = ResultStore(folder / "next_token", ("model", "method"))
        self.gen_store = ResultStore(folder / "generations", ("model", "method", "temperature", "top_k"))
        if progress is None:
            from tqdm.auto import tqdm as progress
        self.progress = progress  # called as progress(total=..., desc=...), like tqdm
        self.code = code_digest()

    # unit keys: every setting that changes the unit's rows
    def exact_key(self, model: str, method: str) -> dict[str, Any]:
        c = self.cfg
        return {"model": model, "method": method, "reference": c.reference, "compute_dtype": c.compute_dtype,
                "device": c.device.split(":")[0], "prompts": self.digest, "temperatures": c.exact_temperatures,
                "top_ks": c.exact_top_ks, "code": self.code}

    def gen_key(self, model: str, method: str, temperature: float, top_k: int) -> dict[str, Any]:
        c = self.cfg
        return {"model": model, "method": method, "temperature": temperature, "top_k": top_k,
                "reference": c.reference, "compute_dtype": c.compute_dtype, "device": c.device.split(":")[0],
                "prompts": self.digest, "prompts_per_kind": c.gen_prompts_per_kind, "n_seeds": c.n_seeds,
                "base_seed": c.base_seed, "max_new_tokens": c.max_new_tokens, "code": self.code}

    def pending(self) -> list[tuple]:
        """Units still to compute, in the order they will run."""
        todo = []
        for model in self.cfg.models:
            for method in self.cfg.ordered_methods:
                if not self.exact_store.done(self.exact_key(model, method)):
                    todo.append(("exact", model, method))
                for t in self.cfg.gen_temperatures:
                    for k in self.cfg.gen_top_ks:
                        if not self.gen_store.done(self.gen_key(model, method, t, k)):
                            todo.append(("gen", model, method, t, k))
        return todo

    def collect(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(next_token, generations)``: the rows of this configuration's stored units only
        (a store folder may also hold other profiles' units, or units of older code)."""
        c = self.cfg
        exact = [self.exact_store.read_unit(self.exact_key(m, x)) for m in c.models for x in c.ordered_methods]
        gen = [self.gen_store.read_unit(self.gen_key(m, x, t, k)) for m in c.models for x in c.ordered_methods
               for t in c.gen_temperatures for k in c.gen_top_ks]
        return pd.concat(exact, ignore_index=True), pd.concat(gen, ignore_index=True)

    def timings(self) -> pd.DataFrame:
        """Timing of every stored unit (read back from the units' provenance, so units computed
        by an earlier, interrupted run are included): one row per unit, ``unit`` = exact | gen."""
        rows = [{"unit": unit, **meta["timing"]}
                for unit, store in (("exact", self.exact_store), ("gen", self.gen_store))
                for meta in store.metadata() if meta.get("unit_key", {}).get("code") == self.code]
        return pd.DataFrame(rows)

    def run(self) -> None:
        """Compute every pending unit; each is stored the moment it is finished."""
        todo = self.pending()
        bar = self.progress(total=len(todo), desc="sweep units") if todo else None
        for model_name in self.cfg.models:
            units = [u for u in todo if u[1] == model_name]
            if not units:
                continue
            ref_model, ref_tok = registry.load(model_name, self.cfg.reference, self.cfg.device, self.cfg.compute_dtype)
            ref_logits = None
            for method in self.cfg.ordered_methods:
                mine = [u for u in units if u[2] == method]
                if not mine:
                    continue
                if method == self.cfg.reference:
                    model, tok = ref_model, ref_tok
                else:
                    model, tok = registry.load(model_name, method, self.cfg.device, self.cfg.compute_dtype)
                for unit in mine:
                    if unit[0] == "exact":
                        if ref_logits is None:
                            ref_logits = last_token_logits(ref_model, ref_tok, list(self.prompts.prompt))
                        self._exact(model_name, method, model, tok, ref_logits)
                    else:
                        self._generation(model_name, method, unit[3], unit[4], model, tok, ref_model)
                    if bar is not None:
                        bar.update(1)
                if model is not ref_model:
                    del model
            del ref_model
        if bar is not None:
            bar.close()

    def _exact(self, model_name, method, model, tok, ref_logits) -> None:
        c = self.cfg
        prompts = list(self.prompts.prompt)
        forward_s, logits = timed(lambda: last_token_logits(model, tok, prompts), c.device)
        answers = answer_token_ids(tok, list(self.prompts.answer))
        measures_s, rows = timed(lambda: sampling.next_token_measures(ref_logits, logits, c.exact_temperatures,
                                                                      c.exact_top_ks, answers))
        df = pd.DataFrame(rows)
        # a prompt whose logits overflowed (fp16) has no meaningful distribution: NaN, flagged
        finite = torch.isfinite(logits).all(-1).numpy()[df.prompt_index.to_numpy()]
        df["top1_agree"] = df.top1_agree.astype(float)
        df.loc[~finite, ["tv", "kl", "top1_agree", "entropy", "p_answer"]] = float("nan")
        df["finite"] = finite
        df.insert(0, "prompt_id", self.prompts.id.to_numpy()[df.prompt_index])
        df.insert(1, "kind", self.prompts.kind.to_numpy()[df.prompt_index])
        df = df.drop(columns="prompt_index")
        timing = {"model": model_name, "method": method, "prompts": len(prompts), "forward_s": forward_s,
                  "measures_s": measures_s, "grid_points": len(c.exact_temperatures) * len(c.exact_top_ks),
                  "vocab": logits.shape[1], "load_average": machine_load()}
        self.exact_store.write(self.exact_key(model_name, method), df, notebook="02_sampling_sweep",
                               device=c.device, config=asdict(c), timing=timing)

    def _reference_tokens(self, model_name, temperature, top_k) -> dict[tuple[str, int], list[int]]:
        ref = self.gen_store.read_unit(self.gen_key(model_name, self.cfg.reference, temperature, top_k))
        if ref.empty:
            return {}
        ref = ref[ref.max_new_tokens == max(self.cfg.max_new_tokens)]
        return {(r.prompt_id, int(r["sample"])): [int(t) for t in str(r.tokens).split()] for _, r in ref.iterrows()}

    def _generation(self, model_name, method, temperature, top_k, model, tok, ref_model) -> None:
        c = self.cfg
        n_samples = 1 if temperature == 0 else c.n_seeds  # greedy: every seed gives the same text
        jobs = [(r, s) for _, r in self.gen_prompts.iterrows() for s in range(n_samples)]
        seeds = [sampling.sequence_seed(r.id, s, c.base_seed) for r, s in jobs]
        longest = max(c.max_new_tokens)
        gen_s, gen = timed(lambda: sampling.generate(model, tok, [r.prompt for r, _ in jobs], seeds, temperature,
                                                     top_k, longest, c.batch_size), c.device)
        ref_s, nll = timed(lambda: sampling.reference_nll(ref_model, gen.prompt_ids, gen.tokens), c.device)
        ref_tokens = gen.tokens.tolist() if method == c.reference else None
        ref_lookup = {} if ref_tokens is not None else self._reference_tokens(model_name, temperature, top_k)
        eos = {t for t in [tok.eos_token_id, getattr(tok, "pad_token_id", None)] if t is not None}
        rows = []
        for i, (r, s) in enumerate(jobs):
            full, finite = gen.tokens[i].tolist(), bool(gen.finite[i])
            ref_full = ref_tokens[i] if ref_tokens is not None else ref_lookup.get((r.id, s))
            for n in c.max_new_tokens:
                toks = full[:n]
                kept = sampling.truncate_at_eos(toks, eos)
                text = tok.decode(kept, skip_special_tokens=True)
                row = {"prompt_id": r.id, "kind": r.kind, "sample": s, "seed": seeds[i], "max_new_tokens": n,
                       "n_tokens": len(kept),
                       "ref_nll": nll[i, :len(kept)].mean().item() if kept else float("nan"),
                       "distinct_1": sampling.distinct_n(kept, 1), "distinct_2": sampling.distinct_n(kept, 2),
                       "repetition": sampling.repetition_rate(kept, 3),
                       "first_word_correct": (float(sampling.first_word(text) == r.answer.strip().lower())
                                              if r.kind == "cloze" else float("nan")),
                       "tokens": " ".join(map(str, toks)),
                       "text": text if n == longest else "", "finite": finite}
                if ref_full is not None:
                    ref_n = ref_full[:n]
                    same = [a == b for a, b in zip(toks, ref_n)]
                    row["agree_tokens"] = sum(same) / n
                    row["agree_prefix"] = (same.index(False) if False in same else n) / n
                else:
                    row["agree_tokens"] = row["agree_prefix"] = float("nan")
                if not finite:  # tokens drawn from overflowed logits: keep the row, not its scores
                    for name in ("ref_nll", "distinct_1", "distinct_2", "repetition", "first_word_correct",
                                 "agree_tokens", "agree_prefix"):
                        row[name] = float("nan")
                rows.append(row)
        timing = {"model": model_name, "method": method, "temperature": temperature, "top_k": top_k,
                  "sequences": len(jobs), "new_tokens": longest, "generate_s": gen_s, "reference_s": ref_s,
                  "load_average": machine_load()}
        self.gen_store.write(self.gen_key(model_name, method, temperature, top_k), pd.DataFrame(rows),
                             notebook="02_sampling_sweep", device=c.device, config=asdict(c), timing=timing)

