"""Seeded batched generation with common random numbers, and the quality of what it writes.

:func:`generate` decodes a batch with a KV cache for a fixed number of tokens. The token at step
``t`` of a sequence is drawn by inverse-CDF sampling with one uniform number
``u = hash(sequence_seed, t)``. The same prompt and sample index get the same seed in every
method, so two methods facing nearly the same distribution draw the same token: differences
between methods come from the method, not from luck. Because the noise depends only on
(seed, step), a per-sample loop draws exactly the samples the batch does, and a generation of N
tokens is the prefix of one of M > N tokens with the same seed.

Also here: the quality measures of a generation (repetition loops, distinct-n, where it leaves
the reference's) and :func:`batch_dependence`, which measures how much a prompt's next-token
distribution depends on the batch it is computed in (notebook 02, section 5).

Conventions as in :mod:`helpers.measures`: ``T == 0`` is greedy, ``top_k == 0`` is off, top-k
keeps exactly k tokens.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from .measures import LOG2E, argmax, by_rows, log_normalizer, row_by_row, validate

MASK32 = 0xFFFFFFFF


# --------------------------------------------------------------------------- random numbers
def sequence_seed(prompt_id: str, sample_index: int, base_seed: int = 0) -> int:
    """A 32-bit seed for one (prompt, sample index): the same in every method."""
    return zlib.crc32(f"{base_seed}/{prompt_id}/{sample_index}".encode()) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # a well-mixed 32-bit integer hash, computed in int64 without overflow (x < 2**32, constant < 2**27)
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & MASK32
    return x ^ (x >> 16)


def step_uniforms(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform number in (0, 1) per sequence for decoding step ``step`` (float64)."""
    h = _mix32(_mix32(seeds.long() & MASK32) ^ _mix32(torch.full_like(seeds.long(), step + 0x9E3779B9 & MASK32)))
    h2 = _mix32(h ^ 0x85EBCA6B)
    return ((h * 2.0**21 + (h2 >> 11)) + 0.5) / 2.0**53  # 53 random bits, never 0 or 1


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row by inverse-CDF sampling with the given uniforms (T == 0: argmax)."""
    if temperature == 0:
        return argmax(logits.float())
    return inverse_cdf(sampling_weights(logits, temperature, top_k), uniforms)


def sampling_weights(logits: torch.Tensor, temperature: float, top_k: int = 0) -> torch.Tensor:
    """:func:`next_token_probs` before normalisation: ``exp((x - max x) / T)`` per row, 0 outside
    the top-k. :func:`inverse_cdf` divides by the total itself, so the softmax's division is not
    needed. Where subnormals are flushed (:func:`on_row_threads`), weights below about 1e-38 of the
    largest are 0."""
    validate(temperature=temperature, top_k=top_k)
    x = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(argmax(x), x.shape[-1]).float()
    if 0 < top_k < x.shape[-1]:
        vals, idx = x.topk(top_k, dim=-1)  # sorted: the first column is the row's maximum
        return torch.zeros_like(x).scatter_(-1, idx, torch.exp2((vals - vals[:, :1]) * (LOG2E / temperature)))
    return scaled_exp(x, LOG2E / temperature)


def scaled_exp(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``exp2((x - max x) * scale)`` for every row of ``x`` ``[B, V]``: ``exp((x - max x) / T)``
    with ``scale = log2(e) / T`` (``exp2`` is cheaper than ``exp``), in a new tensor."""
    return torch.sub(x, x.amax(-1, keepdim=True)).mul_(scale).exp2_()


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Per row of ``weights`` ``[B, V]`` (probabilities, normalised or not): the first token whose
    cumulative weight reaches ``u * total`` (``u`` in (0, 1) from ``uniforms``). Tokens of weight 0
    are never drawn.

    Two levels: the cumulative sum of the ``V / block`` block totals, then within the one block
    that holds ``u``. The block totals are summed in float32 and accumulated in float64; a float64
    sum over the whole ``[B, V]`` block took most of the time of a sampling step
    (``benchmarks/README.md``).
    """
    B, V = weights.shape
    n_blocks = -(-V // block)
    if n_blocks * block != V:  # pad with zero-weight tokens, which are never drawn
        weights = torch.nn.functional.pad(weights, (0, n_blocks * block - V))
    blocks = weights.view(B, n_blocks, block)
    ends = blocks.sum(-1).double().cumsum(-1)  # weight up to the end of each block
    u = uniforms.double().to(weights.device)[:, None] * ends[:, -1:]
    b = torch.searchsorted(ends, u).clamp_max(n_blocks - 1)  # the block where the CDF reaches u
    before = torch.where(b > 0, ends.gather(1, (b - 1).clamp_min(0)), 0.0)
    inner = blocks[torch.arange(B, device=weights.device), b[:, 0]].double().cumsum(-1)
    j = torch.searchsorted(inner, u - before)
    # rounding may put u - before just above the block's own sum: take its last non-zero token
    j = torch.minimum(j, torch.searchsorted(inner, inner[:, -1:].contiguous()))
    return (b * block + j).squeeze(1).clamp_max(V - 1)  # NaN rows (overflowed logits) still get a valid index


# --------------------------------------------------------------------------- generation
def left_pad(
    sequences: list[list[int]], pad_id: int, device, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token lists to ``width`` (default: the longest) into ``(input_ids, attention_mask,
    position_ids)``.

    Explicit position ids (counting only real tokens) make a sequence's logits independent of how
    much padding its batch needed, for kernels that compute every row on its own: fp32 here, but
    not LLM.int8() nor every 4-bit kernel (notebook 02, section 5).
    """
    width = max(map(len, sequences)) if width is None else width
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


