"""Exact next-token measures (helpers.measures) against their float64 specification, brute-force
sampling, top-k ties, T = 0 and fp16 safety."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import generation, measures


def measures_spec(ref_logits: torch.Tensor, logits: torch.Tensor, T: float, k: int, answer: int) -> dict[str, float]:
    """The definition of :func:`helpers.measures.next_token_measures` for one row, in float64 log
    space: slow and plain, the specification the fast parts are tested against."""
    a, b = ref_logits.double(), logits.double()
    if T == 0:
        agree = bool(a.argmax() == b.argmax())
        p_ans, ref_p_ans = float(b.argmax() == answer), float(a.argmax() == answer)
        return dict(
            tv=1.0 - agree,
            kl=0.0 if agree else math.inf,
            top1_agree=agree,
            entropy=0.0,
            p_answer=p_ans,
            ref_p_answer=ref_p_ans,
            logp_answer=math.log(p_ans) if p_ans else -math.inf,
            ref_logp_answer=math.log(ref_p_ans) if ref_p_ans else -math.inf,
        )

    def log_probs(z: torch.Tensor) -> torch.Tensor:
        if 0 < k < len(z):
            z = torch.full_like(z, -math.inf).scatter(0, z.topk(k).indices, z.topk(k).values)
        return torch.log_softmax(z / T, 0)

    lp, lq = log_probs(a), log_probs(b)
    p, q = lp.exp(), lq.exp()
    kept = lp > -math.inf  # the support (every kept token has p > 0, even where it underflows)
    kl = math.inf if (lq[kept] == -math.inf).any() else float((p[kept] * (lp[kept] - lq[kept])).sum())
    return dict(
        tv=0.5 * float((p - q).abs().sum()),
        kl=kl,
        top1_agree=bool(a.argmax() == b.argmax()),
        entropy=-float((q[q > 0] * lq[q > 0]).sum()),
        p_answer=float(q[answer]),
        ref_p_answer=float(p[answer]),
        logp_answer=float(lq[answer]),
        ref_logp_answer=float(lp[answer]),
    )


def test_validation_messages_are_one_line():
    for kwargs, pattern in [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ]:
        with pytest.raises(ValueError, match=pattern) as err:
            measures.validate(**kwargs)
        assert "\n" not in str(err.value)
    measures.validate(0, 0, 1)
    with pytest.raises(ValueError, match="non-empty"):
        measures.validate_grid([], [0], [1])
    with pytest.raises(ValueError, match="top_k"):
        measures.validate_grid([0.7], [0, -5], [8])


def test_greedy_is_argmax_first_index_on_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert measures.next_token_probs(logits, 0).tolist() == [[0, 1, 0, 0]]
    assert generation.sample_tokens(logits, 0, 0, torch.tensor([0.99])).tolist() == [1]


def test_top_k_keeps_exactly_k_on_ties():
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]])
    p = measures.next_token_probs(logits, 1.0, top_k=2)
    assert (p > 0).sum().item() == 2  # a threshold rule (logits >= kth) would keep 4
    assert p.sum().item() == pytest.approx(1.0)


def test_fp16_logits_at_very_low_temperature_are_safe():
    logits = (torch.randn(4, 1000) * 20).half()
    for T in (1e-4, 1e-2, 0.1):
        p = measures.next_token_probs(logits, T, 0)
        assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(4))
    rows = measures.next_token_measures(logits, logits, [1e-4, 0.5], [0, 10]).to_dict("records")
    assert all(math.isfinite(r["tv"]) and math.isfinite(r["kl"]) for r in rows)


def _brute_force(ref, x, T, k, answer, n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = measures.next_token_probs(ref, T, k)[0]
    q = measures.next_token_probs(x, T, k)[0]
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
    row = measures.next_token_measures(ref, x, [T], [k], torch.tensor([answer])).to_dict("records")[0]
    tv_mc, pans_mc = _brute_force(ref, x, T, k, answer)
    assert row["tv"] == pytest.approx(tv_mc, abs=0.01)
    assert row["p_answer"] == pytest.approx(pans_mc, abs=0.01)
    # KL and entropy against direct formulas on the dense distributions
    p = measures.next_token_probs(ref, T, k)[0].double()
    q = measures.next_token_probs(x, T, k)[0].double()
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
    rows = measures.next_token_measures(ref, x, temps, [0], answers).to_dict("records")
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
    for r in measures.next_token_measures(x, x, [0, 0.3, 1.0], [0, 5]).to_dict("records"):
        assert r["tv"] == pytest.approx(0, abs=1e-6) and r["kl"] == pytest.approx(0, abs=1e-6) and r["top1_agree"]
    y = x.clone()
    y[0, x[0].argmax()] -= 100  # changes prompt 0's argmax
    rows = [r for r in measures.next_token_measures(x, y, [0], [0]).to_dict("records") if r["prompt_index"] == 0]
    assert rows[0]["tv"] == 1 and rows[0]["kl"] == math.inf and not rows[0]["top1_agree"]


@pytest.mark.parametrize("k", [0, 7])
def test_every_part_matches_the_float64_specification(k):
    # a logit spread of ~250 nats: from T = 2 down to 0.02 most of the row underflows in float32
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(3, 6000, generator=g) * 60
    x = ref + torch.randn(3, 6000, generator=g)
    x[2] = ref[2]  # identical rows: TV = KL = 0
    temps = [0.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.02]
    answers = torch.tensor([int(ref[0].argmax()), 17, -1])
    rows = measures.next_token_measures(ref, x, temps, [k], answers)
    assert list(rows.columns) == ["prompt_index", "temperature", "top_k", *measures.MEASURES]
    assert rows.temperature.tolist() == [T for T in temps for _ in range(3)]  # in the order given
    for r in rows.itertuples():
        i = r.prompt_index
        spec = measures_spec(ref[i], x[i], r.temperature, k, int(answers[i].clamp_min(0)))
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
    rows = measures.next_token_measures(masked_ref, masked_x, temps, ks).to_dict("records")
    assert torch.equal(masked_ref, before)  # the -inf are replaced in a copy, not in the caller's tensor
    expected = measures.next_token_measures(ref[:, :250], x[:, :250], temps, ks).to_dict("records")
    for r, e in zip(rows, expected):
        for key in ("tv", "kl", "entropy"):
            assert r[key] == pytest.approx(e[key], rel=1e-5, abs=1e-6)


def test_top_k_kl_at_low_temperature_is_finite_for_identical_kept_sets():
    # identical top-5 sets with logit gaps of about 4.7: at T = 0.05 every probability but the
    # largest underflows in float32, yet KL is about 1e-40, not inf (a ratio of two zeros)
    ref = torch.tensor([[10.0, 5.0, 0.6, -4.1, -8.8, -30.0, -31.0]])
    x = ref + torch.tensor([[0.0, -0.25, -0.02, 0.03, 0.0, 1.0, -1.0]])  # p2 = e^-100 > 0, q2 = e^-105 = 0
    row = [
        r for r in measures.next_token_measures(ref, x, [0.05, 1.0], [5]).to_dict("records") if r["temperature"] == 0.05
    ][0]
    assert math.isfinite(row["kl"]) and 0 <= row["kl"] < 1e-30
    # and infinite as soon as the kept sets differ (a token the reference keeps, the method drops)
    x2 = x.clone()
    x2[0, 4] = -40.0
    rows = measures.next_token_measures(ref, x2, [0.05, 1.0], [5]).to_dict("records")
    assert all(r["kl"] == float("inf") for r in rows if r["temperature"] > 0)


def test_the_reference_against_itself_takes_the_one_distribution_path():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3000, generator=g) * 8
    answers = torch.tensor([0, 5, 9, 11])
    same = measures.next_token_measures(x, x, [0.3, 1.0, 1.7], [0], answers)  # one tensor: one row of exps
    copy = measures.next_token_measures(x, x.clone(), [0.3, 1.0, 1.7], [0], answers)  # two tensors
    assert (same.tv == 0).all() and (same.kl == 0).all()
    for m in ("entropy", "logp_answer", "ref_logp_answer", "p_answer"):
        assert same[m].to_numpy() == pytest.approx(copy[m].to_numpy(), rel=1e-6, abs=1e-9)


def test_log_normalizer_is_logsumexp():
    torch.manual_seed(4)
    logits = torch.randn(5, 262144) * 6
    assert torch.allclose(measures.log_normalizer(logits), torch.logsumexp(logits.double(), -1).float(), rtol=1e-6)
