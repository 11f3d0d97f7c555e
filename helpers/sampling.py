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

import torch

MASK32 = 0xFFFFFFFF


# --------------------------------------------------------------------------- validation
def validate(temperature: float | None = None, top_k: int | None = None, max_new_tokens: int | None = None) -> None:
    """Reject invalid sampling settings with a one-line reason (``None`` skips a check)."""
    if temperature is not None and (
        not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
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


def next_token_measures(
    ref_logits: torch.Tensor,
    logits: torch.Tensor,
    temperatures: list[float],
    top_ks: list[int],
    answer_ids: torch.Tensor | None = None,
) -> list[dict]:
    """Exact divergences between the reference and a method's next-token distributions.

    ``ref_logits`` and ``logits`` are ``[P, V]`` (one row per prompt, last position). Returns one
    row per (prompt index, T, k) with ``tv`` (total variation), ``kl`` (KL(ref || method), inf when
    the method's top-k misses a token the reference's keeps), ``top1_agree``, ``entropy`` (nats,
    of the method's distribution), ``p_answer`` (method's probability of ``answer_ids[i]``, NaN
    when < 0), ``ref_p_answer``, and their logarithms ``logp_answer`` / ``ref_logp_answer``
    (computed in log space, so the log-loss stays exact where the probability underflows).

    Cost: the top-k selection is made once (it does not depend on T) and its points are computed
    for all temperatures together, as ``[P, T, k]`` blocks; the dense (k off) points
    use ``KL = sum p (a - b) - (lse_a - lse_b)`` and ``H(q) = lse_b - sum q b`` for the scaled
    logits ``a, b``, computed row by row on every thread (:func:`_dense_measures`).
    """
    # -inf logits (masked tokens) would give inf - inf; a huge finite value has probability 0
    ref, x = _finite(ref_logits), _finite(logits)
    P, V = x.shape
    answers = answer_ids if answer_ids is not None else torch.full((P,), -1, dtype=torch.long)
    has_answer = answers >= 0
    ans = answers.clamp_min(0)[:, None]
    ref_top, x_top = row_argmax(ref), row_argmax(x)
    top1 = ref_top == x_top
    kmax = max([k for k in top_ks if 0 < k < V], default=0)
    if kmax:
        ref_vals, ref_idx = ref.topk(kmax, dim=-1)  # sorted, exactly kmax per row
        x_vals, x_idx = x.topk(kmax, dim=-1)
    cols: dict[str, list[torch.Tensor]] = {
        c: [] for c in ("tv", "kl", "entropy", "p_answer", "ref_p_answer", "logp_answer", "ref_logp_answer")
    }
    grid: list[tuple[float, int]] = []  # (T, k) of each emitted block, as given (no float32 rounding)

    def emit(T, k, *values):
        for name, value in zip(cols, values):
            cols[name].append(value.float())
        grid.append((T, k))

    hot = [T for T in temperatures if T > 0]
    dense_ts = hot if any(k == 0 or k >= V for k in top_ks) else []
    dense_all = _dense_measures(ref, x, dense_ts, ans) if dense_ts else {}
    # top-k points: every T > 0 at once, as [P, T, k] blocks (the selection is the same at every T)
    temps_t = torch.tensor(hot or [1.0], dtype=torch.float32)[None, :, None]
    sparse: dict[int, list[torch.Tensor]] = {}
    for k in {k for k in top_ks if 0 < k < V}:
        idx_p, idx_q = ref_idx[:, :k], x_idx[:, :k]
        match = idx_p[:, :, None] == idx_q[:, None, :]  # [P, k, k]: where p's tokens sit in q's top-k
        found = match.any(-1)[:, None, :]
        pos = match.byte().argmax(-1)[:, None, :].expand(P, temps_t.shape[1], k)
        # log space: at low T the kept tokens' probabilities underflow, their log-ratios do not
        log_p = torch.log_softmax(ref_vals[:, None, :k] / temps_t, -1)
        log_q = torch.log_softmax(x_vals[:, None, :k] / temps_t, -1)
        p, q = log_p.exp(), log_q.exp()
        q_at_p = torch.where(found, q.gather(2, pos), 0.0)
        # every kept token has p > 0 (however small), so KL is infinite when the kept sets differ
        kl = torch.where(found.all(-1), (p * (log_p - log_q.gather(2, pos))).sum(-1), float("inf"))
        # log p of the answer: -inf where it is not among the kept tokens
        logp_ans = [
            torch.where(hit, lg, float("-inf")).amax(-1)
            for hit, lg in (((idx_q == ans)[:, None, :], log_q), ((idx_p == ans)[:, None, :], log_p))
        ]
        sparse[k] = [
            1 - torch.minimum(p, q_at_p).sum(-1),
            kl,
            -(q * log_q).sum(-1),
            logp_ans[0].exp(),
            logp_ans[1].exp(),
            *logp_ans,
        ]
    for T in temperatures:
        if T == 0:
            zero, agree = torch.zeros(P), top1.float()
            kl = torch.where(top1, zero, torch.full((P,), float("inf")))
            p_ans = (x_top == ans[:, 0]).float()
            ref_p_ans = (ref_top == ans[:, 0]).float()
            for k in top_ks:  # top-k is irrelevant to greedy decoding
                emit(T, k, 1 - agree, kl, zero, p_ans, ref_p_ans, p_ans.log(), ref_p_ans.log())
            continue
        t = hot.index(T)
        for k in top_ks:
            emit(T, k, *(dense_all[T] if k == 0 or k >= V else [v[:, t] for v in sparse[k]]))
    n = len(grid)
    bounds = {"tv": (0, 1), "kl": (0, None), "entropy": (0, None)}  # rounding can step just outside
    out = {}
    for name, v in cols.items():
        col = torch.cat(v)
        out[name] = (col.clamp(*bounds[name]) if name in bounds else col).tolist()
    nan = float("nan")
    temps = [T for T, _ in grid for _ in range(P)]
    ks = [k for _, k in grid for _ in range(P)]
    index, answered, agree = list(range(P)) * n, has_answer.tolist() * n, top1.tolist() * n
    return [
        {
            "prompt_index": i,
            "temperature": T,
            "top_k": k,
            "tv": tv,
            "kl": kl,
            "top1_agree": a,
            "entropy": e,
            "p_answer": pa if h else nan,
            "ref_p_answer": rpa if h else nan,
            "logp_answer": lpa if h else nan,
            "ref_logp_answer": rlpa if h else nan,
        }
        for i, T, k, tv, kl, a, e, pa, rpa, lpa, rlpa, h in zip(
            index,
            temps,
            ks,
            out["tv"],
            out["kl"],
            agree,
            out["entropy"],
            out["p_answer"],
            out["ref_p_answer"],
            out["logp_answer"],
            out["ref_logp_answer"],
            answered,
        )
    ]


def row_argmax(x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``x.argmax(-1)`` of a ``[P, V]`` float tensor (first index on ties), 3-4x faster for wide rows.

    On CPU ``torch.argmax`` is about 9x slower than ``amax`` (30 ms for 112 x 262k here), so the
    maxima of ``chunk``-wide blocks are taken first, then the first block holding the row maximum
    is searched. Rows must hold no NaN (see :func:`_finite`).
    """
    P, V = x.shape
    if V <= 4 * chunk:
        return x.argmax(-1)
    n = V // chunk * chunk
    block_max = x[:, :n].view(P, -1, chunk).amax(-1)
    if n < V:
        block_max = torch.cat([block_max, x[:, n:].amax(-1, keepdim=True)], dim=1)
    block = block_max.argmax(-1)  # the first block that holds the maximum
    idx = (block[:, None] * chunk + torch.arange(chunk)).clamp_max(V - 1)  # the tail block repeats its last index
    return idx.gather(1, x.gather(1, idx).argmax(-1, keepdim=True)).squeeze(1)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """Float32 logits with -inf (masked tokens) as -1e30, +inf as the largest float and NaN as 0,
    so that no difference is inf - inf. A copy only where needed: checking costs one reduction, a copy of a
    [P, 262k] block costs several times more (fresh memory)."""
    x = logits.float()
    lo, hi = x.aminmax()
    return x if math.isfinite(lo) and math.isfinite(hi) else x.nan_to_num(neginf=-1e30)


LOG2E = 1.0 / math.log(2.0)
EXP2_ZERO = -150.0  # float32 exp2(y) is exactly 0.0 for y < -150 (below the smallest subnormal)


def _dense_measures(
    ref: torch.Tensor, x: torch.Tensor, temperatures: list[float], ans: torch.Tensor
) -> dict[float, tuple[torch.Tensor, ...]]:
    """(tv, kl, entropy, p_answer, ref_p_answer, logp_answer, ref_logp_answer) per prompt for each
    T > 0, top-k off.

    The cost is ``exp`` of two ``[V]`` rows at every T (10M exponentials per Gemma-3 prompt), so
    the loop is arranged for it (``benchmarks/sweep_costs.py`` measures the result):

    * rows are shared out over the machine's threads, each running single-threaded torch ops
      (many short ops wake OpenMP's passive worker threads too often to gain from them);
    * ``exp2`` of logits pre-scaled by log2(e), with subnormals flushed to zero in the worker,
      is 2-10x cheaper than ``exp`` on this hardware, most of all at low T where most results
      underflow;
    * only sums over the row are needed: ``Z = sum e``; ``KL = sum e_a (a - b) / (T Z_a) - log
      Z_a / Z_b``; ``H(q) = log Z_b - sum e_b b / (T Z_b)``; ``TV = sum |e_a - (Z_a/Z_b) e_b| /
      (2 Z_a)``, with logits shifted by their row maximum so no pass looks for a maximum;
    * temperatures run from hot to cold, and a token whose scaled logit is below ``EXP2_ZERO`` in
      both rows is dropped: its weight is exactly 0.0 at this T and every colder one, so the
      result is unchanged (at T = 0.1 that leaves ~1% of Gemma-3's vocabulary). Dropping costs a
      pass over the row, so it is done only when it shrinks the row by ``PRUNE_SHRINK`` or more,
      which a sorted 1-in-64 sample of the row predicts at no cost;
    * each worker reuses one set of buffers for all its rows (fresh megabyte-sized tensors cost
      page faults on every row).
    """
    P, V = x.shape
    threads = torch.get_num_threads()
    workers = max(1, min(threads, P))
    order = sorted(range(len(temperatures)), key=lambda t: -temperatures[t])
    out = torch.empty(len(temperatures), 7, P, dtype=torch.float64)

    def rows(first: int) -> None:
        flushed = torch.set_flush_denormal(True)  # per thread (the CPU's MXCSR register)
        try:
            with torch.inference_mode():
                workspace = dense_workspace(V)  # reused for every row
                for i in range(first, P, workers):
                    out[:, :, i] = _dense_row(ref[i], x[i], temperatures, order, int(ans[i, 0]), workspace)
        finally:
            if flushed:
                torch.set_flush_denormal(False)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(rows, range(workers)))  # list() re-raises a worker's exception
    finally:
        torch.set_num_threads(threads)
    out = out.float()
    return {T: tuple(out[t]) for t, T in enumerate(temperatures)}


PRUNE_SHRINK = 0.7  # drop the zero-weight tokens once they are 30% of the row or more


def dense_workspace(V: int) -> list[torch.Tensor]:
    """The flat float32 buffers :func:`_dense_row` works in for a ``V``-token row: the [5, V]
    block, a spare block it is pruned into, the two rows of weights and the TV difference."""
    return [torch.empty(n) for n in (5 * V, 5 * V, 2 * V, V)]


def _dense_row(
    ref: torch.Tensor,
    x: torch.Tensor,
    temperatures: list[float],
    order: list[int],
    j: int,
    workspace: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[T, 7]`` float64: (tv, kl, entropy, p_answer, ref_p_answer, logp_answer, ref_logp_answer)
    for one prompt (see above).

    ``workspace``: from :func:`dense_workspace` (allocated here if None)."""
    V = ref.shape[0]
    block, spare, e_buf, diff_buf = workspace if workspace is not None else dense_workspace(V)
    # one [5, V] block, so that dropping tokens is one index_select: a and b in base 2, a - b, b,
    # and the larger of the two base-2 logits (which decides when a token's weight is zero)
    rows = block[: 5 * V].view(5, V)
    torch.sub(ref, ref.max(), out=rows[0])  # a (shifted to max 0)
    torch.sub(x, x.max(), out=rows[3])  # b
    aj, bj = float(rows[0, j]), float(rows[3, j])
    torch.sub(rows[0], rows[3], out=rows[2])
    rows[0].mul_(LOG2E)
    torch.mul(rows[3], LOG2E, out=rows[1])
    torch.maximum(rows[0], rows[1], out=rows[4])
    sample = rows[4, ::64].sort().values  # predicts how many tokens a threshold keeps
    n = V
    e, diff = e_buf[: 2 * n].view(2, n), diff_buf[:n]
    result = torch.empty(len(temperatures), 7, dtype=torch.float64)
    for t in order:
        s = 1.0 / temperatures[t]
        kept = 1 - int(torch.searchsorted(sample, EXP2_ZERO / s)) / len(sample)
        if kept * V < PRUNE_SHRINK * n:
            keep = (rows[4] > EXP2_ZERO / s).nonzero().squeeze(1)
            n = len(keep)
            rows = torch.index_select(rows, 1, keep, out=spare[: 5 * n].view(5, n))
            block, spare = spare, block  # the kept tokens now live in the other buffer
            e, diff = e_buf[: 2 * n].view(2, n), diff_buf[:n]
        torch.exp2(torch.mul(rows[:2], s, out=e), out=e)  # e = exp(logits / T), max 1
        za, zb = e.sum(1).tolist()
        ea, eb = e[0], e[1]
        lza, lzb = math.log(za), math.log(zb)
        result[t] = torch.tensor(
            (
                0.5 * float(torch.sub(ea, eb, alpha=za / zb, out=diff).abs_().sum()) / za,
                float(torch.dot(ea, rows[2])) * s / za - (lza - lzb),
                lzb - float(torch.dot(eb, rows[3])) * s / zb,
                math.exp(bj * s) / zb,
                math.exp(aj * s) / za,
                bj * s - lzb,
                aj * s - lza,
            ),
            dtype=torch.float64,
        )
    return result


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
        return logits.float().argmax(-1)
    return inverse_cdf(next_token_probs(logits, temperature, top_k), uniforms)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Per row of ``probs`` ``[B, V]``: the first token whose cumulative probability reaches
    ``u * total`` (``u`` in (0, 1) from ``uniforms``). Tokens of probability 0 are never drawn.

    The cumulative sums are taken in float64 in two levels, over the ``V / block`` block totals
    and then within the one block that holds ``u``: a float64 cumsum over the whole ``[B, V]``
    block took 10% of a SmolLM2 decoding step (V = 49k), more with Gemma-3's 262k.
    """
    B, V = probs.shape
    n_blocks = -(-V // block)
    if n_blocks * block != V:  # pad with zero-probability tokens, which are never drawn
        probs = torch.nn.functional.pad(probs, (0, n_blocks * block - V))
    blocks = probs.view(B, n_blocks, block)
    totals = blocks.sum(-1, dtype=torch.float64)
    ends = totals.cumsum(-1)  # probability mass up to the end of each block
    u = uniforms.double().to(probs.device)[:, None] * ends[:, -1:]
    b = torch.searchsorted(ends, u).clamp_max(n_blocks - 1)  # the block where the CDF reaches u
    before = torch.where(b > 0, ends.gather(1, (b - 1).clamp_min(0)), 0.0)
    inner = blocks[torch.arange(B, device=probs.device), b[:, 0]].double().cumsum(-1)
    j = torch.searchsorted(inner, u - before)
    # rounding may put u - before just above the block's own sum: take its last non-zero token
    j = torch.minimum(j, torch.searchsorted(inner, inner[:, -1:].contiguous()))
    return (b * block + j).squeeze(1).clamp_max(V - 1)  # NaN rows (overflowed logits) still get a valid index


# --------------------------------------------------------------------------- generation
def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(input_ids, attention_mask, position_ids)``.

    Explicit position ids (counting only real tokens) make a sequence's logits independent of
    how much padding its batch needed.
    """
    width = max(map(len, sequences))
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


def _sample_groups(
    logits: torch.Tensor, groups: dict[tuple[float, int], torch.Tensor], uniforms: torch.Tensor
) -> torch.Tensor:
    """:func:`sample_tokens` for rows that differ in (temperature, top-k): one call per setting."""
    if len(groups) == 1:
        ((temperature, top_k),) = groups
        return sample_tokens(logits, temperature, top_k, uniforms)
    out = torch.empty(len(logits), dtype=torch.long, device=logits.device)
    for (temperature, top_k), rows in groups.items():
        out[rows] = sample_tokens(logits[rows], temperature, top_k, uniforms[rows.cpu()])
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
    its neighbours (up to floating-point rounding). ``with_nll`` also returns each token's NLL
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
        groups = {
            s: torch.tensor([i for i, x in enumerate(settings) if x == s], device=device)
            for s in dict.fromkeys(settings)
        }
        input_ids, mask, pos = left_pad(ids, pad, device)
        # logits_to_keep=1: the prefill needs the lm_head at the last position only
        res = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, steps, step_nll = res.past_key_values, [], []
        ok = torch.ones(len(ids), dtype=torch.bool)
        for step in range(max_new_tokens):
            logits = res.logits[:, -1]
            # one reduction instead of isfinite's three passes: a sum of finite logits stays finite
            ok &= torch.isfinite(logits.sum(-1, dtype=torch.float32)).cpu()
            tok = _sample_groups(logits, groups, step_uniforms(seed_t, step))
            steps.append(tok.cpu())
            if with_nll:
                x = logits.float()
                step_nll.append((torch.logsumexp(x, -1) - x.gather(1, tok[:, None]).squeeze(1)).cpu())
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
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=L + 1).logits
        logits = logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1)
        tgt = generated[list(rows)].to(device)
        out[list(rows)] = -logp.gather(-1, tgt[..., None]).squeeze(-1).cpu()
    return out
