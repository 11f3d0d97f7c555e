"""Threads, windows, perplexity (including a recorded number) and continuations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import REPO_ROOT, evaluation, runtime
from helpers import quantization as qz


def test_configure_threads(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    before = torch.get_num_threads()
    try:
        info = runtime.configure_threads(1)
        assert info["torch_num_threads"] == 1 and info["OMP_WAIT_POLICY"] == "PASSIVE"
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="positive integer"):
        runtime.configure_threads(0)


def test_warns_without_passive_wait_policy(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    before = torch.get_num_threads()
    with pytest.warns(UserWarning, match="OMP_WAIT_POLICY"):
        runtime.configure_threads(before)


def test_device_validation():
    assert runtime.resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="'cpu' or 'cuda"):
        runtime.resolve_device("gpu")


def test_token_windows():
    ids = list(range(10))
    assert evaluation.token_windows(ids, 4, bos_id=None) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # with a BOS at the front, every window starts with it
    assert evaluation.token_windows([99] + ids[:6], 4, bos_id=99) == [[99, 0, 1, 2], [99, 3, 4, 5]]
    assert evaluation.token_windows([1, 2, 3, 4, 5], 2, bos_id=None) == [[1, 2], [3, 4]]  # lone 5 dropped
    with pytest.raises(ValueError, match="at least 2"):
        evaluation.token_windows(ids, 1, None)


def test_read_text(tmp_path):
    with pytest.raises(FileNotFoundError):
        evaluation.read_text(tmp_path / "none.txt")
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        evaluation.read_text(tmp_path / "e.txt")


@pytest.mark.models
def test_perplexity_matches_the_recorded_number(loaded):
    """Recompute fp32 SmolLM2 perplexity with notebook 01's recorded settings."""
    from helpers.provenance import load_table

    table, meta = load_table(REPO_ROOT / "data" / "01_load_and_quantize_methods.csv")
    p = meta["parameters"]
    recorded = table[(table.model == "smollm2-135m") & (table.method == "fp32")]["perplexity"].item()
    model, tok = loaded("fp32")
    text = evaluation.read_text(REPO_ROOT / "notebooks" / p["heldout_file"])
    got = evaluation.perplexity(model, tok, text, max_tokens=p["max_eval_tokens"], window=p["eval_window"])
    assert got.n_tokens == table[(table.model == "smollm2-135m") & (table.method == "fp32")]["scored_tokens"].item()
    assert got.ppl == pytest.approx(recorded, rel=1e-4)


@pytest.mark.models
def test_quantization_raises_perplexity_a_little(loaded):
    text = evaluation.read_text(REPO_ROOT / "data" / "heldout_english.txt")
    ppl = {m: evaluation.perplexity(*loaded(m), text, max_tokens=200, window=100).ppl for m in ("fp32", "nf4", "fp4")}
    assert 5 < ppl["fp32"] < 100
    assert ppl["fp32"] < ppl["nf4"] < ppl["fp32"] * 2  # second quantization costs something, not everything
    assert ppl["fp32"] < ppl["fp4"]


@pytest.mark.models
def test_continuation_is_seeded(loaded):
    model, tok = loaded("fp32")
    a = evaluation.continuation(model, tok, "The weather today is", max_new_tokens=8, seed=3)
    b = evaluation.continuation(model, tok, "The weather today is", max_new_tokens=8, seed=3)
    greedy = evaluation.continuation(model, tok, "The weather today is", max_new_tokens=8, temperature=0)
    assert a == b and isinstance(greedy, str) and greedy
    with pytest.raises(ValueError, match=">= 0"):
        evaluation.continuation(model, tok, "x", temperature=-1)


@pytest.mark.models
def test_non_finite_logits_are_reported_not_sampled(loaded, monkeypatch):
    model, tok = loaded("fp32")
    monkeypatch.setattr(model.lm_head.weight, "data", model.lm_head.weight.data.clone())
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    try:
        with pytest.raises(evaluation.NonFiniteLogitsError):
            evaluation.continuation(model, tok, "Hello", max_new_tokens=2)
        assert math.isnan(evaluation.perplexity(model, tok, "Hello there, how are you?", window=8).ppl)
    finally:
        with torch.no_grad():
            model.lm_head.weight[0, 0] = 0.0


@pytest.mark.models
def test_scored_bytes_cover_the_scored_text(loaded):
    _, tok = loaded("fp32")
    text = "The quick brown fox jumps over the lazy dog. " * 20
    ids = tok(text)["input_ids"]
    one_window = evaluation.scored_bytes(tok, text, max_tokens=len(ids), window=len(ids) + 1)
    # one window: everything but the first token (context only) is scored
    assert one_window == len(text.encode()) - len(tok.decode(ids[:1]).encode())
    # more windows: each window's first token is context, so fewer bytes are scored
    assert evaluation.scored_bytes(tok, text, max_tokens=len(ids), window=16) < one_window


def test_timed_returns_seconds_and_result():
    seconds, value = runtime.timed(lambda: sum(range(1000)))
    assert value == 499500 and seconds >= 0


@pytest.mark.models
def test_evaluate_method_row_agrees_with_its_parts(loaded):
    text = evaluation.read_text(REPO_ROOT / "data" / "heldout_english.txt")
    fp32 = {f"{n}.weight": w.weight.detach().float() for n, w in qz.quantizable_linears(loaded("fp32")[0]).items()}
    gen = dict(prompt="The river", max_new_tokens=4, temperature=0.0, top_k=0, seed=0)
    common = dict(device="cpu", compute_dtype="auto", eval_window=60, generation=gen)
    weights = lambda names: {f"{n}.weight": fp32[f"{n}.weight"] for n in names}  # noqa: E731
    row, out, nll = evaluation.evaluate_method(
        "smollm2-135m", "nf4", text=text, max_eval_tokens=120, fp32_weights=weights, **common
    )
    assert row["method"] == "nf4" and row["perplexity_evaluated"] and row["finite_logits"]
    assert row["perplexity"] == pytest.approx(float(np.exp(nll.mean())), rel=1e-5) and len(nll) == row["scored_tokens"]
    assert 4.0 < row["bits_per_quantized_param"] < 4.6  # 4-bit codes + one fp32 absmax per 64 weights = 4.5
    assert 10 < row["weight_sqnr_db"] < 30  # 4-bit round trips of Gaussian-like weights: about 20 dB
    assert out == evaluation.continuation(*loaded("nf4"), **gen)  # greedy: the same text
    skipped, _, none = evaluation.evaluate_method("smollm2-135m", "fp32", text=None, max_eval_tokens=None, **common)
    assert none is None and not skipped["perplexity_evaluated"] and np.isnan(skipped["weight_sqnr_db"])


def test_paired_nll_delta_by_hand():
    rng = np.random.default_rng(0)
    ref = rng.normal(3, 1, 256)
    token_nll = {("m", "fp32"): ref, ("m", "nf4"): ref + 0.1, ("m", "fp16"): ref * np.nan}
    assert evaluation.paired_nll_delta(token_nll, "m", "nf4", n_boot=200) == pytest.approx((0.1, 0.1, 0.1))
    assert all(np.isnan(evaluation.paired_nll_delta(token_nll, "m", "fp16", n_boot=200)))  # overflowed
    assert all(np.isnan(evaluation.paired_nll_delta(token_nll, "m", "int8", n_boot=200)))  # not scored
