"""Measure the two cost claims of the sampling sweep (issue: notebooks 02/04).

1. Exact next-token analysis: time of one batched forward pass over the prompts vs the time of
   `measures.next_token_measures` over a 21-point temperature grid x top-k grid.
2. Batched seeded sampling vs a per-sample loop producing the same samples (checked).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/sweep_costs.py [--models smollm2-135m]

Prints a table and writes build/benchmarks/sweep_costs.csv (not committed: numbers depend on
the machine; the notebooks record theirs with provenance). Warm-up run first, median of 3.
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from common import median_time, save  # benchmarks/ is the script's folder, so on its path

from helpers import REPO_ROOT, generation, measures, methods, runtime, sweep


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    runtime.quiet()
    runtime.configure_threads(args.threads)
    prompts = sweep.read_prompts(REPO_ROOT / "data" / "prompts.csv")
    temps = [0.0] + [round(0.1 * i, 1) for i in range(1, 21)]
    rows = []
    for name in args.models:
        model, tok = methods.load(name, "fp32")
        texts = list(prompts.prompt)
        answers = sweep.answer_token_ids(tok, list(prompts.answer))
        logits = sweep.last_token_logits(model, tok, texts)
        other = logits + 0.05 * torch.randn_like(logits)
        fwd = median_time(lambda: sweep.last_token_logits(model, tok, texts))  # noqa: B023 (called at once)
        for ks in ([0], [0, 5, 20, 50, 200]):
            meas = median_time(lambda: measures.next_token_measures(logits, other, temps, ks, answers))  # noqa: B023 (called at once)
            rows.append(
                {
                    "model": name,
                    "benchmark": f"exact measures, 21 T x top_k {ks}",
                    "prompts": len(texts),
                    "forward_s": fwd,
                    "measures_s": meas,
                    "total_over_forward": (fwd + meas) / fwd,
                }
            )
        if name == args.models[0]:
            sub = sweep.generation_subset(prompts, 4)
            jobs = [(p, s) for p in sub.prompt for s in range(4)]
            seeds = [generation.sequence_seed(p, s) for p, s in jobs]
            texts = [p for p, _ in jobs]
            check = sweep.batched_vs_loop(model, tok, texts, seeds, 0.8, 16, batch_size=64)
            rows.append(
                {"model": name, "benchmark": f"{len(jobs)} samples x 16 tokens: per-sample loop / batched", **check}
            )
    df = pd.DataFrame(rows)
    print(df.round(3).to_string(index=False))
    save(df, "sweep_costs", threads=args.threads)


if __name__ == "__main__":
    main()
