"""The sampling sweep of notebook 02: exact next-token analysis and sampled generations.

Two kinds of work units, each stored by :class:`helpers.store.ResultStore` as soon as it is
finished (so a killed sweep resumes where it stopped):

* **exact** (model, method): one forward pass over every prompt, then
  :func:`helpers.measures.next_token_measures` for every (T, k) of the fine grid against the
  reference method's logits;
* **generation** (model, method, T, k), for the methods in ``gen_methods``: seeded
  fixed-length generations for a subset of prompts x ``n_seeds`` samples, scored for every
  prefix length in ``max_new_tokens`` at once (an N-token generation is the prefix of the
  longest one with the same seed). Quality: log-loss of the generated tokens under the reference
  model, distinct-1/2, 3-gram repetition, repetition loops, first-word cloze accuracy, and where
  the generation leaves the reference's generation under the same seed (:func:`score_generation`).

The reference method is run first for every model; its generations are what the other methods'
are compared with. A method's generation units are decoded together, up to ``batch_size``
sequences at a time across temperatures and top-k values (on a 2-core CPU one batch of 384
costs about 30% less per sequence than six of 72), and stored one unit at a time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch

from . import generation, measures
from . import methods as registry
from .runtime import machine_load, timed
from .store import ResultStore, code_digest

PROMPT_COLUMNS = ("id", "kind", "category", "prompt", "answer")


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
def last_token_logits(model, tokenizer, prompts: list[str], batch_size: int = 1) -> torch.Tensor:
    """Float32 logits at the last position of every prompt, ``[P, V]`` on the CPU.

    By default one prompt per forward pass: what one user running one prompt gets. LLM.int8()
    picks its 16-bit columns from every row of a batch, and the 4-bit CPU kernels also move with
    the padding (notebook 02, section 5), so a batched pass gives a prompt the numbers of its
    batch. ``batch_size > 1`` is faster and exact only for methods that compute every row alone."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for start in range(0, len(prompts), batch_size):
        x, mask, pos = generation.left_pad(
            [tokenizer(p)["input_ids"] for p in prompts[start : start + batch_size]], pad, device
        )
        # logits_to_keep=1: the lm_head runs for the last position only (a 262k vocabulary is costly)
        logits = model(input_ids=x, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
        out.append(logits[:, -1].float().cpu())
    return torch.cat(out)


class Unit(NamedTuple):
    """One resumable piece of the sweep: a (model, method)'s exact analysis (``kind`` "exact") or its
    generations at one (temperature, top-k) (``kind`` "gen")."""

    kind: str
    model: str
    method: str
    temperature: float | None = None
    top_k: int | None = None


@dataclass
class SweepConfig(registry.ComparisonConfig):
    """Everything that decides the sweep's numbers (and so the stored units' keys)."""

    prompts_file: str = "data/prompts.csv"
    exact_temperatures: list[float] = field(default_factory=lambda: [0.0] + [round(0.1 * i, 1) for i in range(1, 21)])
    exact_top_ks: list[int] = field(default_factory=lambda: [0, 5, 20, 50, 200])
    gen_methods: list[str] | None = None  # methods that also generate text; None: all of ``methods``
    gen_prompts_per_kind: int = 12
    gen_temperatures: list[float] = field(default_factory=lambda: [0.0, 0.7, 1.3])
    gen_top_ks: list[int] = field(default_factory=lambda: [0])
    max_new_tokens: list[int] = field(default_factory=lambda: [1, 8, 32])
    n_seeds: int = 5
    base_seed: int = 0
    batch_size: int = 64

    @classmethod
    def from_parameters(cls, values: dict[str, Any]) -> SweepConfig:
        """The configuration from notebook 02's parameters (the names are the fields')."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def validate(self) -> None:
        """Every check that needs no model: fails in one line before any heavy work."""
        super().validate()
        if self.gen_methods is not None:
            registry.validate_methods(self.gen_methods)
            if self.reference not in self.gen_methods:
                raise ValueError(
                    f"the reference method {self.reference!r} must be in gen_methods {self.gen_methods}: "
                    "the other methods' generations are compared with its generations"
                )
            extra = [m for m in self.gen_methods if m not in self.methods]
            if extra:
                raise ValueError(f"gen_methods {extra} are not in methods {self.methods}")
        measures.validate_grid(self.exact_temperatures, self.exact_top_ks, self.max_new_tokens)
        measures.validate_grid(self.gen_temperatures, self.gen_top_ks, self.max_new_tokens)
        for name in ("n_seeds", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        read_prompts(self.prompts_file)

    @property
    def ordered_methods(self) -> list[str]:
        """``methods`` with the reference first (the others are compared with it)."""
        return [self.reference] + [m for m in self.methods if m != self.reference]

    @property
    def ordered_gen_methods(self) -> list[str]:
        """The methods that generate text, in the order of :attr:`ordered_methods`."""
        chosen = self.methods if self.gen_methods is None else self.gen_methods
        return [m for m in self.ordered_methods if m in chosen]


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
        # the code each kind of unit runs (helpers.store.code_digest): a change to generation
        # code leaves the exact units stored, and the other way round
        self.code = {
            "exact": code_digest(Sweep._exact, last_token_logits, registry.load),
            "gen": code_digest(Sweep._generations, registry.load),
        }

    # unit keys: every setting that changes the unit's rows
    def exact_key(self, model: str, method: str) -> dict[str, Any]:
        c = self.cfg
        return {
            "model": model,
            "method": method,
            "reference": c.reference,
            "compute_dtype": c.compute_dtype,
            "device": c.device.split(":")[0],
            "prompts": self.digest,
            "temperatures": c.exact_temperatures,
            "top_ks": c.exact_top_ks,
            "code": self.code["exact"],
        }

    def gen_key(self, model: str, method: str, temperature: float, top_k: int) -> dict[str, Any]:
        c = self.cfg
        return {
            "model": model,
            "method": method,
            "temperature": temperature,
            "top_k": top_k,
            "reference": c.reference,
            "compute_dtype": c.compute_dtype,
            "device": c.device.split(":")[0],
            "prompts": self.digest,
            "prompts_per_kind": c.gen_prompts_per_kind,
            "n_seeds": c.n_seeds,
            "base_seed": c.base_seed,
            "max_new_tokens": c.max_new_tokens,
            "batch_size": c.batch_size,  # batch-dependent methods give a sequence the numbers of its batch
            "code": self.code["gen"],
        }

    def units(self) -> list[Unit]:
        """Every unit of the configuration, in the order they run: model by model, the reference
        first, each method's exact unit before its generation units (``gen_methods`` only)."""
        c, todo = self.cfg, []
        for model in c.models:
            for method in c.ordered_methods:
                todo.append(Unit("exact", model, method))
                if method in c.ordered_gen_methods:
                    todo += [Unit("gen", model, method, t, k) for t in c.gen_temperatures for k in c.gen_top_ks]
        return todo

    def pending(self) -> list[Unit]:
        """Units still to compute, in the order they will run."""
        return [u for u in self.units() if not self._store(u).done(self._key(u))]

    def _store(self, unit: Unit) -> ResultStore:
        return self.exact_store if unit.kind == "exact" else self.gen_store

    def _key(self, unit: Unit) -> dict[str, Any]:
        if unit.kind == "exact":
            return self.exact_key(unit.model, unit.method)
        return self.gen_key(unit.model, unit.method, unit.temperature, unit.top_k)

    def collect(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(next_token, generations)``: the rows of this configuration's stored units only
        (a store folder may also hold other profiles' units, or units of older code)."""
        units = self.units()
        exact = [self.exact_store.read_unit(self._key(u)) for u in units if u.kind == "exact"]
        gen = [self.gen_store.read_unit(self._key(u)) for u in units if u.kind == "gen"]
        return pd.concat(exact, ignore_index=True), pd.concat(gen, ignore_index=True)

    def timings(self) -> pd.DataFrame:
        """Timing of every stored unit (read back from the units' provenance, so units computed
        by an earlier, interrupted run are included): one row per unit, ``unit`` = exact | gen."""
        rows = [
            {"unit": unit, **meta["timing"]}
            for unit, store in (("exact", self.exact_store), ("gen", self.gen_store))
            for meta in store.metadata()
            if meta.get("unit_key", {}).get("code") == self.code[unit]
        ]
        return pd.DataFrame(rows)

    def run(self, workers=None) -> None:
        """Compute every pending unit; each is stored the moment it is finished.

        ``workers`` (:class:`helpers.workers.Workers`): compute only this process's share. The
        reference's units go first, in a phase of their own, because the other methods' generations
        are compared with the reference's."""
        share = workers.share if workers is not None else list
        self._run(share([u for u in self.pending() if u.method == self.cfg.reference]))
        if workers is not None:
            workers.wait()
        self._run(share(self.pending()))

    def _run(self, todo: list[Unit]) -> None:
        bar = self.progress(total=len(todo), desc="sweep units") if todo else None
        for model_name in self.cfg.models:
            units = [u for u in todo if u.model == model_name]
            if not units:
                continue
            ref_model, ref_tok = registry.load(model_name, self.cfg.reference, self.cfg.device, self.cfg.compute_dtype)
            ref_logits = None
            for method in self.cfg.ordered_methods:
                mine = [u for u in units if u.method == method]
                if not mine:
                    continue
                if method == self.cfg.reference:
                    model, tok = ref_model, ref_tok
                else:
                    model, tok = registry.load(model_name, method, self.cfg.device, self.cfg.compute_dtype)
                if Unit("exact", model_name, method) in mine:
                    if ref_logits is None:
                        ref_logits = last_token_logits(ref_model, ref_tok, list(self.prompts.prompt))
                    self._exact(model_name, method, model, tok, ref_logits)
                    if bar is not None:
                        bar.update(1)
                for group in self._gen_groups([u for u in mine if u.kind == "gen"]):
                    self._generations(model_name, method, group, model, tok, ref_model)
                    if bar is not None:
                        bar.update(len(group))
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
        measures_s, df = timed(
            lambda: measures.next_token_measures(ref_logits, logits, c.exact_temperatures, c.exact_top_ks, answers)
        )
        # a prompt whose logits overflowed (fp16) has no meaningful distribution: NaN, flagged
        finite = torch.isfinite(logits).all(-1).numpy()[df.prompt_index.to_numpy()]
        df["top1_agree"] = df.top1_agree.astype(float)
        df.loc[~finite, ["tv", "kl", "top1_agree", "entropy", "p_answer"]] = float("nan")
        df["finite"] = finite
        df.insert(0, "prompt_id", self.prompts.id.to_numpy()[df.prompt_index])
        df.insert(1, "kind", self.prompts.kind.to_numpy()[df.prompt_index])
        df = df.drop(columns="prompt_index")
        timing = {
            "model": model_name,
            "method": method,
            "prompts": len(prompts),
            "forward_s": forward_s,
            "measures_s": measures_s,
            "grid_points": len(c.exact_temperatures) * len(c.exact_top_ks),
            "vocab": logits.shape[1],
            "load_average": machine_load(),
        }
        self.exact_store.write(
            self.exact_key(model_name, method),
            df,
            notebook="02_sampling_sweep",
            device=c.device,
            config=asdict(c),
            timing=timing,
        )

    def _unit_jobs(self, temperature: float) -> list[tuple[int, int]]:
        """(prompt index, sample index) of every sequence of a generation unit (greedy: one per prompt)."""
        return [
            (i, s) for i in range(len(self.gen_prompts)) for s in range(1 if temperature == 0 else self.cfg.n_seeds)
        ]

    def _gen_groups(self, units: list[Unit]) -> list[list[Unit]]:
        """Consecutive generation units packed into groups of at most ``batch_size`` sequences, which
        are decoded together (a larger unit is a group of its own, decoded in several batches)."""
        greedy = [u for u in units if u.temperature == 0]  # one sequence at a time (see _generations)
        groups: list[list[Unit]] = [greedy] if greedy else []
        size = self.cfg.batch_size
        for unit in [u for u in units if u.temperature != 0]:
            n = len(self._unit_jobs(unit.temperature))
            if groups and groups[-1] is not greedy and size + n <= self.cfg.batch_size:
                groups[-1].append(unit)
                size += n
            else:
                groups.append([unit])
                size = n
        return groups

    def _reference_tokens(self, model_name, temperature, top_k) -> dict[tuple[str, int], list[int]]:
        ref = self.gen_store.read_unit(self.gen_key(model_name, self.cfg.reference, temperature, top_k))
        if ref.empty:
            return {}
        ref = ref[ref.max_new_tokens == max(self.cfg.max_new_tokens)]
        return {(r.prompt_id, int(r["sample"])): [int(t) for t in str(r.tokens).split()] for _, r in ref.iterrows()}

    def _generations(self, model_name, method, units, model, tok, ref_model) -> None:
        """Decode the sequences of ``units`` (one model and method) together, then score and store
        each unit. Greedy decoding ignores top-k, so greedy units of several top-k share sequences.

        Greedy units decode one sequence at a time, as one user would: a batch-dependent method
        (LLM.int8(), the 4-bit CPU kernels; notebook 02, section 5) gives a sequence the numbers of
        its batch, and greedy text, where repetition loops show, follows every small change.
        Sampled units decode ``batch_size`` sequences together; the ``batch`` column says which."""
        c = self.cfg
        prompts, longest, is_ref = self.gen_prompts, max(c.max_new_tokens), method == c.reference
        batch = 1 if all(u.temperature == 0 for u in units) else c.batch_size
        decoded: dict[tuple, int] = {}  # (prompt index, sample, T, top-k that matters) -> generated row
        for unit in units:
            for i, s in self._unit_jobs(unit.temperature):
                top_k = unit.top_k if unit.temperature > 0 else 0
                decoded.setdefault((i, s, unit.temperature, top_k), len(decoded))
        keys = list(decoded)
        seeds = [generation.sequence_seed(prompts.id[i], s, c.base_seed) for i, s, _, _ in keys]
        gen_s, gen = timed(
            lambda: generation.generate(
                model,
                tok,
                [prompts.prompt[i] for i, *_ in keys],
                seeds,
                [T for _, _, T, _ in keys],
                [k for *_, k in keys],
                longest,
                batch,
                with_nll=is_ref,
            ),
            c.device,
        )
        # log-loss under the reference: the reference's own generations bring it, without a second pass
        ref_s, nll = (
            (0.0, gen.nll)
            if is_ref
            else timed(lambda: generation.reference_nll(ref_model, gen.prompt_ids, gen.tokens), c.device)
        )
        eos = {t for t in [tok.eos_token_id, getattr(tok, "pad_token_id", None)] if t is not None}
        n_jobs = sum(len(self._unit_jobs(u.temperature)) for u in units)
        for unit in units:
            temperature, top_k = unit.temperature, unit.top_k
            jobs = self._unit_jobs(temperature)
            ref_lookup = {} if is_ref else self._reference_tokens(model_name, temperature, top_k)
            rows = []
            for i, s in jobs:
                g = decoded[(i, s, temperature, top_k if temperature > 0 else 0)]
                tokens, p = gen.tokens[g].tolist(), prompts.iloc[i]
                ref_tokens = tokens if is_ref else ref_lookup.get((p.id, s))
                answer = p.answer if p.kind == "cloze" else None
                for scores in score_generation(
                    tokens, nll[g], ref_tokens, c.max_new_tokens, eos, tok.decode, answer, bool(gen.finite[g])
                ):
                    rows.append(
                        {"prompt_id": p.id, "kind": p.kind, "sample": s, "seed": seeds[g], "batch": batch, **scores}
                    )
            share = len(jobs) / n_jobs  # of the group's time, in proportion to the unit's sequences
            timing = {
                "model": model_name,
                "method": method,
                "temperature": temperature,
                "top_k": top_k,
                "sequences": len(jobs),
                "new_tokens": longest,
                "generate_s": share * gen_s,
                "reference_s": share * ref_s,
                "group_units": len(units),
                "group_sequences": len(keys),
                "group_generate_s": gen_s,
                "group_reference_s": ref_s,
                "batch_size": batch,
                "load_average": machine_load(),
            }
            self.gen_store.write(
                self.gen_key(model_name, method, temperature, top_k),
                pd.DataFrame(rows),
                notebook="02_sampling_sweep",
                device=c.device,
                config=asdict(c),
                timing=timing,
            )


def batched_vs_loop(
    model, tok, texts: list[str], seeds: list[int], temperature: float, new_tokens: int, batch_size: int
) -> dict[str, Any]:
    """Time seeded sampling of ``texts`` as one batch against a per-sample loop (after a warm-up).

    Both draw every token from the sample's own stream of uniform numbers, so the sequences should
    be identical; ``identical_sequences`` is the share that is (batched logits may differ from a
    one-sequence pass in the last bits, which moves a draw lying next to a token boundary)."""
    generation.generate(model, tok, texts[:2], seeds[:2], temperature, 0, 2)  # warm-up
    batched_s, batched = timed(
        lambda: generation.generate(model, tok, texts, seeds, temperature, 0, new_tokens, batch_size)
    )
    loop_s, looped = timed(
        lambda: [
            generation.generate(model, tok, [t], [s], temperature, 0, new_tokens).tokens[0]
            for t, s in zip(texts, seeds)
        ]
    )
    same = (torch.stack(looped) == batched.tokens).all(1)
    return {
        "samples": len(texts),
        "new_tokens": new_tokens,
        "temperature": temperature,
        "loop_s": loop_s,
        "batched_s": batched_s,
        "speedup": loop_s / batched_s,
        "identical_sequences": same.float().mean().item(),
    }


# scores of a generation that are NaN when its logits overflowed (its tokens are kept)
GENERATION_SCORES = (
    "ref_nll",
    "distinct_1",
    "distinct_2",
    "repetition",
    "loop_tokens",
    "in_loop",
    "first_word_correct",
    "diverge_at",
    "agree_tokens",
    "agree_prefix",
)


def score_generation(
    tokens: list[int],
    nll: torch.Tensor,
    ref_tokens: list[int] | None,
    max_new_tokens: list[int],
    eos_ids: set[int],
    decode: Callable[[list[int]], str],
    answer: str | None = None,
    finite: bool = True,
) -> list[dict[str, Any]]:
    """The generation table's columns for one generated sequence, one dict per prefix length.

    ``tokens`` is the longest generation and ``nll`` its per-token NLL under the reference; for
    each ``n`` in ``max_new_tokens`` the first ``n`` tokens are cut at the first end-of-sequence
    token (``n_tokens`` is what is left) and scored:

    * ``ref_nll``: mean NLL under the reference (nats per token; its exp is the reference perplexity);
    * ``distinct_1``, ``distinct_2``, ``repetition`` (3-gram), ``loop_tokens`` and ``in_loop``
      (:func:`helpers.generation.loop_tokens`; ``in_loop`` is 1.0 when at least
      ``generation.LOOP_MIN_TOKENS`` tokens loop);
    * ``first_word_correct`` (cloze prompts, ``answer`` given; NaN otherwise);
    * against ``ref_tokens``, the reference's generation with the same seed (all NaN when it is
      None): ``diverge_at``, the number of tokens before the first difference (``n`` when the two
      texts are equal, so also for the reference itself), ``agree_prefix = diverge_at / n`` and
      ``agree_tokens``, the share of the ``n`` positions holding the same token. Positions after a
      text's end count as one "ended" token, so two texts that end at the same place agree there.

    ``tokens`` (space-separated ids of the ``n`` tokens, before the cut) and ``text`` (the decoded
    longest generation; empty for shorter prefixes) are kept for inspection. When ``finite`` is
    False (the logits overflowed) the scores are NaN.
    """
    longest = max(max_new_tokens)
    rows = []
    for n in max_new_tokens:
        kept = generation.truncate_at_eos(tokens[:n], eos_ids)
        text = decode(kept, skip_special_tokens=True)
        loop = generation.loop_tokens(kept)
        row = {
            "max_new_tokens": n,
            "n_tokens": len(kept),
            "ref_nll": nll[: len(kept)].mean().item() if kept else float("nan"),
            "distinct_1": generation.distinct_n(kept, 1),
            "distinct_2": generation.distinct_n(kept, 2),
            "repetition": generation.repetition_rate(kept, 3),
            "loop_tokens": loop,
            "in_loop": float(loop >= generation.LOOP_MIN_TOKENS),
            "first_word_correct": (
                float(generation.first_word(text) == answer.strip().lower()) if answer is not None else float("nan")
            ),
        }
        if ref_tokens is not None:
            ended = kept + [-1] * (n - len(kept))  # -1: "the text has ended", never a token id
            ref_kept = generation.truncate_at_eos(ref_tokens[:n], eos_ids)
            ref_ended = ref_kept + [-1] * (n - len(ref_kept))
            row["diverge_at"] = generation.diverge_at(ended, ref_ended)
            row["agree_tokens"] = sum(a == b for a, b in zip(ended, ref_ended)) / n
            row["agree_prefix"] = row["diverge_at"] / n
        else:
            row["diverge_at"] = row["agree_tokens"] = row["agree_prefix"] = float("nan")
        if not finite:  # tokens drawn from overflowed logits: keep the row, not its scores
            row.update(dict.fromkeys(GENERATION_SCORES, float("nan")))
        row.update({"tokens": " ".join(map(str, tokens[:n])), "text": text if n == longest else "", "finite": finite})
        rows.append(row)
    return rows
