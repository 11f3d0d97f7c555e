"""Sampling hyperparameters: exact next-token measures and seeded batched generation.

**Exact next-token sensitivity.** Temperature ``T`` and top-k only reshape the next-token
distribution ``p = softmax(topk(logits, k) / T)``. So one forward pass per (prompt, method)
gives, for every (T, k) at once and without sampling noise, the total variation and KL
divergence from the reference model's distribution at the same (T, k), top-1 agreement, the
probability of a cloze answer and the entropy (:func:`next_token_measures`).

**Sampling with common random numbers.** :func:`generate` decodes a batch with a KV cache for a
fixed number of tokens. The token at step ``t`` of a sequence is drawn by inverse-CDF sampling
with one uniform number ``u = hash(sequence_seed, t)``. The same prompt and sample index get the
same seed in every method, so two methods facing nearly the same distribution draw the same
token: differences between methods come from the method, not from luck. Because the noise
depends only on (seed, step), a per-sample loop draws exactly the samples the batch does, and a
generation of N tokens is the prefix of one of M > N tokens with the same seed.

Conventions: ``T == 0`` means greedy (argmax, first index on ties); ``top_k == 0`` means off;
top-k keeps exactly k tokens even on ties (``torch.topk``), not "every logit >= the k-th"
(litgpt#729). Logits are cast to float32 before dividing by T, so fp16 models at very low T
give no inf/NaN (accelerate#1104, transformers#32174).
"""

from __future__ import annotations

import math
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch

MASK32 = 0xFFFFFFFF
#: The smallest temperature above 0 (greedy) accepted: below it, scaling float32 logits by 1 / T can overflow.
MIN_TEMPERATURE = 1e-6


# --------------------------------------------------------------------------- validation
def validate(temperature: float | None = None, top_k: int | None = None, max_new_tokens: int | None = None) -> None:
    """Reject invalid sampling settings with a one-line reason (``None`` skips a check)."""
    if temperature is not None and (
        not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if temperature is not None and 0 < temperature < MIN_TEMPERATURE:  # 1 / T would overflow the exponentials
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


def validate_grid(temperatures, top_ks, max_new_tokens) -> None:
    """Check whole grids up front, before any model is loaded."""
    for name, values in (("temperatures", temperatures), ("top_ks", top_ks), ("max_new_tokens", max_new_tokens)):
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"{name} must be a non-empty list, got {values!r}")
    for t in temperatures:
        validate(temperature=t)
    for k in top_ks:
        validate(top_k=k)
    for n in max_new_tokens:
        validate(max_new_tokens=n)


# --------------------------------------------------------------------------- distributions
def next_token_probs(logits: torch.Tensor, temperature: float, top_k: int = 0) -> torch.Tensor:
    """``softmax(topk(logits, k) / T)`` in float32 over the last dimension.

    ``T == 0`` gives the one-hot of the argmax. Exactly ``k`` tokens keep non-zero probability.
    """
    validate(temperature=temperature, top_k=top_k)
    x = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).float()
    if 0 < top_k < x.shape[-1]:
        vals, idx = x.topk(top_k, dim=-1)
        x = torch.full_like(x, float("-inf")).scatter(-1, idx, vals)
    return torch.softmax(x / temperature, dim=-1)


#: The columns of :func:`next_token_measures`, after ``prompt_index``, ``temperature`` and ``top_k``.
MEASURES = ("tv", "kl", "top1_agree", "entropy", "p_answer", "ref_p_answer", "logp_answer", "ref_logp_answer")


