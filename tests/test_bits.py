"""Shared character spans, paired span intervals, precision families and the equal-memory verdict
(helpers.bits) on hand-computed cases."""

import math
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import analysis, bits, evaluation


class _WordTokenizer:
    """A word-level tokenizer with offsets: each ``\\s*\\S+`` is one token (its leading spaces
    included, as BPE tokenizers attach them); ids are 10 + the word's length."""

    def __init__(self, bos: int | None = None):
        self.bos_token_id = bos

    def __call__(self, text, return_offsets_mapping=False):
        found = [(m.start(), m.end()) for m in re.finditer(r"\s*\S+", text)]
        ids = [10 + e - s for s, e in found]
        if self.bos_token_id is not None:
            ids, found = [self.bos_token_id] + ids, [(0, 0)] + found
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = found
        return out


def test_truncate_cuts_at_a_paragraph_or_whitespace():
    text = "aaaa bbbb\n\ncccc dddd\n\neeee"
    assert bits.truncate(text, None) == text and bits.truncate(text, 100) == text
    assert bits.truncate(text, 22) == "aaaa bbbb\n\ncccc dddd"  # a paragraph break in the second half
    assert bits.truncate("aaaa\n\nbbbb cccc dddd", 17) == "aaaa\n\nbbbb cccc"  # break at 4 < 17 // 2: whitespace
    assert bits.truncate("aaaa bbbb cccc dddd", 17) == "aaaa bbbb cccc"
    assert bits.truncate("abc \u00e9\u00e9", 5) == "abc"  # the cut splits a 2-byte character: dropped
    with pytest.raises(ValueError):
        bits.truncate("abcdefgh", 4)


def test_split_spans_by_hand():
    docs = {"a": "one two three four five", "b": "sixsix seven"}
    spans = bits.split_spans(docs, span_bytes=8)
    # "one two " is 8 bytes; "three four " 11; "five" (4, not under 8 / 2) stays a span of its own
    assert [(s.doc, docs[s.doc][s.start : s.stop]) for s in spans] == [
        ("a", "one two "),
        ("a", "three four "),
        ("a", "five"),
        ("b", "sixsix seven"),
    ]
    spans = bits.split_spans({"a": "aaaaaaa b"}, span_bytes=8)  # "b" (1 < 4) joins the span before
    assert [(s.start, s.stop) for s in spans] == [(0, 9)]
    with pytest.raises(ValueError):
        bits.split_spans(docs, 0)


@pytest.mark.parametrize("n, window", [(1, 4), (2, 2), (9, 4), (10, 4), (11, 3), (7, 7)])
@pytest.mark.parametrize("bos", [None, 1])
def test_window_indices_match_token_windows(n, window, bos):
    ids = ([bos] if bos is not None else []) + list(range(100, 100 + n))
    idx = bits.window_indices(len(ids), window, bos is not None)
    assert [[ids[i] for i in w] for w in idx] == evaluation.token_windows(ids, window, bos)


@pytest.mark.parametrize("bos", [None, 2])
def test_tokenize_tiles_bytes_and_assigns_spans_by_last_character(bos):
    docs = {"d": "ab cd \u00e9 fg hi", "e": "jk lm"}  # tokens "ab" " cd" " é" " fg" " hi" end at 2, 5, 7, 10, 13
    spans = bits.split_spans(docs, span_bytes=6)  # "ab cd " | "é fg hi" ; "jk lm"
    assert [(s.start, s.stop) for s in spans] == [(0, 6), (6, 13), (0, 5)]
    text = bits.tokenize(_WordTokenizer(bos), docs, spans, window=3)
    if bos is None:
        # no BOS: windows of 3 tokens, the first of each unscored ("ab", " fg", "jk")
        assert text.windows == [[12, 13, 12], [13, 13], [12, 13]]
        assert text.span.tolist() == [0, 1, 1, 2]  # " cd", " é", " hi"; " lm"
        assert text.n_bytes.tolist() == [3, 3, 3, 3]  # " é" is 1 + 2 bytes
    else:
        # BOS: every window starts with it and every word is scored
        assert text.windows == [[2, 12, 13], [2, 12, 13], [2, 13], [2, 12, 13]]
        assert text.span.tolist() == [0, 0, 1, 1, 1, 2, 2]
        assert text.n_bytes.tolist() == [2, 3, 3, 3, 3, 2, 3]
        # every byte of each document is covered exactly once (a span's trailing space goes with the next word)
        assert text.span_bytes().tolist() == [5, 9, 5]
        assert sum(len(t.encode()) for t in docs.values()) == text.n_bytes.sum()
    assert text.span_tokens().sum() == text.n_scored


