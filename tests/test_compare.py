"""The rerun check: numbers within tolerance are the same, timings are only listed."""

from __future__ import annotations

import pandas as pd

from helpers import compare


def _table(**cols) -> pd.DataFrame:
    base = {"model": ["a", "b"], "kl": [0.125, 0.5], "decode_tokens_per_s": [10.0, 12.0]}
    return pd.DataFrame({**base, **cols})


def test_rounding_is_the_same_and_timings_are_listed_apart():
    assert compare.compare_frames(_table(), _table(kl=[0.125 + 1e-12, 0.5])) == ("same", "")
    status, detail = compare.compare_frames(_table(), _table(decode_tokens_per_s=[9.0, 12.0]))
    assert status == "run-specific only" and detail.startswith("decode_tokens_per_s (1 rows")


def test_a_moved_number_or_text_is_reported_with_its_size():
    status, detail = compare.compare_frames(_table(), _table(kl=[0.125, 0.75]))
    assert status == "moved" and "kl (1 rows, up to 0.25)" in detail
    status, detail = compare.compare_frames(_table(), _table(model=["a", "c"]))
    assert status == "moved" and detail.startswith("model (1 rows)")
    assert compare.compare_frames(_table(), _table().iloc[:1])[0] == "shape"
    inf = float("inf")
    assert compare.compare_frames(_table(kl=[inf, 0.5]), _table(kl=[inf, 0.5]))[0] == "same"
    status, detail = compare.compare_frames(_table(kl=[inf, 0.5]), _table(kl=[1.0, 0.5]))
    assert status == "moved" and "one side not finite" in detail


def test_run_specific_columns():
    for col in (
        "forward_s",
        "ttft_s",
        "e2e_tokens_per_s_16",
        "read_GBps",
        "load_average",
        "peak_rss_MiB",
        "code",
        "matched_to",
        "overhead",
        "speedup",
    ):
        assert compare.is_run_specific(col), col
    for col in ("kl", "tv", "weights_MiB", "perplexity", "tau", "noise_matched_to"):
        assert not compare.is_run_specific(col), col
