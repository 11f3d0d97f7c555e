"""Why the dense part of `helpers.measures.next_token_measures` is written the way it is.

Times, on real logits (the reference and nf4 over the first positions of Alice ch. I), the same
measures (TV, KL, entropy at every temperature of notebook 04's running-text grid, top-k off)
computed four ways, from the plainest to the one `helpers.measures._dense` uses:

1. `log_softmax` over blocks of rows, every op multi-threaded (the specification, in float32);
2. one row at a time on each thread (single-threaded torch ops), still `log_softmax`;
3. the same rows with the sums written out (`exp`, dot products, no `log_softmax`);
4. as 3 with `exp2` of logits pre-scaled by log2(e);
5. as 4 with the exponentials written into two buffers reused at every temperature, and TV
   computed in place in the method's buffer: the kernel in `helpers.measures`.

Also `argmax` against `max(-1).indices` (same indices). Every variant is checked against the
kernel (largest difference printed).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/measures_kernel.py [--model gemma3-270m] [--positions 128]

Prints a table and writes build/benchmarks/measures_kernel.csv with its provenance (not committed).
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from common import alice_logits, command_line, median_time, save  # benchmarks/ is the script's folder, so on its path

from helpers import measures

TEMPERATURES = [0.25, 0.5, 0.65, 0.8, 1.0, 1.25, 1.5, 2.0]


def blocks_log_softmax(ref, x, temps, block=8):
    out = torch.empty(len(ref), len(temps), 3, dtype=torch.float64)
    for t, T in enumerate(temps):
        for i in range(0, len(ref), block):
            a, b = torch.log_softmax(ref[i : i + block] / T, -1), torch.log_softmax(x[i : i + block] / T, -1)
            p, q = a.exp(), b.exp()
            out[i : i + block, t] = torch.stack(
                [0.5 * (p - q).abs().sum(-1), (p * (a - b)).sum(-1), -(q * b).sum(-1)], 1
            ).double()
    return out


def row_log_softmax(a, b, temps):
    out = torch.empty(len(temps), 3, dtype=torch.float64)
    for t, T in enumerate(temps):
        la, lb = torch.log_softmax(a / T, -1), torch.log_softmax(b / T, -1)
        p, q = la.exp(), lb.exp()
        out[t] = torch.tensor([0.5 * float((p - q).abs().sum()), float((p * (la - lb)).sum()), -float((q * lb).sum())])
    return out


def row_exp(a, b, temps):
    a, b = a - a.max(), b - b.max()
    d = a - b
    out = torch.empty(len(temps), 3, dtype=torch.float64)
    for t, T in enumerate(temps):
        s = 1.0 / T
        ea, eb = torch.exp(a * s), torch.exp(b * s)
        za, zb = float(ea.sum()), float(eb.sum())
        out[t, 0] = 0.5 * float(torch.sub(ea, eb, alpha=za / zb).abs_().sum()) / za
        out[t, 1] = float(torch.dot(ea, d)) * s / za - math.log(za / zb)
        out[t, 2] = math.log(zb) - float(torch.dot(eb, b)) * s / zb
    return out


def row_exp2(a, b, temps):
    a, b = a - a.max(), b - b.max()
    a2, b2, d = a * measures.LOG2E, b * measures.LOG2E, a - b
    out = torch.empty(len(temps), 3, dtype=torch.float64)
    for t, T in enumerate(temps):
        s = 1.0 / T
        ea, eb = torch.exp2(a2 * s), torch.exp2(b2 * s)  # four new 1 MB tensors at every T
        za, zb = float(ea.sum()), float(eb.sum())
        out[t, 0] = 0.5 * float(torch.sub(ea, eb, alpha=za / zb).abs_().sum()) / za
        out[t, 1] = float(torch.dot(ea, d)) * s / za - math.log(za / zb)
        out[t, 2] = math.log(zb) - float(torch.dot(eb, b)) * s / zb
    return out


def per_row(row_fn, ref, x, temps):
    """``row_fn`` on every row, rows shared out over the threads as `measures._dense` does."""
    out = torch.empty(len(ref), len(temps), 3, dtype=torch.float64)

    def work(i):
        out[i] = row_fn(ref[i], x[i], temps)

    measures.on_row_threads(work, len(ref))
    return out


def kernel(ref, x, temps):
    d = measures._dense(ref, x, temps, torch.zeros(len(ref), dtype=torch.long))
    return torch.stack([d["tv"], d["kl"], d["entropy"]], -1).permute(1, 0, 2)  # [P, T, 3]


def main() -> None:
    args, thread_info = command_line(positions=128)
    logits = alice_logits(args.model, ["fp32", "nf4"], args.positions)
    ref, x = logits["fp32"], logits["nf4"]
    P, V = ref.shape
    expected = kernel(ref, x, TEMPERATURES)
    variants = {
        "1 log_softmax, blocks of 8 rows, multi-threaded ops": lambda: blocks_log_softmax(ref, x, TEMPERATURES),
        "2 log_softmax, one row per thread": lambda: per_row(row_log_softmax, ref, x, TEMPERATURES),
        "3 sums with exp, one row per thread": lambda: per_row(row_exp, ref, x, TEMPERATURES),
        "4 sums with exp2, one row per thread": lambda: per_row(row_exp2, ref, x, TEMPERATURES),
        "5 as 4, buffers reused at every T (helpers.measures)": lambda: kernel(ref, x, TEMPERATURES),
    }
    rows = []
    for name, fn in variants.items():
        seconds = median_time(fn)
        diff = float((fn() - expected).abs().max())
        rows.append({"variant": name, "ms_per_row_and_T": 1e3 * seconds / P / len(TEMPERATURES), "max_abs_diff": diff})
    for name, fn in (("argmax(-1)", lambda: ref.argmax(-1)), ("max(-1).indices", lambda: measures.argmax(ref))):
        rows.append({"variant": name, "ms_per_row_and_T": 1e3 * median_time(fn) / P, "max_abs_diff": 0.0})
    table = pd.DataFrame(rows)
    kernel_ms = table.ms_per_row_and_T.iloc[4]
    table["relative_to_kernel"] = table.ms_per_row_and_T / kernel_ms
    print(f"{args.model}: {P} positions x {V} tokens, {len(TEMPERATURES)} temperatures, {args.threads} threads")
    print(table.round(4).to_string(index=False))
    save(
        table,
        "measures_kernel",
        model=args.model,
        positions=P,
        vocab=V,
        temperatures=TEMPERATURES,
        threads=thread_info,
        note="argmax rows: ms per row, not per row and T",
    )


if __name__ == "__main__":
    main()