class _FixedModel(torch.nn.Module):
    """Logits that depend only on the current token: row ``t`` of a fixed table."""

    def __init__(self, vocab: int = 30, seed: int = 0):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x):
        return SimpleNamespace(logits=self.table[x])


def test_score_nll_and_kl_by_brute_force():
    docs = {"d": "ab cd ef gh ij kl mn"}
    text = bits.tokenize(_WordTokenizer(1), docs, bits.split_spans(docs, 6), window=4)
    ref_model, model = _FixedModel(seed=0), _FixedModel(seed=1)
    ref = bits.score(ref_model, text, keep_logprobs=True)
    got = bits.score(model, text, reference=ref.logprobs)
    # brute force in float64
    nll, kl = [], []
    for win in text.windows:
        for cur, nxt in zip(win[:-1], win[1:]):
            p = torch.log_softmax(ref_model.table[cur].double(), -1)
            q = torch.log_softmax(model.table[cur].double(), -1)
            nll.append(-q[nxt].item())
            kl.append((p.exp() * (p - q)).sum().item())
    assert got.nll == pytest.approx(nll, rel=1e-5)
    assert got.kl == pytest.approx(kl, rel=2e-3, abs=1e-4)  # the reference is stored in float16
    assert len(got.window_s) == len(text.windows) and got.tokens_per_s(text) > 0  # timed after the first window
    assert bits.score(ref_model, text, reference=ref.logprobs).kl.max() < 1e-5  # a model against itself
    with pytest.raises(ValueError):
        bits.score(model, text, reference=ref.logprobs[:1])


def test_span_intervals_by_hand():
    # two spans with the same bits per byte: the interval collapses onto the estimate
    nll = np.array([2 * math.log(2) * 10, 2 * math.log(2) * 30])  # 2 bits per byte on 10 and 30 bytes
    nbytes = np.array([10.0, 30.0])
    assert bits.bpb_ci(nll, nbytes, n_boot=200) == pytest.approx((2.0, 2.0, 2.0))
    # A at 2 bits per byte, B at 3 on every span: difference -1 exactly
    est, lo, hi = bits.bpb_difference_ci(nll, nbytes, 1.5 * nll, nbytes, n_boot=200)
    assert (est, lo, hi) == pytest.approx((-1.0, -1.0, -1.0))
    # perplexity change: NLL per token 1.1 vs 1.0 everywhere -> exp(0.1) - 1
    est, lo, hi = bits.perplexity_change_ci(
        np.array([11.0, 22.0]), np.array([10.0, 20.0]), np.array([10.0, 20.0]), n_boot=200
    )
    assert (est, lo, hi) == pytest.approx((math.expm1(0.1),) * 3)
    # a ratio of sums, not a mean of ratios: (1 + 9) / (1 + 1) = 5
    est, lo, hi = bits.mean_ci(np.array([1.0, 9.0]), np.array([1.0, 1.0]), n_boot=2000)
    assert est == 5.0 and 1.0 <= lo < 5.0 < hi <= 9.0


def test_precision_families_and_representatives():
    assert [bits.precision_family(m) for m in ("fp32", "bf16", "fp16", "int8", "int8-noout", "nf4-dq", "fp4")] == [
        "fp32",
        "16-bit",
        "16-bit",
        "int8",
        "int8",
        "nf4",
        "fp4",
    ]
    got = bits.family_members(["nf4-dq", "fp16", "int8-noout", "nf4", "fp32", "bf16"])
    assert got == {"fp32": ["fp32"], "16-bit": ["bf16", "fp16"], "int8": ["int8-noout"], "nf4": ["nf4", "nf4-dq"]}
    with pytest.raises(ValueError):
        bits.family_members(["int3"])


def _families(small_bits: dict, large_bits: dict) -> pd.DataFrame:
    prec = {"fp32": 32, "16-bit": 16, "int8": 8, "nf4": 4.5, "fp4": 4.5}
    rows = [
        {"model": "S", "family": f, "params": 100, "precision_bits": prec[f], "total_bits": b}
        for f, b in small_bits.items()
    ]
    rows += [
        {"model": "L", "family": f, "params": 200, "precision_bits": prec[f], "total_bits": b}
        for f, b in large_bits.items()
    ]
    return pd.DataFrame(rows)