def next_token_measures(
    ref_logits: torch.Tensor,
    logits: torch.Tensor,
    temperatures: list[float],
    top_ks: list[int],
    answer_ids: torch.Tensor | None = None,
) -> pd.DataFrame:
    """Exact measures of a method's next-token distribution against the reference's, at every (T, k).

    ``ref_logits`` and ``logits`` are ``[P, V]`` (one row per prompt or text position). Returns one
    row per (T, k, prompt index), in the order given, with the columns :data:`MEASURES`:
    ``tv`` (total variation), ``kl`` (KL(ref || method); inf when the method's top-k misses a token
    the reference's keeps), ``top1_agree``, ``entropy`` (nats, of the method's distribution),
    ``p_answer`` (the method's probability of ``answer_ids[i]``; NaN where it is < 0),
    ``ref_p_answer``, and their logarithms ``logp_answer`` / ``ref_logp_answer``, computed in log
    space so the log-loss stays exact where the probability underflows.

    Three parts: greedy (T = 0), top-k (the k largest logits, every T at once) and dense (top-k
    off, :func:`_dense`). :func:`measures_spec` is the definition the parts are tested against.
    """
    # -inf logits (masked tokens) would give inf - inf; a huge finite value has probability 0
    ref, x = _finite(ref_logits), _finite(logits)
    P, V = x.shape
    answers = answer_ids if answer_ids is not None else torch.full((P,), -1, dtype=torch.long)
    ans = answers.clamp_min(0)
    ref_top, x_top = argmax(ref), argmax(x)
    hot = [T for T in temperatures if T > 0]
    parts: dict[int, dict[str, torch.Tensor]] = {}  # top-k -> measure -> [len(hot), P]
    ks = sorted({k for k in top_ks if 0 < k < V})
    if hot and ks:  # the largest k selected once: the smaller ones are its first columns (sorted)
        largest = (*ref.topk(ks[-1], dim=-1), *x.topk(ks[-1], dim=-1))
        for k in ks:
            parts[k] = _top_k(*(t[:, :k] for t in largest), hot, ans)
    if hot and any(k == 0 or k >= V for k in top_ks):
        parts[0] = _dense(ref, x, hot, ans)
    for values in parts.values():
        values["top1_agree"] = (ref_top == x_top).expand(len(hot), -1)
    greedy = _greedy(ref_top, x_top, ans)
    frames = []
    for T in temperatures:
        for k in top_ks:
            values = greedy if T == 0 else {m: v[hot.index(T)] for m, v in parts[k if 0 < k < V else 0].items()}
            frames.append(
                pd.DataFrame(
                    {"prompt_index": range(P), "temperature": T, "top_k": k, **{m: values[m].numpy() for m in MEASURES}}
                )
            )
    out = pd.concat(frames, ignore_index=True)
    for m, (lo, hi) in {"tv": (0, 1), "kl": (0, None), "entropy": (0, None)}.items():
        out[m] = out[m].clip(lo, hi)  # rounding can step just outside
    out["top1_agree"] = out["top1_agree"].astype(bool)
    no_answer = np.tile(answers.numpy() < 0, len(frames))
    out.loc[no_answer, ["p_answer", "ref_p_answer", "logp_answer", "ref_logp_answer"]] = np.nan
    return out


