"""What the benchmark scripts share: a timer, real logits to time kernels on, and where results go."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from helpers import REPO_ROOT, methods, runtime, textscore
from helpers.provenance import save_table

OUT_DIR = REPO_ROOT / "build" / "benchmarks"  # not committed: the numbers belong to the machine


def command_line(**int_options: int) -> tuple[argparse.Namespace, dict]:
    """Parse ``--model`` (default gemma3-270m), ``--threads`` (default 2) and one integer option
    per keyword (its default), quiet the libraries and set the threads. Returns the arguments and
    the thread settings to record."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--threads", type=int, default=2)
    for name, default in int_options.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    runtime.quiet()
    return args, runtime.configure_threads(args.threads)


def median_time(fn, repeats: int = 3) -> float:
    """Median seconds of ``repeats`` calls of ``fn``, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def alice_logits(model_name: str, method_names: list[str], positions: int) -> dict[str, torch.Tensor]:
    """Next-token logits ``[positions, V]`` of each method over the first positions of Alice ch. I
    (``data/texts``): real rows, with the spread of logits the notebooks' kernels meet."""
    docs = textscore.read_documents(REPO_ROOT / "data" / "texts" / "manifest.csv")
    tok = methods.load_tokenizer(model_name)
    window = textscore.text_windows(tok, {"alice_ch1": docs["alice_ch1"]}, positions + 1, positions + 1)[0]
    logits = {}
    for method in method_names:
        model, _ = methods.load(model_name, method)
        logits[method] = textscore.window_logits(model, window)
        del model
    return logits


def save(table: pd.DataFrame, script: str, **meta) -> Path:
    """Write ``build/benchmarks/<script>.csv`` with its provenance and say where."""
    out = OUT_DIR / f"{script}.csv"
    save_table(table, out, source=f"benchmarks/{script}.py", **meta)
    print(f"written {out}")
    return out