def test_equal_memory_pairs_only_at_deployment_precisions():
    table = _families(
        {"fp32": 3200, "16-bit": 1600, "int8": 800, "nf4": 450},
        {"fp32": 6400, "16-bit": 3200, "int8": 1600, "nf4": 900},
    )
    pairs = bits.equal_memory_pairs(table)
    # the larger model at int8 / nf4 against the smaller at a higher deployment precision; never fp32
    assert list(zip(pairs.larger_family, pairs.smaller_family)) == [
        ("int8", "16-bit"),
        ("nf4", "16-bit"),
        ("nf4", "int8"),
    ]
    assert pairs.eligible.tolist() == [True, True, False]  # 1600 <= 1600, 900 <= 1600, 900 > 800
    assert pairs.memory_ratio.tolist() == pytest.approx([1.0, 900 / 1600, 900 / 800])


def test_equal_memory_verdict_by_hand():
    table = _families({"16-bit": 1600, "int8": 800}, {"int8": 1600, "nf4": 900})
    pairs = bits.equal_memory_pairs(table)  # (int8, 16-bit) ok, (nf4, 16-bit) ok, (nf4, int8) not eligible

    def with_ci(*intervals):
        lo, hi = zip(*intervals)
        return pairs.assign(diff_low=list(lo), diff_high=list(hi))

    # the third interval belongs to an ineligible pair and never counts
    assert analysis.equal_memory_verdict(with_ci((-0.2, -0.1), (-0.05, -0.01), (0.1, 0.2)))[0] == "holds"
    assert analysis.equal_memory_verdict(with_ci((0.1, 0.2), (-0.01, 0.02), (-1, -0.5)))[0] == "does not hold"
    verdict, why = analysis.equal_memory_verdict(with_ci((-0.2, -0.1), (0.01, 0.02), (0, 0)))
    assert verdict == "inconclusive" and why.startswith("1 of 2 equal-memory pairs") and "1 the smaller" in why
    assert why.endswith("; every one against S at 16-bit")  # both eligible pairs: one smaller model, one precision
    other = with_ci((-0.2, -0.1), (0.01, 0.02), (0, 0)).assign(smaller=["S", "T", "T"])
    assert analysis.equal_memory_verdict(other)[1].endswith("; the smaller model is at 16-bit in every one")
    mixed = with_ci((-0.2, -0.1), (0.01, 0.02), (0, 0)).assign(smaller_family=["16-bit", "int8", "int8"])
    assert "every one" not in analysis.equal_memory_verdict(mixed)[1]
    assert analysis.equal_memory_verdict(with_ci((-0.2, 0.1), (-0.3, 0.1), (0, 0)))[0] == "inconclusive"
    # the larger model always needs more bits: cannot be tested, naming the closest pair
    far = bits.equal_memory_pairs(_families({"16-bit": 2152, "int8": 1308}, {"int8": 3491, "nf4": 3137}))
    verdict, why = analysis.equal_memory_verdict(far)
    assert verdict == "cannot be tested at this scale"
    assert "L nf4 vs S 16-bit" in why and f"{3137 / 2152:.2f}x" in why
    assert analysis.equal_memory_verdict(far, n_models=1) == ("cannot be tested", "only one model")
    assert analysis.equal_memory_verdict(far.iloc[:0])[0] == "cannot be tested at this scale"
    assert analysis.pair_outcome(-0.1, 0.0) == "not resolved" and analysis.pair_outcome(0.01, 0.1) == "smaller better"