@dataclass
class Generation:
    """Fixed-length generations of a batch: ``tokens`` is ``[B, max_new_tokens]``."""

    tokens: torch.Tensor
    prompt_ids: list[list[int]]
    finite: torch.Tensor  # [B] bool: False where some step's logits had inf/NaN (fp16 overflow)
    nll: torch.Tensor | None = None  # [B, max_new_tokens]: -log p(token) under the generating model at T = 1


def _per_row(value, n: int, name: str) -> list:
    """A per-prompt list from one value or a list of ``n`` values."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{n} prompts but {len(values)} {name} values")
    return values


def sample_rows(logits: torch.Tensor, settings: list[tuple[float, int]], uniforms: torch.Tensor) -> torch.Tensor:
    """:func:`sample_tokens` for rows that differ in (temperature, top-k): ``settings[i]`` is row
    ``i``'s. Row by row where :func:`row_by_row` says so, otherwise one batched call per setting."""
    if row_by_row(logits):
        return by_rows(lambda r: sample_tokens(logits[r], *settings[r.start], uniforms[r]), logits)
    out = torch.empty(len(logits), dtype=torch.long, device=logits.device)
    for setting in dict.fromkeys(settings):
        rows = [i for i, s in enumerate(settings) if s == setting]
        out[rows] = sample_tokens(logits[rows], *setting, uniforms[rows])
    return out


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    seeds: list[int],
    temperature: float | list[float],
    top_k: int | list[int],
    max_new_tokens: int,
    batch_size: int = 64,
    with_nll: bool = False,
) -> Generation:
    """Decode exactly ``max_new_tokens`` tokens for every prompt (no early stop at EOS).

    ``temperature`` and ``top_k`` are one value for all prompts or one per prompt: sequences of
    different settings can share a batch, which matters on a CPU, where a decoding step of 384
    sequences costs about 30% less per sequence than one of 72. Prompts are left-padded into
    batches of ``batch_size`` with explicit position ids, so a sequence's logits do not depend on
    its neighbours (up to floating-point rounding) where the model's kernels compute every row on
    its own; LLM.int8()'s do not (notebook 02, section 5). ``with_nll`` also returns each token's NLL
    under ``model`` itself (T = 1, no top-k): for the reference model that is
    :func:`reference_nll` without a second forward pass.
    """
    temperatures = _per_row(temperature, len(prompts), "temperature")
    top_ks = _per_row(top_k, len(prompts), "top_k")
    for T, k in set(zip(temperatures, top_ks)):
        validate(T, k, max_new_tokens)
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    out, finite, nlls = [], [], []
    for start in range(0, len(prompts), batch_size):
        ids = encoded[start : start + batch_size]
        seed_t = torch.tensor(seeds[start : start + batch_size], dtype=torch.long)
        settings = list(zip(temperatures, top_ks))[start : start + batch_size]
        input_ids, mask, pos = left_pad(ids, pad, device)
        # logits_to_keep=1: the prefill needs the lm_head at the last position only
        res = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, steps, step_nll = res.past_key_values, [], []
        ok = torch.ones(len(ids), dtype=torch.bool)
        for step in range(max_new_tokens):
            logits = res.logits[:, -1]
            # one reduction instead of isfinite's three passes: a sum of finite logits stays finite
            ok &= torch.isfinite(logits.sum(-1, dtype=torch.float32)).cpu()
            tok = sample_rows(logits, settings, step_uniforms(seed_t, step))
            steps.append(tok.cpu())
            if with_nll:
                x = logits.float()
                step_nll.append((log_normalizer(x) - x.gather(1, tok[:, None]).squeeze(1)).cpu())
            if step + 1 == max_new_tokens:
                break
            mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
            pos = pos[:, -1:] + 1
            res = model(
                input_ids=tok[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
            )
            cache = res.past_key_values
        out.append(torch.stack(steps, dim=1))
        finite.append(ok)
        if with_nll:
            nlls.append(torch.stack(step_nll, dim=1))
    return Generation(torch.cat(out), encoded, torch.cat(finite), torch.cat(nlls) if with_nll else None)


# --------------------------------------------------------------------------- quality
def truncate_at_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """Tokens up to (not including) the first end-of-sequence token."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i]
    return tokens


def distinct_n(tokens: list[int], n: int) -> float:
    """Unique n-grams / total n-grams of one sequence (NaN if shorter than n)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repetition_rate(tokens: list[int], n: int = 3) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same sequence: 1 - distinct-n."""
    d = distinct_n(tokens, n)
    return 1 - d if not math.isnan(d) else float("nan")


LOOP_MAX_PERIOD = 16  # longest repeated pattern that :func:`loop_tokens` looks for, in tokens
LOOP_MIN_TOKENS = 8  # a generation "is in a loop" when at least this many of its last tokens loop


def loop_tokens(tokens: list[int], max_period: int = LOOP_MAX_PERIOD) -> int:
    """Length of the repetition loop a sequence ends in: the longest suffix made of one pattern of
    at most ``max_period`` tokens repeated at least twice (0 if there is none).

    A suffix ``s`` loops with period ``p`` when ``s[i] == s[i + p]`` for every ``i`` and
    ``len(s) >= 2 p``; a partial copy at its start counts, so ``[9, 1, 2, 3, 1, 2, 3, 1]`` gives
    7 (period 3). Greedy and low-temperature decoding fall into such loops, the "degeneration"
    of Holtzman et al. (2020, arXiv 1904.09751); unlike :func:`repetition_rate` this sees a
    repeated word (period 1) as well as a repeated sentence, and only when the text ends in it.
    """
    n, best = len(tokens), 0
    for p in range(1, min(max_period, n // 2) + 1):
        run = 0  # trailing positions i with tokens[i] == tokens[i - p]
        while run < n - p and tokens[n - 1 - run] == tokens[n - 1 - run - p]:
            run += 1
        if run >= p:  # the suffix of length run + p holds at least two full periods
            best = max(best, run + p)
    return best


def diverge_at(tokens: list[int], ref_tokens: list[int]) -> int:
    """Number of leading tokens two sequences share: the index of their first difference, or the
    shorter length when one is a prefix of the other."""
    for i, (a, b) in enumerate(zip(tokens, ref_tokens)):
        if a != b:
            return i
    return min(len(tokens), len(ref_tokens))


def first_word(text: str) -> str:
    """The first word of a generation, lower-cased, without surrounding punctuation."""
    for word in text.split():
        w = word.strip(".,;:!?\"'()[]{}«»“”‘’-").lower()
        if w:
            return w
    return ""


@torch.inference_mode()
def token_nll(
    model, heads: Sequence[list[int]], tails: Sequence[list[int]], pad: int = 0, batch_size: int = 16
) -> list[torch.Tensor]:
    """Per-token NLL (nats) of each token of ``tails[i]`` given ``heads[i]`` and the tail's tokens
    before it, under ``model``: one float tensor per row, on the CPU (empty for an empty tail).

    Rows are batched longest first and left-padded with explicit positions (``pad`` fills, masked
    out); ``logits_to_keep`` runs the output head over the tail's positions only. The one scorer
    behind :func:`reference_nll` and :func:`helpers.judge.continuation_nll`."""
    device = next(model.parameters()).device
    out = [torch.empty(0) for _ in heads]
    order = sorted(range(len(heads)), key=lambda i: -(len(heads[i]) + len(tails[i])))
    for start in range(0, len(order), batch_size):
        rows = [i for i in order[start : start + batch_size] if len(tails[i])]
        if not rows:
            continue
        keep = max(len(tails[i]) for i in rows) + 1
        ids, mask, pos = left_pad([list(heads[i]) + list(tails[i]) for i in rows], pad, device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits.float()
        for j, i in enumerate(rows):
            n = len(tails[i])
            x = logits[j, keep - 1 - n : keep - 1]  # the positions that predict the tail's tokens
            target = torch.tensor(list(tails[i]), device=device)[:, None]
            out[i] = (log_normalizer(x) - x.gather(1, target).squeeze(1)).cpu()
    return out


def reference_nll(model, prompt_ids: list[list[int]], generated: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Per-token NLL (nats) of each generated token under ``model`` (the fp32 reference).

    Returns ``[B, L]``; the cumulative mean over a prefix gives the reference perplexity of the
    first ``n`` tokens for every ``n`` at once.
    """
    return torch.stack(token_nll(model, prompt_ids, generated.tolist(), 0, batch_size))


# --------------------------------------------------------------------------- batch dependence
@torch.inference_mode()
def batch_dependence(model: torch.nn.Module, tokenizer, prompts: list[str], copies: int = 4) -> dict[str, float]:
    """How much each prompt's next-token log-probabilities change with the batch it is computed in.

    Each prompt alone is compared with the same prompt computed three other ways, each adding one
    thing: ``padded``, alone but left-padded to the width of the longest prompt (padding only);
    ``copies``, in a batch of ``copies`` copies of itself (more rows, same content); ``mixed``, in
    one left-padded batch of all ``prompts`` (other content, padding and more rows: how
    :func:`generate` starts). Explicit position ids throughout. For each view, the
    largest and the median over prompts of ``max |log p(batched) - log p(alone)|`` over the
    vocabulary (nats), and the share of prompts whose greedy token changes. This is the first
    step (the prompt) only, not the decoding steps after it. Kernels that compute every row on
    its own change by float32 rounding only (about 1e-5); LLM.int8() chooses its outlier columns
    over all rows of a matmul's input (bitsandbytes#28, transformers#27626), and kernels chosen by
    the input's shape can round differently.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, encoded))

    def log_probs(seqs: list[list[int]], pad_to: int | None = None) -> torch.Tensor:
        ids, mask, pos = left_pad(seqs, pad, device, pad_to)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
        return torch.log_softmax(logits.float(), -1)

    alone = torch.cat([log_probs([ids]) for ids in encoded])
    views = {
        "padded": torch.cat([log_probs([ids], width) for ids in encoded]),
        "copies": torch.cat([log_probs([ids] * copies)[:1] for ids in encoded]),
        "mixed": log_probs(encoded),
    }
    out: dict[str, float] = {"prompts": len(prompts)}
    for name, x in views.items():
        change = (x - alone).abs().amax(-1)
        out[f"{name}_max_change"] = float(change.max())
        out[f"{name}_median_change"] = float(change.median())
        out[f"{name}_greedy_changed"] = float((argmax(x) != argmax(alone)).float().mean())
    return out


#: The views of :func:`batch_dependence`.
BATCH_VIEWS = ("padded", "copies", "mixed")


def batch_dependent(table: pd.DataFrame, tolerance: float = 1e-3) -> pd.DataFrame:
    """A :func:`batch_dependence` table (one row per model and method) with ``max_change``, the
    largest change over the views, and ``dependent``: True where it exceeds ``tolerance`` nats, far
    above float32 rounding, or is not a number."""
    moved = table[[f"{v}_max_change" for v in BATCH_VIEWS]].max(axis=1, skipna=False)
    return table.assign(max_change=moved, dependent=moved.isna() | (moved > tolerance))
