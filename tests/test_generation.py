"""Seeded generation with common random numbers (helpers.generation): the batch equals the
per-sample loop, the sampler has the right distribution, and the quality measures on hand-made
sequences."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from helpers import generation, measures


def test_uniforms_are_uniform_and_common():
    seeds = torch.tensor([generation.sequence_seed("p", i) for i in range(20000)])
    u = generation.step_uniforms(seeds, 3)
    assert ((u > 0) & (u < 1)).all()
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / len(u)
    assert (hist - 0.1).abs().max() < 0.01
    assert torch.equal(u, generation.step_uniforms(seeds, 3))  # same seed and step: same number
    assert not torch.equal(u, generation.step_uniforms(seeds, 4))
    assert generation.sequence_seed("p", 0) != generation.sequence_seed("p", 1)


def test_inverse_cdf_sampling_has_the_right_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    seeds = torch.arange(40000)
    toks = generation.sample_tokens(logits.expand(len(seeds), -1), 1.0, 0, generation.step_uniforms(seeds, 0))
    freq = torch.bincount(toks, minlength=4).float() / len(seeds)
    assert torch.allclose(freq, torch.softmax(logits, 0), atol=0.01)


def test_text_measures():
    assert generation.distinct_n([1, 2, 1, 2], 1) == 0.5
    assert generation.distinct_n([1, 2, 1, 2], 2) == pytest.approx(2 / 3)
    assert math.isnan(generation.distinct_n([1], 2))
    assert generation.repetition_rate([5, 6, 7, 5, 6, 7]) == pytest.approx(1 / 4)
    assert generation.truncate_at_eos([4, 5, 2, 6], {2}) == [4, 5]
    assert generation.first_word('  "Paris." is') == "paris"
    assert generation.first_word(" ...") == ""


@pytest.mark.models
def test_batched_generation_equals_per_sample_loop_and_prefixes(loaded):
    model, tok = loaded("fp32")
    prompts = ["The capital of France is", "Once upon a time, a small dog", "1, 2, 3,"]
    seeds = [generation.sequence_seed(p, 0) for p in prompts]
    batched = generation.generate(model, tok, prompts, seeds, 0.9, 0, 12)
    for i, p in enumerate(prompts):
        single = generation.generate(model, tok, [p], [seeds[i]], 0.9, 0, 12)
        assert torch.equal(single.tokens[0], batched.tokens[i])
    short = generation.generate(model, tok, prompts, seeds, 0.9, 0, 5)
    assert torch.equal(short.tokens, batched.tokens[:, :5])  # N tokens = prefix of M > N


@pytest.mark.models
def test_reference_nll_matches_a_plain_forward(loaded):
    model, tok = loaded("fp32")
    prompts = ["Hello there", "The capital of France is"]
    gen = generation.generate(model, tok, prompts, [1, 2], 0, 0, 6)
    nll = generation.reference_nll(model, gen.prompt_ids, gen.tokens)
    for i in range(2):
        ids = torch.tensor([gen.prompt_ids[i] + gen.tokens[i].tolist()])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, -7:-1].float(), -1)
        expected = -logp.gather(1, gen.tokens[i][:, None]).squeeze(1)
        assert torch.allclose(nll[i], expected, atol=1e-4)


class _Overflowing(torch.nn.Module):
    """A real model whose logits for batch row ``row`` become inf from forward call ``at`` on,
    as fp16 logits do when the residual stream overflows."""

    def __init__(self, model, row: int, at: int):
        super().__init__()
        self.model, self.row, self.at, self.calls = model, row, at, 0

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        self.calls += 1
        if self.calls > self.at:
            out.logits[self.row] = float("inf")
        return out


@pytest.mark.models
def test_generation_flags_rows_whose_logits_overflowed(loaded):
    model, tok = loaded("fp32")
    prompts = ["Hello there", "The capital of France is", "1, 2, 3,"]
    gen = generation.generate(_Overflowing(model, row=1, at=3), tok, prompts, [1, 2, 3], 0.8, 0, 6)
    assert gen.finite.tolist() == [True, False, True]
    assert gen.tokens.shape == (3, 6)  # no crash, fixed length kept
    clean = generation.generate(model, tok, prompts, [1, 2, 3], 0.8, 0, 6)
    assert clean.finite.all() and torch.equal(clean.tokens[[0, 2]], gen.tokens[[0, 2]])


def test_loop_tokens_on_hand_made_sequences():
    assert (
        generation.loop_tokens([]) == 0
        and generation.loop_tokens([1]) == 0
        and generation.loop_tokens([1, 2, 3, 4]) == 0
    )
    assert generation.loop_tokens([5, 5]) == 2  # one token twice: period 1, two copies
    assert generation.loop_tokens([1, 2, 3, 1, 2]) == 0  # period 3 but fewer than two full copies
    assert generation.loop_tokens([9, 1, 2, 3, 1, 2, 3, 1]) == 7  # "1 2 3 1 2 3 1": period 3, partial copy included
    assert generation.loop_tokens([4, 7, 7, 7, 7]) == 4
    assert generation.loop_tokens([10, 11] + [7, 8] * 5) == 10  # period 2 (and 4, 6, 8: the same suffix)
    assert generation.loop_tokens([1, 1, 1, 1, 2, 3]) == 0  # a loop that the text has left does not count
    sentence = list(range(100, 116))  # a 16-token sentence said twice
    assert generation.loop_tokens([1, 2] + sentence * 2) == 32
    assert generation.loop_tokens([1, 2] + sentence * 2, max_period=15) == 0
    assert generation.LOOP_MIN_TOKENS == 8 and generation.LOOP_MAX_PERIOD == 16


def test_diverge_at_on_hand_made_sequences():
    assert generation.diverge_at([1, 2, 3], [1, 2, 4]) == 2
    assert generation.diverge_at([1, 2, 3], [1, 2, 3]) == 3
    assert generation.diverge_at([5], [6]) == 0
    assert generation.diverge_at([1, 2], [1, 2, 3]) == 2 and generation.diverge_at([], [1]) == 0


@pytest.mark.parametrize("V,k", [(4, 0), (3000, 0), (3000, 7), (4096, 50)])
def test_two_level_inverse_cdf_matches_one_float64_cumulative_sum(V, k):
    torch.manual_seed(V + k)
    logits = torch.randn(256, V) * 4
    logits[:8, :-1] = -1e4  # all the mass on the last token (the padded tail block when V % 1024 != 0)
    probs = measures.next_token_probs(logits, 0.9, k)
    u = generation.step_uniforms(torch.arange(256), V)
    cdf = probs.double().cumsum(-1)
    expected = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:]).squeeze(1)
    got = generation.inverse_cdf(probs, u)
    assert torch.equal(got, expected)
    assert (probs.gather(1, got[:, None]) > 0).all()  # never a token of probability 0
    assert torch.equal(generation.inverse_cdf(probs, u, block=64), expected)


@pytest.mark.models
def test_sequences_of_different_settings_share_a_batch(loaded):
    model, tok = loaded("fp32")
    prompts = ["The capital of France is", "Once upon a time, a small dog", "1, 2, 3,", "Hello there"]
    seeds = [generation.sequence_seed(p, 0) for p in prompts]
    temperatures, top_ks = [0.0, 0.7, 1.5, 0.7], [0, 0, 0, 5]
    mixed = generation.generate(model, tok, prompts, seeds, temperatures, top_ks, 8, with_nll=True)
    for i, p in enumerate(prompts):
        alone = generation.generate(model, tok, [p], [seeds[i]], temperatures[i], top_ks[i], 8)
        assert torch.equal(alone.tokens[0], mixed.tokens[i])
    # the NLL the generating model gives its own tokens is the reference NLL of a separate pass
    assert torch.allclose(mixed.nll, generation.reference_nll(model, mixed.prompt_ids, mixed.tokens), atol=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        generation.generate(model, tok, prompts, seeds, [0.7, 1.0], 0, 2)


@pytest.mark.parametrize("T,k", [(0.7, 0), (0.05, 0), (1.5, 5)])
def test_sampling_weights_are_the_probabilities_before_normalisation(T, k):
    torch.manual_seed(3)
    logits = torch.randn(6, 3000) * 5
    w = generation.sampling_weights(logits, T, k)
    kept = measures.next_token_probs(logits, T, k) > 0  # the top-k
    exact = torch.softmax(torch.where(kept, logits.double(), -math.inf) / T, -1)  # float64 definition
    assert torch.allclose((w / w.sum(-1, keepdim=True)).double(), exact, rtol=1e-5, atol=1e-37)
    assert torch.equal(w.max(-1).values, torch.ones(6))  # the largest weight is exp(0)


@pytest.mark.parametrize("V", [3000, measures.ROW_BY_ROW_MIN_VOCAB])
def test_sample_rows_gives_each_row_its_own_setting_on_both_paths(V):
    torch.manual_seed(5)
    logits = torch.randn(8, V) * 3
    settings = [(0.0, 0), (0.7, 0), (1.5, 0), (0.7, 5)] * 2
    u = generation.step_uniforms(torch.arange(8), 0)
    assert measures.row_by_row(logits) == (V >= measures.ROW_BY_ROW_MIN_VOCAB)
    one_by_one = [int(generation.sample_tokens(logits[i : i + 1], *settings[i], u[i : i + 1])[0]) for i in range(8)]
    assert generation.sample_rows(logits, settings, u).tolist() == one_by_one
    assert torch.allclose(measures.log_normalizer(logits), torch.logsumexp(logits, -1), rtol=1e-6)


@pytest.mark.models
def test_batch_dependence_is_rounding_only_in_fp32(loaded):
    model, tok = loaded("fp32")
    prompts = ["The capital of France is", "Once upon a time, a small dog", "1, 2, 3,"]
    got = generation.batch_dependence(model, tok, prompts, copies=3)
    assert got["prompts"] == 3
    for view in generation.BATCH_VIEWS:
        assert 0 <= got[f"{view}_median_change"] <= got[f"{view}_max_change"] < 1e-3
        assert got[f"{view}_greedy_changed"] == 0.0
    single = generation.batch_dependence(model, tok, prompts[:1], copies=1)
    assert all(single[f"{v}_max_change"] == 0.0 for v in generation.BATCH_VIEWS)  # the same call each time


def test_batch_dependent_flags_changes_above_rounding():
    table = pd.DataFrame(
        {
            "padded_max_change": [1e-5, 1e-5, 1e-5, float("nan")],
            "copies_max_change": [3e-5, 1e-5, 0.05, 1e-5],
            "mixed_max_change": [2e-5, 0.2, 1e-4, 1e-5],
        }
    )
    got = generation.batch_dependent(table)
    assert got.dependent.tolist() == [False, True, True, True]  # NaN: not known to be rounding
    assert got.max_change.tolist()[:3] == [3e-5, 0.2, 0.05]
    assert generation.batch_dependent(table, tolerance=0.1).dependent.tolist() == [False, True, False, True]