def test_equal_memory_is_decided_inside_one_model_family():
    """Four models, two families: only the pair of one family (size and precision all that differ)
    decides; an eligible pair across families is listed but never decides."""
    prec = {"16-bit": 16, "nf4": 4.5}
    rows = [
        ("A-small", "llama", 100, "16-bit", 1600),
        ("B-mid", "gemma", 200, "nf4", 1000),
        ("Q-small", "qwen2", 300, "16-bit", 4800),
        ("Q-large", "qwen2", 900, "nf4", 4900),
    ]
    table = pd.DataFrame(
        [
            {"model": m, "model_family": a, "params": p, "family": f, "precision_bits": prec[f], "total_bits": b}
            for m, a, p, f, b in rows
        ]
    )
    pairs = bits.equal_memory_pairs(table)
    key = list(zip(pairs.larger, pairs.smaller))
    assert key == [("B-mid", "A-small"), ("Q-large", "A-small"), ("Q-large", "Q-small")]
    assert pairs.same_family.tolist() == [False, False, True]
    assert pairs.eligible.tolist() == [True, False, False]  # 4900 > 4800
    # strictly, the Qwen pair needs 2% more bits: not testable inside a family, whatever B-mid shows
    decided = pairs.assign(diff_low=[-0.3, -0.3, -0.3], diff_high=[-0.1, -0.1, -0.1])
    verdict, why = analysis.equal_memory_verdict(decided, n_models=4)
    assert verdict == "cannot be tested at this scale"
    assert "inside one model family" in why and "Q-large nf4 vs Q-small 16-bit, needs 1.02x" in why
    # with a 5% tolerance the Qwen pair decides alone
    tolerant = bits.equal_memory_pairs(table, tolerance=0.05)
    assert tolerant.eligible.tolist() == [True, False, True]
    verdict, why = analysis.equal_memory_verdict(tolerant.assign(diff_low=[-0.3, 0, 0.1], diff_high=[-0.1, 0, 0.2]), 4)
    assert verdict == "does not hold" and why.startswith("0 of 1 equal-memory pairs inside one model family")
    assert why.endswith("; against Q-small at 16-bit")
    assert bits.budget_pair(table) == ("Q-small", "Q-large")
    assert bits.budget_pair(table.drop(columns="model_family")) == ("A-small", "Q-large")


def test_combined_verdict_over_conventions():
    assert analysis.combined_verdict({"as measured": "holds", "as deployed": "holds"}) == "holds"
    one = analysis.combined_verdict({"as measured": "holds", "as deployed": "cannot be tested at this scale"})
    assert one == "holds (as measured only)"
    both = analysis.combined_verdict({"as measured": "holds", "as deployed": "does not hold"})
    assert both == "depends on the memory convention (as measured: holds; as deployed: does not hold)"
    assert analysis.combined_verdict({"a": "cannot be tested", "b": "cannot be tested at this scale"}).startswith(
        "cannot"
    )


def test_cost_by_size_is_paired_against_the_models_own_reference():
    reps = pd.DataFrame(
        [
            {"model": "A", "model_family": "x", "params": 100, "method": m, "family": f}
            for m, f in (("fp32", "fp32"), ("nf4", "nf4"), ("int8", "int8"))
        ]
    )
    ref = np.array([10.0, 20.0, 30.0, 40.0])
    scored = {("A", "fp32"): ref, ("A", "nf4"): ref * 1.25}  # int8 not scored: no row
    out = bits.cost_by_size(scored, reps, n_boot=200, seed=0)
    assert out.method.tolist() == ["nf4"]
    row = out.iloc[0]
    # every span costs exactly 25% more: the estimate and both ends of the paired interval are 0.25
    assert (row.logloss_increase, row.low, row.high) == pytest.approx((0.25, 0.25, 0.25))
    assert row.params == 100 and row.model_family == "x"


class _OneLayerLM(torch.nn.Module):
    """Logits = one block Linear (named as Hugging Face names it) of a fixed embedding."""

    def __init__(self, vocab: int = 30, width: int = 64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, width, generator=g))
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.model.layers[0].mlp = torch.nn.Module()
        self.model.layers[0].mlp.down_proj = torch.nn.Linear(width, vocab, bias=False)
        with torch.no_grad():
            self.model.layers[0].mlp.down_proj.weight.normal_(0, 0.05, generator=g)

    def forward(self, x):
        return SimpleNamespace(logits=self.model.layers[0].mlp.down_proj(self.emb[x]))


