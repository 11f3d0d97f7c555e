"""Exact next-token measures: what temperature and top-k do to one next-token distribution.

Temperature ``T`` and top-k only reshape the next-token distribution
``p = softmax(topk(logits, k) / T)``. So one forward pass per (prompt, method) gives, for every
(T, k) at once and without sampling noise, the total variation and KL divergence from the
reference model's distribution at the same (T, k), top-1 agreement, the probability of a cloze
answer and the entropy (:func:`next_token_measures`). Its CPU kernel (:func:`_dense_row`, rows
shared out by :func:`on_row_threads`) is tested against a float64 log-space specification in
``tests/test_measures.py``.

Conventions: ``T == 0`` means greedy (argmax, first index on ties); ``top_k == 0`` means off;
top-k keeps exactly k tokens even on ties (``torch.topk``), not "every logit >= the k-th"
(litgpt#729). Logits are cast to float32 before dividing by T, so fp16 models at very low T
give no inf/NaN (accelerate#1104, transformers#32174).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch

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


# --------------------------------------------------------------------------- rows on threads
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