def measures_spec(ref_logits: torch.Tensor, logits: torch.Tensor, T: float, k: int, answer: int) -> dict[str, float]:
    """The definition of :func:`next_token_measures` for one row, in float64 log space (slow; for tests)."""
    a, b = ref_logits.double(), logits.double()
    if T == 0:
        agree = bool(a.argmax() == b.argmax())
        p_ans, ref_p_ans = float(b.argmax() == answer), float(a.argmax() == answer)
        return dict(
            tv=1.0 - agree,
            kl=0.0 if agree else math.inf,
            top1_agree=agree,
            entropy=0.0,
            p_answer=p_ans,
            ref_p_answer=ref_p_ans,
            logp_answer=math.log(p_ans) if p_ans else -math.inf,
            ref_logp_answer=math.log(ref_p_ans) if ref_p_ans else -math.inf,
        )

    def log_probs(z: torch.Tensor) -> torch.Tensor:
        if 0 < k < len(z):
            z = torch.full_like(z, -math.inf).scatter(0, z.topk(k).indices, z.topk(k).values)
        return torch.log_softmax(z / T, 0)

    lp, lq = log_probs(a), log_probs(b)
    p, q = lp.exp(), lq.exp()
    kept = lp > -math.inf  # the support (every kept token has p > 0, even where it underflows)
    kl = math.inf if (lq[kept] == -math.inf).any() else float((p[kept] * (lp[kept] - lq[kept])).sum())
    return dict(
        tv=0.5 * float((p - q).abs().sum()),
        kl=kl,
        top1_agree=bool(a.argmax() == b.argmax()),
        entropy=-float((q[q > 0] * lq[q > 0]).sum()),
        p_answer=float(q[answer]),
        ref_p_answer=float(p[answer]),
        logp_answer=float(lq[answer]),
        ref_logp_answer=float(lp[answer]),
    )


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)``, first index on ties, computed as ``x.max(-1).indices`` (same result, about
    twice as fast on CPU for wide rows: ``benchmarks/measures_kernel.py``)."""
    return x.max(-1).indices


def _greedy(ref_top: torch.Tensor, x_top: torch.Tensor, ans: torch.Tensor) -> dict[str, torch.Tensor]:
    """T = 0: both methods pick their argmax (first index on ties); top-k does not matter."""
    agree = ref_top == x_top
    p_ans, ref_p_ans = (x_top == ans).double(), (ref_top == ans).double()
    return dict(
        tv=1.0 - agree.double(),
        kl=torch.where(agree, 0.0, math.inf).double(),
        top1_agree=agree,
        entropy=torch.zeros(len(x_top), dtype=torch.float64),
        p_answer=p_ans,
        ref_p_answer=ref_p_ans,
        logp_answer=p_ans.log(),
        ref_logp_answer=ref_p_ans.log(),
    )


def _top_k(ref_vals, ref_idx, x_vals, x_idx, hot: list[float], ans: torch.Tensor) -> dict[str, torch.Tensor]:
    """Top-k on: each distribution lives on its own k tokens (``[P, k]`` values and indices from
    ``topk``), every T at once as ``[T, P, k]`` blocks."""
    temps = torch.tensor(hot, dtype=torch.float32)[:, None, None]
    match = ref_idx[:, :, None] == x_idx[:, None, :]  # [P, k, k]: where the reference's tokens sit in the method's
    found = match.any(-1)  # [P, k]
    pos = match.byte().argmax(-1).expand(len(hot), -1, -1)  # [T, P, k]
    # log space: at low T the kept tokens' probabilities underflow, their log-ratios do not
    log_p = torch.log_softmax(ref_vals / temps, -1)
    log_q = torch.log_softmax(x_vals / temps, -1)
    p, q = log_p.exp(), log_q.exp()
    q_at_p = torch.where(found, q.gather(2, pos), 0.0)
    # every kept token has p > 0 (however small), so KL is infinite when the kept sets differ
    kl = torch.where(found.all(-1), (p * (log_p - log_q.gather(2, pos))).sum(-1), math.inf)
    # log p of the answer: -inf where it is not among the kept tokens
    logp_ans = torch.where(x_idx == ans[:, None], log_q, -math.inf).amax(-1)
    ref_logp_ans = torch.where(ref_idx == ans[:, None], log_p, -math.inf).amax(-1)
    values = dict(
        tv=1 - torch.minimum(p, q_at_p).sum(-1),
        kl=kl,
        entropy=-(q * log_q).sum(-1),
        p_answer=logp_ans.exp(),
        ref_p_answer=ref_logp_ans.exp(),
        logp_answer=logp_ans,
        ref_logp_answer=ref_logp_ans,
    )
    return {m: v.double() for m, v in values.items()}


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """Float32 logits with -inf (masked tokens) as -1e30, +inf as the largest float and NaN as 0,
    so that no difference is inf - inf (a copy only where needed)."""
    x = logits.float()
    lo, hi = x.aminmax()
    return x if math.isfinite(lo) and math.isfinite(hi) else x.nan_to_num(neginf=-1e30)


LOG2E = 1.0 / math.log(2.0)


def _dense(ref: torch.Tensor, x: torch.Tensor, hot: list[float], ans: torch.Tensor) -> dict[str, torch.Tensor]:
    """Top-k off: the measures over the whole vocabulary, row by row (:func:`_dense_row`, on
    :func:`on_row_threads`)."""
    same = x is ref  # the reference against itself: one distribution per row
    out = torch.empty(len(x), len(hot), 7, dtype=torch.float64)

    def work(i: int) -> None:
        out[i] = _dense_row(ref[i], None if same else x[i], hot, int(ans[i]))

    on_row_threads(work, len(x))
    names = [m for m in MEASURES if m != "top1_agree"]  # the order of _dense_row's columns
    return dict(zip(names, out.permute(2, 1, 0)))  # measure -> [T, P]


def on_row_threads(work: Callable[[int], None], n_rows: int) -> None:
    """Call ``work(i)`` for every row ``i``, the rows shared out over the machine's threads.

    Arranged for speed on CPU in one place (``benchmarks/measures_kernel.py`` measures each choice):
    each thread runs single-threaded torch ops (short ops on wide rows gain nothing from OpenMP),
    with subnormal results flushed to zero. It sets torch's thread count for the whole process while
    it runs, so call it from one thread at a time."""
    threads = torch.get_num_threads()
    workers = max(1, min(threads, n_rows))

    def rows(first: int) -> None:
        flushed = torch.set_flush_denormal(True)  # per thread (the CPU's MXCSR register)
        try:
            with torch.inference_mode():
                for i in range(first, n_rows, workers):
                    work(i)
        finally:
            if flushed:
                torch.set_flush_denormal(False)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(rows, range(workers)))  # list() re-raises a worker's exception
    finally:
        torch.set_num_threads(threads)


def _dense_row(ref: torch.Tensor, x: torch.Tensor | None, hot: list[float], j: int) -> torch.Tensor:
    """``[T, 7]``: (tv, kl, entropy, p_answer, ref_p_answer, logp_answer, ref_logp_answer) of one row.

    With ``a``, ``b`` the logits shifted to a maximum of 0, ``e_a = exp(a / T)``, ``Z_a = sum e_a``
    (and the same for ``b``): ``KL = sum e_a (a - b) / (T Z_a) - log(Z_a / Z_b)``,
    ``H = log Z_b - sum e_b b / (T Z_b)``, ``TV = sum |e_a - (Z_a / Z_b) e_b| / (2 Z_a)``. The
    exponentials are ``exp2`` of logits pre-scaled by log2(e), which is cheaper than ``exp``.
    ``x`` None: the method is the reference itself (TV = KL = 0; one row of exponentials).
    """
    # logits shifted to a maximum of 0 and scaled by log2(e): exp2(a2 / T) = exp(a / T)
    a2 = torch.sub(ref, ref.max()).mul_(LOG2E)
    b2 = a2 if x is None else torch.sub(x, x.max()).mul_(LOG2E)
    d2 = a2 - b2
    aj, bj = float(a2[j]) / LOG2E, float(b2[j]) / LOG2E
    out = torch.empty(len(hot), 7, dtype=torch.float64)
    ea = torch.empty_like(a2)  # buffers reused at every T
    eb = ea if x is None else torch.empty_like(a2)
    for t, T in enumerate(hot):
        s = 1.0 / T
        torch.mul(a2, s, out=ea).exp2_()
        if x is not None:
            torch.mul(b2, s, out=eb).exp2_()
        za, zb = float(ea.sum()), float(eb.sum())
        lza, lzb = math.log(za), math.log(zb)
        entropy = lzb - float(torch.dot(eb, b2)) * s / (LOG2E * zb)
        if x is None:
            tv = kl = 0.0
        else:
            kl = float(torch.dot(ea, d2)) * s / (LOG2E * za) - (lza - lzb)
            tv = 0.5 * float(eb.mul_(-za / zb).add_(ea).abs_().sum()) / za  # eb's last use: in place
        out[t] = torch.tensor(
            (tv, kl, entropy, math.exp(bj * s - lzb), math.exp(aj * s - lza), bj * s - lzb, aj * s - lza),
            dtype=torch.float64,
        )
    return out


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


def log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last dimension of ``[B, V]`` logits (T = 1), row by row where
    :func:`row_by_row` says so (twice as fast for 384 rows of 262k tokens)."""
    x = logits.float()
    return by_rows(lambda r: torch.logsumexp(x[r], -1), x)


