"""Exact next-token measures against brute force, top-k ties, T=0, fp16 safety, CRN sampling."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import sampling


def test_validation_messages_are_one_line():
    for kwargs, pattern in [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ]:
        with pytest.raises(ValueError, match=pattern) as err:
            sampling.validate(**kwargs)
        assert "\n" not in str(err.value)
    sampling.validate(0, 0, 1)
    with pytest.raises(ValueError, match="non-empty"):
        sampling.validate_grid([], [0], [1])
    with pytest.raises(ValueError, match="top_k"):
        sampling.validate_grid([0.7], [0, -5], [8])


def test_greedy_is_argmax_first_index_on_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert sampling.next_token_probs(logits, 0).tolist() == [[0, 1, 0, 0]]
    assert sampling.sample_tokens(logits, 0, 0, torch.tensor([0.99])).tolist() == [1]


def test_top_k_keeps_exactly_k_on_ties():
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]])
    p = sampling.next_token_probs(logits, 1.0, top_k=2)
    assert (p > 0).sum().item() == 2  # a threshold rule (logits >= kth) would keep 4
    assert p.sum().item() == pytest.approx(1.0)


def test_fp16_logits_at_very_low_temperature_are_safe():
    logits = (torch.randn(4, 1000) * 20).half()
    for T in (1e-4, 1e-2, 0.1):
        p = sampling.next_token_probs(logits, T, 0)
        assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(4))
    rows = sampling.next_token_measures(logits, logits, [1e-4, 0.5], [0, 10]).to_dict("records")
    assert all(math.isfinite(r["tv"]) and math.isfinite(r["kl"]) for r in rows)


def _brute_force(ref, x, T, k, answer, n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = sampling.next_token_probs(ref, T, k)[0]
    q = sampling.next_token_probs(x, T, k)[0]
    draws_p = torch.multinomial(p, n, replacement=True, generator=g)
    draws_q = torch.multinomial(q, n, replacement=True, generator=g)
    ep = torch.bincount(draws_p, minlength=p.numel()).float() / n
    eq = torch.bincount(draws_q, minlength=q.numel()).float() / n
    return 0.5 * (ep - eq).abs().sum().item(), eq[answer].item()


@pytest.mark.parametrize("T,k", [(0.5, 0), (1.0, 0), (1.5, 0), (0.7, 5), (1.0, 3)])
def test_exact_measures_match_a_sampled_estimate(T, k):
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(1, 12, generator=g) * 2
    x = ref + 0.7 * torch.randn(1, 12, generator=g)
    answer = int(ref.argmax())
    row = sampling.next_token_measures(ref, x, [T], [k], torch.tensor([answer])).to_dict("records")[0]
    tv_mc, pans_mc = _brute_force(ref, x, T, k, answer)
    assert row["tv"] == pytest.approx(tv_mc, abs=0.01)
    assert row["p_answer"] == pytest.approx(pans_mc, abs=0.01)
    # KL and entropy against direct formulas on the dense distributions
    p = sampling.next_token_probs(ref, T, k)[0].double()
    q = sampling.next_token_probs(x, T, k)[0].double()
    nz = p > 0
    kl = (p[nz] * (p[nz] / q[nz]).log()).sum().item() if (q[nz] > 0).all() else math.inf
    assert row["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert row["entropy"] == pytest.approx(-(q[q > 0] * q[q > 0].log()).sum().item(), rel=1e-4)


def test_dense_measures_match_float64_on_a_wide_vocabulary_and_leave_threads_as_they_were():
    # a logit spread of ~100 nats: at T = 0.05 most tokens underflow and are dropped by the kernel
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(5, 4000, generator=g) * 25
    x = ref + torch.randn(5, 4000, generator=g)
    temps = [0.05, 0.2, 0.7, 1.0, 2.0]
    answers = torch.tensor([0, 1, 2, 3, -1])
    threads = torch.get_num_threads()
    rows = sampling.next_token_measures(ref, x, temps, [0], answers).to_dict("records")
    assert torch.get_num_threads() == threads
    for r in rows:
        T, i = r["temperature"], r["prompt_index"]
        lp, lq = torch.log_softmax(ref[i].double() / T, -1), torch.log_softmax(x[i].double() / T, -1)
        p, q = lp.exp(), lq.exp()
        assert r["tv"] == pytest.approx(0.5 * (p - q).abs().sum().item(), abs=1e-6)
        assert r["kl"] == pytest.approx((p * (lp - lq)).sum().item(), rel=1e-4, abs=1e-5)
        assert r["entropy"] == pytest.approx(-(q * lq).sum().item(), rel=1e-4, abs=1e-5)
        if i < 4:
            assert r["p_answer"] == pytest.approx(q[i].item(), rel=1e-5, abs=1e-12)
            assert r["ref_p_answer"] == pytest.approx(p[i].item(), rel=1e-5, abs=1e-12)


def test_identical_models_have_zero_divergence_and_greedy_is_binary():
    x = torch.randn(3, 50)
    for r in sampling.next_token_measures(x, x, [0, 0.3, 1.0], [0, 5]).to_dict("records"):
        assert r["tv"] == pytest.approx(0, abs=1e-6) and r["kl"] == pytest.approx(0, abs=1e-6) and r["top1_agree"]
    y = x.clone()
    y[0, x[0].argmax()] -= 100  # changes prompt 0's argmax
    rows = [r for r in sampling.next_token_measures(x, y, [0], [0]).to_dict("records") if r["prompt_index"] == 0]
    assert rows[0]["tv"] == 1 and rows[0]["kl"] == math.inf and not rows[0]["top1_agree"]


def test_uniforms_are_uniform_and_common():
    seeds = torch.tensor([sampling.sequence_seed("p", i) for i in range(20000)])
    u = sampling.step_uniforms(seeds, 3)
    assert ((u > 0) & (u < 1)).all()
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / len(u)
    assert (hist - 0.1).abs().max() < 0.01
    assert torch.equal(u, sampling.step_uniforms(seeds, 3))  # same seed and step: same number
    assert not torch.equal(u, sampling.step_uniforms(seeds, 4))
    assert sampling.sequence_seed("p", 0) != sampling.sequence_seed("p", 1)


def test_inverse_cdf_sampling_has_the_right_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    seeds = torch.arange(40000)
    toks = sampling.sample_tokens(logits.expand(len(seeds), -1), 1.0, 0, sampling.step_uniforms(seeds, 0))
    freq = torch.bincount(toks, minlength=4).float() / len(seeds)
    assert torch.allclose(freq, torch.softmax(logits, 0), atol=0.01)


def test_text_measures():
    assert sampling.distinct_n([1, 2, 1, 2], 1) == 0.5
    assert sampling.distinct_n([1, 2, 1, 2], 2) == pytest.approx(2 / 3)
    assert math.isnan(sampling.distinct_n([1], 2))
    assert sampling.repetition_rate([5, 6, 7, 5, 6, 7]) == pytest.approx(1 / 4)
    assert sampling.truncate_at_eos([4, 5, 2, 6], {2}) == [4, 5]
    assert sampling.first_word('  "Paris." is') == "paris"
    assert sampling.first_word(" ...") == ""


@pytest.mark.models
def test_batched_generation_equals_per_sample_loop_and_prefixes(loaded):
    model, tok = loaded("fp32")
    prompts = ["The capital of France is", "Once upon a time, a small dog", "1, 2, 3,"]
    seeds = [sampling.sequence_seed(p, 0) for p in prompts]
    batched = sampling.generate(model, tok, prompts, seeds, 0.9, 0, 12)
    for i, p in enumerate(prompts):
        single = sampling.generate(model, tok, [p], [seeds[i]], 0.9, 0, 12)
        assert torch.equal(single.tokens[0], batched.tokens[i])
    short = sampling.generate(model, tok, prompts, seeds, 0.9, 0, 5)
    assert torch.equal(short.tokens, batched.tokens[:, :5])  # N tokens = prefix of M > N


@pytest.mark.models
def test_reference_nll_matches_a_plain_forward(loaded):
    model, tok = loaded("fp32")
    prompts = ["Hello there", "The capital of France is"]
    gen = sampling.generate(model, tok, prompts, [1, 2], 0, 0, 6)
    nll = sampling.reference_nll(model, gen.prompt_ids, gen.tokens)
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
    gen = sampling.generate(_Overflowing(model, row=1, at=3), tok, prompts, [1, 2, 3], 0.8, 0, 6)
    assert gen.finite.tolist() == [True, False, True]
    assert gen.tokens.shape == (3, 6)  # no crash, fixed length kept
    clean = sampling.generate(model, tok, prompts, [1, 2, 3], 0.8, 0, 6)
    assert clean.finite.all() and torch.equal(clean.tokens[[0, 2]], gen.tokens[[0, 2]])


@pytest.mark.parametrize("k", [0, 7])
def test_every_part_matches_the_float64_specification(k):
    # a logit spread of ~250 nats: from T = 2 down to 0.02 most of the row underflows in float32
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(3, 6000, generator=g) * 60
    x = ref + torch.randn(3, 6000, generator=g)
    x[2] = ref[2]  # identical rows: TV = KL = 0
    temps = [0.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.02]
    answers = torch.tensor([int(ref[0].argmax()), 17, -1])
    rows = sampling.next_token_measures(ref, x, temps, [k], answers)
    assert list(rows.columns) == ["prompt_index", "temperature", "top_k", *sampling.MEASURES]
    assert rows.temperature.tolist() == [T for T in temps for _ in range(3)]  # in the order given
    for r in rows.itertuples():
        i = r.prompt_index
        spec = sampling.measures_spec(ref[i], x[i], r.temperature, k, int(answers[i].clamp_min(0)))
        for m in ("tv", "kl", "entropy"):
            assert getattr(r, m) == pytest.approx(spec[m], rel=1e-4, abs=2e-6), (m, r)
        assert r.top1_agree == spec["top1_agree"]
        if i == 2:
            assert math.isnan(r.p_answer) and math.isnan(r.logp_answer)
        else:
            assert r.logp_answer == pytest.approx(spec["logp_answer"], rel=1e-5, abs=1e-5)
            assert r.ref_logp_answer == pytest.approx(spec["ref_logp_answer"], rel=1e-5, abs=1e-5)
            assert r.p_answer == pytest.approx(spec["p_answer"], rel=1e-5, abs=1e-12)


def test_masked_tokens_count_as_zero_probability_and_inputs_are_not_modified():
    g = torch.Generator().manual_seed(6)
    ref = torch.randn(2, 300, generator=g) * 3
    x = ref + 0.5 * torch.randn(2, 300, generator=g)
    masked_ref, masked_x = ref.clone(), x.clone()
    masked_ref[:, 250:] = float("-inf")  # e.g. padding rows of an enlarged vocabulary
    masked_x[:, 250:] = float("-inf")
    before = masked_ref.clone()
    temps, ks = [0.0, 0.3, 1.0, 2.0], [0, 5]
    rows = sampling.next_token_measures(masked_ref, masked_x, temps, ks).to_dict("records")
    assert torch.equal(masked_ref, before)  # the -inf are replaced in a copy, not in the caller's tensor
    expected = sampling.next_token_measures(ref[:, :250], x[:, :250], temps, ks).to_dict("records")
    for r, e in zip(rows, expected):
        for key in ("tv", "kl", "entropy"):
            assert r[key] == pytest.approx(e[key], rel=1e-5, abs=1e-6)


def test_top_k_kl_at_low_temperature_is_finite_for_identical_kept_sets():
    # identical top-5 sets with logit gaps of about 4.7: at T = 0.05 every probability but the
    # largest underflows in float32, yet KL is about 1e-40, not inf (a ratio of two zeros)
    ref = torch.tensor([[10.0, 5.0, 0.6, -4.1, -8.8, -30.0, -31.0]])
    x = ref + torch.tensor([[0.0, -0.25, -0.02, 0.03, 0.0, 1.0, -1.0]])  # p2 = e^-100 > 0, q2 = e^-105 = 0
    row = [
        r for r in sampling.next_token_measures(ref, x, [0.05, 1.0], [5]).to_dict("records") if r["temperature"] == 0.05
    ][0]
    assert math.isfinite(row["kl"]) and 0 <= row["kl"] < 1e-30
    # and infinite as soon as the kept sets differ (a token the reference keeps, the method drops)
    x2 = x.clone()
    x2[0, 4] = -40.0
    rows = sampling.next_token_measures(ref, x2, [0.05, 1.0], [5]).to_dict("records")
    assert all(r["kl"] == float("inf") for r in rows if r["temperature"] > 0)


def test_loop_tokens_on_hand_made_sequences():
    assert sampling.loop_tokens([]) == 0 and sampling.loop_tokens([1]) == 0 and sampling.loop_tokens([1, 2, 3, 4]) == 0
    assert sampling.loop_tokens([5, 5]) == 2  # one token twice: period 1, two copies
    assert sampling.loop_tokens([1, 2, 3, 1, 2]) == 0  # period 3 but fewer than two full copies
    assert sampling.loop_tokens([9, 1, 2, 3, 1, 2, 3, 1]) == 7  # "1 2 3 1 2 3 1": period 3, partial copy included
    assert sampling.loop_tokens([4, 7, 7, 7, 7]) == 4
    assert sampling.loop_tokens([10, 11] + [7, 8] * 5) == 10  # period 2 (and 4, 6, 8: the same suffix)
    assert sampling.loop_tokens([1, 1, 1, 1, 2, 3]) == 0  # a loop that the text has left does not count
    sentence = list(range(100, 116))  # a 16-token sentence said twice
    assert sampling.loop_tokens([1, 2] + sentence * 2) == 32
    assert sampling.loop_tokens([1, 2] + sentence * 2, max_period=15) == 0
    assert sampling.LOOP_MIN_TOKENS == 8 and sampling.LOOP_MAX_PERIOD == 16


def test_diverge_at_on_hand_made_sequences():
    assert sampling.diverge_at([1, 2, 3], [1, 2, 4]) == 2
    assert sampling.diverge_at([1, 2, 3], [1, 2, 3]) == 3
    assert sampling.diverge_at([5], [6]) == 0
    assert sampling.diverge_at([1, 2], [1, 2, 3]) == 2 and sampling.diverge_at([], [1]) == 0


@pytest.mark.parametrize("V,k", [(4, 0), (3000, 0), (3000, 7), (4096, 50)])
def test_two_level_inverse_cdf_matches_one_float64_cumulative_sum(V, k):
    torch.manual_seed(V + k)
    logits = torch.randn(256, V) * 4
    logits[:8, :-1] = -1e4  # all the mass on the last token (the padded tail block when V % 1024 != 0)
    probs = sampling.next_token_probs(logits, 0.9, k)
    u = sampling.step_uniforms(torch.arange(256), V)
    cdf = probs.double().cumsum(-1)
    expected = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:]).squeeze(1)
    got = sampling.inverse_cdf(probs, u)
    assert torch.equal(got, expected)
    assert (probs.gather(1, got[:, None]) > 0).all()  # never a token of probability 0
    assert torch.equal(sampling.inverse_cdf(probs, u, block=64), expected)


@pytest.mark.models
def test_sequences_of_different_settings_share_a_batch(loaded):
    model, tok = loaded("fp32")
    prompts = ["The capital of France is", "Once upon a time, a small dog", "1, 2, 3,", "Hello there"]
    seeds = [sampling.sequence_seed(p, 0) for p in prompts]
    temperatures, top_ks = [0.0, 0.7, 1.5, 0.7], [0, 0, 0, 5]
    mixed = sampling.generate(model, tok, prompts, seeds, temperatures, top_ks, 8, with_nll=True)
    for i, p in enumerate(prompts):
        alone = sampling.generate(model, tok, [p], [seeds[i]], temperatures[i], top_ks[i], 8)
        assert torch.equal(alone.tokens[0], mixed.tokens[i])
    # the NLL the generating model gives its own tokens is the reference NLL of a separate pass
    assert torch.allclose(mixed.nll, sampling.reference_nll(model, mixed.prompt_ids, mixed.tokens), atol=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        sampling.generate(model, tok, prompts, seeds, [0.7, 1.0], 0, 2)


def test_the_reference_against_itself_takes_the_one_distribution_path():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3000, generator=g) * 8
    answers = torch.tensor([0, 5, 9, 11])
    same = sampling.next_token_measures(x, x, [0.3, 1.0, 1.7], [0], answers)  # one tensor: one row of exps
    copy = sampling.next_token_measures(x, x.clone(), [0.3, 1.0, 1.7], [0], answers)  # two tensors
    assert (same.tv == 0).all() and (same.kl == 0).all()
    for m in ("entropy", "logp_answer", "ref_logp_answer", "p_answer"):
        assert same[m].to_numpy() == pytest.approx(copy[m].to_numpy(), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("T,k", [(0.7, 0), (0.05, 0), (1.5, 5)])
def test_sampling_weights_are_the_probabilities_before_normalisation(T, k):
    torch.manual_seed(3)
    logits = torch.randn(6, 3000) * 5
    w = sampling.sampling_weights(logits, T, k)
    kept = sampling.next_token_probs(logits, T, k) > 0  # the top-k
    exact = torch.softmax(torch.where(kept, logits.double(), -math.inf) / T, -1)  # float64 definition
    assert torch.allclose((w / w.sum(-1, keepdim=True)).double(), exact, rtol=1e-5, atol=1e-37)
    assert torch.equal(w.max(-1).values, torch.ones(6))  # the largest weight is exp(0)


def test_log_normalizer_is_logsumexp():
    torch.manual_seed(4)
    logits = torch.randn(5, 262144) * 6
    assert torch.allclose(sampling.log_normalizer(logits), torch.logsumexp(logits.double(), -1).float(), rtol=1e-6)


@pytest.mark.parametrize("V", [3000, sampling.ROW_BY_ROW_MIN_VOCAB])
def test_sample_rows_gives_each_row_its_own_setting_on_both_paths(V):
    torch.manual_seed(5)
    logits = torch.randn(8, V) * 3
    settings = [(0.0, 0), (0.7, 0), (1.5, 0), (0.7, 5)] * 2
    u = sampling.step_uniforms(torch.arange(8), 0)
    assert sampling.row_by_row(logits) == (V >= sampling.ROW_BY_ROW_MIN_VOCAB)
    one_by_one = [int(sampling.sample_tokens(logits[i : i + 1], *settings[i], u[i : i + 1])[0]) for i in range(8)]
    assert sampling.sample_rows(logits, settings, u).tolist() == one_by_one
    assert torch.allclose(sampling.log_normalizer(logits), torch.logsumexp(logits, -1), rtol=1e-6)