def test_grid_confound_and_effect_by_hand():
    from helpers.quantization import roundtrip

    docs = {"d": "ab cd ef gh ij kl mn op qr st uv"}
    text = bits.tokenize(_WordTokenizer(1), docs, bits.split_spans(docs, 9), window=6)
    model = _OneLayerLM()
    layer = model.model.layers[0].mlp.down_proj
    w0 = layer.weight.detach().clone()
    fp32 = text.span_sums(bits.score(model, text).nll)
    rows, scores = bits.grid_confound(
        model, {"blk.0.ffn_down.weight": "Q8_0"}, text, ["nf4", "int8"], noise_seed=0, fp32_nll=fp32, n_boot=50, seed=0
    )
    assert torch.equal(layer.weight, w0)  # the weights are restored
    assert len(rows) == 6 and set(rows.gguf_types) == {"Q8_0"}
    r = rows.set_index(["weights", "method"])
    assert scores[("GGUF grid", "none")] is fp32  # scored once, in section 1
    assert r.weight_rel_error[("GGUF grid", "none")] == 0 == r.weight_rel_error[("off grid", "none")]
    assert r.increase_over_own_fp32[("GGUF grid", "none")] == 0 == r.increase_over_own_fp32[("off grid", "none")]
    assert not np.allclose(scores[("off grid", "none")], fp32)  # the noise moved the weights
    nf4 = roundtrip(w0, "nf4").dequantized
    assert r.weight_rel_error[("GGUF grid", "nf4")] == pytest.approx(((nf4 - w0).norm() / w0.norm()).item())
    with torch.no_grad():
        layer.weight.copy_(nf4)
    assert scores[("GGUF grid", "nf4")] == pytest.approx(text.span_sums(bits.score(model, text).nll))

    effect = bits.grid_effect(rows, scores, text, {"nf4": scores[("GGUF grid", "nf4")]}, n_boot=50)
    e = effect.set_index("method")
    assert list(e.index) == ["nf4", "int8"]
    s = {k: scores[k].sum() for k in scores}
    by_hand = np.expm1(
        ((s[("GGUF grid", "nf4")] - s[("GGUF grid", "none")]) - (s[("off grid", "nf4")] - s[("off grid", "none")]))
        / text.n_scored
    )
    assert e.grid_vs_off_ppl_ratio["nf4"] == pytest.approx(by_hand)
    assert e.weight_error_ratio["nf4"] == pytest.approx(
        r.weight_rel_error[("GGUF grid", "nf4")] / r.weight_rel_error[("off grid", "nf4")]
    )
    assert e.bpb_round_trip_minus_bnb_method["nf4"] == 0 and np.isnan(e.bpb_round_trip_minus_bnb_method["int8"])
    with pytest.raises(ValueError, match="no block Linear"):
        bits.grid_confound(model, {}, text, ["nf4"], noise_seed=0)


def test_the_figures_of_notebook_06_draw_what_they_are_given():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reps = pd.DataFrame(
        {
            "model": ["a", "a", "a", "b"],
            "family": ["fp32", "nf4", "fp4", "fp32"],
            "bits": [4e9, 1e9, 1e9, 8e9],
            "q": [1.0, 1.2, 1.3, 0.9],
            "lo": [0.9, 1.1, 1.2, 0.8],
            "hi": [1.1, 1.3, 1.4, np.nan],
        }  # fmt: skip
    )
    fig, ax = plt.subplots()
    bits.kbit_panel(ax, reps.dropna(subset=["hi"]), "q", "lo", "hi", "bits", {"a": "r", "b": "g"}, {"nf4": "o"})
    (line,) = ax.lines[:1]
    assert line.get_xdata().tolist() == [4000, 1000]  # a's line: fp32 -> nf4, fp4 off it; Mbit
    markers = {round(float(x), 6) for marker in ax.lines[1:] for x in marker.get_xdata()}
    assert markers == {4000.0, 1000.0, 1030.0}  # fp4 drawn 3% right of nf4 (b, without an interval, left out)
    plt.close(fig)

    rows = [
        {"model": "m", "weights": w, "method": k, "weight_rel_error": e, "weight_rel_error_min": e / 2,
         "weight_rel_error_max": e * 2, "increase_over_own_fp32": i, "increase_low": i - 0.01, "increase_high": i + 0.01}
        for w, k, e, i in [("GGUF grid", "none", 0, 0), ("GGUF grid", "nf4", 0.1, 0.05), ("off grid", "nf4", 0.12, 0.07)]
    ]  # fmt: skip
    fig = bits.plot_confound(pd.DataFrame(rows), ["m"], ["nf4"])
    top, bottom = fig.axes
    assert [t.get_text() for t in top.texts] == ["0.100", "0.120"]  # the 'none' rows are not drawn
    assert [t.get_text() for t in bottom.texts] == ["+5.0%", "+7.0%"]
    assert top.get_yscale() == "log" and top.get_title() == "m: weight error"
    plt.close(fig)


def test_confound_words_by_hand():
    effect = pd.DataFrame(
        {
            "weight_error_ratio": [0.99, 1.02, 0.97],
            "grid_vs_off_low": [-0.3, 0.01, -0.05],
            "grid_vs_off_high": [-0.1, 0.2, 0.04],
        }
    )
    words = bits.confound_words(effect)
    assert words.startswith(
        "the GGUF grid changes the weight error by less than 5% (on-grid / off-grid 0.970 to 1.020)"
    )
    assert words.endswith("smaller in 1, larger in 1 and not resolved in 1 of 3 (model, method) pairs")
    assert bits.confound_words(effect.assign(weight_error_ratio=[0.8, 1.0, 1.0])).startswith("the weight error differs")