#: Rows at least this wide (400 KB in float32) are worked one at a time on CPU (:func:`row_by_row`).
ROW_BY_ROW_MIN_VOCAB = 100_000


def row_by_row(x: torch.Tensor) -> bool:
    """Whether :func:`by_rows` works ``x`` ``[B, V]`` one row at a time: on CPU, for rows of at
    least :data:`ROW_BY_ROW_MIN_VOCAB` values. Such a row stays in a core's cache through every
    pass, where a whole-batch op streams the ``[B, V]`` block through memory once per pass; narrower
    rows lose more to the per-row overhead than they gain (a sampling step of 384 rows: 3.2x faster
    at 262k tokens, 1.8x at 131k, 1.5x slower at 65k; ``benchmarks/README.md``)."""
    return x.device.type == "cpu" and len(x) > 0 and x.shape[-1] >= ROW_BY_ROW_MIN_VOCAB


def by_rows(fn: Callable[[slice], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(rows)``, a function of a slice of the rows of ``x``, over all of them: one call, or one
    call per row shared out by :func:`on_row_threads` where :func:`row_by_row` says so."""
    if not row_by_row(x):
        return fn(slice(0, len(x)))
    parts: list[torch.Tensor | None] = [None] * len(x)

    def work(i: int) -> None:
        parts[i] = fn(slice(i, i + 1))

    on_row_threads(work, len(x))
    return torch.cat(parts)


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
def reference_nll(model, prompt_ids: list[list[int]], generated: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Per-token NLL (nats) of each generated token under ``model`` (the fp32 reference).

    Returns ``[B, L]``; the cumulative mean over a prefix gives the reference perplexity of the
    first ``n`` tokens for every ``n`` at once.
    """
    device = next(model.parameters()).device
    B, L = generated.shape
    out = torch.empty(B, L)
    for start in range(0, B, batch_size):
        rows = range(start, min(B, start + batch_size))
        ids, mask, pos = left_pad([prompt_ids[i] + generated[i].tolist() for i in rows], 0, device)
        # logits_to_keep: the lm_head runs for the generated positions only, not the prompt's
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=L + 1).logits.float()
        lse = log_normalizer(logits.reshape(-1, logits.shape[-1])).view(len(rows), L + 1)
        tgt = generated[list(rows)].to(device)
        out[list(rows)] = (lse[:, :-1] - logits[:, :-1].gather(-1, tgt[..., None]).squeeze(-1)).cpu()
    return out
