"""Why the sampling step of `helpers.generation.generate` works row by row.

Times one decoding step's sampling (not the forward pass) for the batch notebook 02 decodes: 384
rows of real next-token logits (Gemma-3 fp32 over the first positions of Alice ch. I, repeated),
the rows spread over the six temperatures of the default generation grid (greedy to 1.5), top-k
off. Three ways, from the plainest to the one `helpers.generation.sample_rows` uses:

1. whole-batch ops per temperature: `softmax(x / T)`, then the inverse CDF with float64 block totals;
2. as 1 with unnormalised weights `exp2((x - max) * log2(e) / T)` and float32 block totals;
3. as 2, one row at a time on each thread (`helpers.measures.on_row_threads`);
4. `helpers.generation.sample_rows`, which takes 3 for rows of at least
   `helpers.measures.ROW_BY_ROW_MIN_VOCAB` tokens on CPU and 2 otherwise.

Also the log-normaliser the reference needs for the NLL of its own tokens: `torch.logsumexp` over
the batch against `helpers.measures.log_normalizer` (the same, row by row for wide rows). Every variant's tokens are
compared with the kept version's (share identical).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/sampling_step.py [--model gemma3-270m] [--rows 384]

Prints a table and writes build/benchmarks/sampling_step.csv with its provenance (not committed).
"""

from __future__ import annotations

import pandas as pd
import torch
from common import alice_logits, command_line, median_time, save  # benchmarks/ is the script's folder, so on its path

from helpers import generation, measures

TEMPERATURES = [0.0, 0.3, 0.5, 0.7, 1.0, 1.5]


def float64_blocks(probs: torch.Tensor, u: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """`generation.inverse_cdf` with the block totals summed in float64."""
    B, V = probs.shape
    blocks = probs.view(B, V // block, block)
    ends = blocks.sum(-1, dtype=torch.float64).cumsum(-1)
    cut = u.double()[:, None] * ends[:, -1:]
    b = torch.searchsorted(ends, cut).clamp_max(V // block - 1)
    before = torch.where(b > 0, ends.gather(1, (b - 1).clamp_min(0)), 0.0)
    inner = blocks[torch.arange(B), b[:, 0]].double().cumsum(-1)
    j = torch.minimum(torch.searchsorted(inner, cut - before), torch.searchsorted(inner, inner[:, -1:].contiguous()))
    return (b * block + j).squeeze(1)


def per_setting(x, settings, u, draw):
    """One whole-batch call of ``draw(rows, T, u)`` per temperature."""
    out = torch.empty(len(x), dtype=torch.long)
    for T in dict.fromkeys(t for t, _ in settings):
        rows = [i for i, (t, _) in enumerate(settings) if t == T]
        out[rows] = measures.argmax(x[rows]) if T == 0 else draw(x[rows], T, u[rows])
    return out


def one_row_at_a_time(x, settings, u):
    out = torch.empty(len(x), dtype=torch.long)

    def work(i):
        out[i] = generation.sample_tokens(x[i : i + 1], *settings[i], u[i : i + 1])[0]

    measures.on_row_threads(work, len(x))
    return out


def main() -> None:
    args, thread_info = command_line(rows=384)
    logits = alice_logits(args.model, ["fp32"], 128)["fp32"]
    x = logits.repeat(-(-args.rows // len(logits)), 1)[: args.rows].contiguous()
    B, V = x.shape
    settings = [(TEMPERATURES[i % len(TEMPERATURES)], 0) for i in range(B)]
    u = generation.step_uniforms(torch.arange(B), 0)
    variants = {
        "1 whole batch: softmax(x / T), float64 block totals": lambda: per_setting(
            x, settings, u, lambda r, T, v: float64_blocks(torch.softmax(r / T, -1), v)
        ),
        "2 whole batch: exp2 weights, float32 block totals": lambda: per_setting(
            x, settings, u, lambda r, T, v: generation.inverse_cdf(generation.sampling_weights(r, T), v)
        ),
        "3 row by row: exp2 weights, float32 block totals": lambda: one_row_at_a_time(x, settings, u),
        "4 sample_rows (3 or 2 by row width)": lambda: generation.sample_rows(x, settings, u),
    }
    kept = generation.sample_rows(x, settings, u)
    rows = []
    for name, fn in variants.items():
        same = float((fn() == kept).float().mean())
        rows.append({"variant": name, "ms_per_step": 1e3 * median_time(fn), "identical_tokens": same})
    exact = torch.logsumexp(x.double(), -1)
    for name, fn in (
        ("torch.logsumexp, whole batch", lambda: torch.logsumexp(x, -1)),
        ("log_normalizer: the same, row by row by row width", lambda: measures.log_normalizer(x)),
    ):
        err = float((fn().double() - exact).abs().max())
        rows.append({"variant": name, "ms_per_step": 1e3 * median_time(fn), "max_abs_error": err})
    table = pd.DataFrame(rows)
    print(f"{args.model}: {B} rows x {V} tokens, temperatures {TEMPERATURES}, {args.threads} threads")
    print(table.round({"ms_per_step": 1, "identical_tokens": 4}).to_string(index=False))
    save(
        table,
        "sampling_step",
        model=args.model,
        batch_rows=B,
        vocab=V,
        temperatures=TEMPERATURES,
        threads=thread_info,
    )


if __name__ == "__main__":
    main()
