"""The independent judge and the generation measure (helpers.judge), the greedy-loop instrument
and the synthesis of every instrument's verdicts (helpers.analysis.synthesis)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import analysis, judge

PROMPT = "The history of the old town begins in the twelfth century, when"
FLUENT = (
    " a small group of merchants settled on the banks of the river and built a market that soon drew"
    " traders from across the region."
)


def test_novel_bytes_by_hand():
    assert judge.novel_bytes("abc") == 3
    # span 4 over "abab...": 3 leading bytes, then the grams "abab" and "baba" once each
    assert judge.novel_bytes("ab" * 20, span=4) == 5
    assert judge.novel_bytes("", span=4) == 0
    assert judge.novel_bytes("héllo wörld", span=16) == len("héllo wörld".encode())  # no copy: every byte
    text = "the cat sat on the mat. " * 4
    assert judge.novel_bytes(text) < len(text) / 2  # copies of a 24-byte phrase add nothing new


def test_repeated_phrase_keeps_the_leading_space_and_length():
    out = judge.repeated_phrase(FLUENT, words=4)
    assert out.startswith(" a small group of a small group")
    assert len(out.encode()) >= len(FLUENT.encode())


@pytest.mark.models
def test_judge_equals_brute_force_rescoring(loaded):
    """Batched, left-padded scoring of re-tokenized continuations = one float64 pass per text."""
    model, tok = loaded("fp32")
    prompts = [PROMPT, "Water boils at", "Once upon a time"]
    conts = [FLUENT, " one hundred degrees Celsius at sea level.", ""]
    nats, n_tok = judge.continuation_nll(model, tok, prompts, conts, batch_size=2)
    for p, c, got, k in zip(prompts, conts, nats, n_tok):
        tail = tok(c, add_special_tokens=False)["input_ids"] if c else []
        assert k == len(tail)
        ids = tok(p)["input_ids"] + tail
        with torch.inference_mode():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        want = -sum(lp[len(ids) - len(tail) - 1 + j, t].item() for j, t in enumerate(tail))
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


@pytest.mark.models
def test_a_repeated_phrase_scores_worse_though_its_log_loss_is_lower(loaded):
    model, tok = loaded("fp32")
    texts = [FLUENT, judge.repeated_phrase(FLUENT, words=6)]
    nats, _ = judge.continuation_nll(model, tok, [PROMPT] * 2, texts)
    s = judge.text_scores(nats, texts)
    assert s.bits_per_byte[1] < s.bits_per_byte[0]  # likelihood alone prefers the loop
    assert s.bits_per_novel_byte[1] > s.bits_per_novel_byte[0]  # the measure does not


def test_self_judge_units():
    g = pd.DataFrame({"text": [" ab", None], "ref_nll": [2.0, np.nan], "n_tokens": [3, 0]})
    s = judge.self_judge(g)
    assert s.bits[0] == pytest.approx(6 / math.log(2))
    assert s.bits_per_byte[0] == pytest.approx(6 / math.log(2) / 3)
    assert np.isnan(s.bits_per_novel_byte[1])


def _scored(losses: dict[float, float], prompts: int = 6, seeds: int = 2) -> pd.DataFrame:
    """Generations where fp4's bits per novel byte are fp32's times (1 + losses[T]) on every prompt."""
    rng = np.random.default_rng(0)
    rows = []
    for T, r in losses.items():
        for p in range(prompts):
            for s in range(seeds):
                novel, ref_bpnb = rng.uniform(50, 150), rng.uniform(0.8, 1.6)
                for method, factor in (("fp32", 1.0), ("fp4", 1 + r), ("nf4", 1 + r / 2)):
                    rows.append({"model": "m", "view": "independent", "method": method, "temperature": T,
                                 "top_k": 0, "prompt_id": f"p{p}", "sample": s, "novel_bytes": novel, "bytes": novel,
                                 "bits": novel * ref_bpnb * factor})  # fmt: skip
    return pd.DataFrame(rows)


def test_generation_claims_read_the_judged_measure():
    scored = _scored({0.3: 0.2, 0.5: 0.2, 1.0: 0.0, 1.5: 0.0})
    blocks = judge.paired_blocks(scored)
    claims = analysis.temperature_claims(
        blocks, (0.25, 0.8), (1.0, 1.5), (0.5, 0.8), n_boot=100, measure=judge.JUDGED
    ).set_index(["claim", "version", "subject"])
    assert claims.estimate["C3", "first", "fp4"] == pytest.approx(0.2)
    assert claims.estimate["C3", "first", "nf4"] == pytest.approx(0.1)
    assert claims.verdict["C3", "first", "fp4"] == "holds"
    assert claims.estimate["C2", "later", "nf4 vs fp4"] == pytest.approx(0.1)
    # C1 pools every T: the same novel bytes on both sides, so R = sum of bits / reference's - 1
    bits = scored.groupby("method").bits.sum()
    assert claims.estimate["C1", "both", "nf4 vs fp4"] == pytest.approx((bits.fp4 - bits.nf4) / bits.fp32)
    curve = analysis.loss_curve(blocks, n_boot=50, measure=judge.JUDGED).set_index(["method", "temperature"])
    assert curve.R["fp4", 0.3] == pytest.approx(0.2)
    assert curve.Q["fp4", 0.3] == pytest.approx(curve.Q_ref["fp4", 0.3] * 1.2)


def test_greedy_loop_claims_by_hand():
    rows = [{"model": "m", "method": m, "temperature": 0.0, "max_new_tokens": 48, "finite": True,
             "prompt_id": f"p{i}", "in_loop": float(v)}
            for m, loops in (("fp32", [0, 0, 0, 0]), ("nf4", [1, 0, 0, 0]), ("fp4", [1, 1, 0, 0]))
            for i, v in enumerate(loops)]  # fmt: skip
    got = judge.greedy_loop_claims(pd.DataFrame(rows), n_boot=100).set_index(["claim", "subject"])
    assert got.estimate["C3", "fp4"] == pytest.approx(0.5)
    assert got.estimate["C3", "nf4"] == pytest.approx(0.25)
    assert got.estimate["C2", "nf4 vs fp4"] == pytest.approx(0.25)
    assert got.direction["C2", "nf4 vs fp4"] == "nf4 more resilient at low T"


def test_synthesis_answers():
    assert analysis.instrument_verdict(["holds", "holds"]) == "holds"
    assert analysis.instrument_verdict(["holds", "does not hold"]) == "depends on the model or method"
    assert analysis.instrument_verdict(["holds", "inconclusive"]) == "holds where resolved"
    assert analysis.instrument_verdict(["does not hold"] * 7 + ["inconclusive"]) == "does not hold where resolved"

    def t(verdicts):
        return pd.DataFrame([{"claim": "C3", "version": "first", "model": f"m{i}", "subject": "fp4", "statistic": "S",
                              "estimate": 0.1, "ci_low": 0.0, "ci_high": 0.2, "verdict": v, "direction": "d"}
                             for i, v in enumerate(verdicts)])  # fmt: skip

    rows, answers = analysis.synthesis({"a": t(["holds", "holds"]), "b": t(["holds"])})
    assert len(rows) == 3 and answers.answer[0] == "holds" and answers.statistics[0] == 3
    _, answers = analysis.synthesis({"a": t(["holds", "holds"]), "b": t(["does not hold"])})
    assert answers.answer[0] == "depends on the instrument"
    assert answers.b[0] == "does not hold"
    _, answers = analysis.synthesis({"a": t(["holds", "holds"]), "b": t(["holds", "inconclusive"])})
    assert answers.b[0] == "holds where resolved" and answers.answer[0] == "holds where resolved"
    assert analysis.instruments_answer(["holds", "inconclusive"]) == "holds where resolved"
    assert analysis.instruments_answer(["does not hold where resolved", "holds where resolved"]) == (
        "depends on the instrument"
    )
    assert analysis.instruments_answer(["holds", "depends on the model or method"]) == "depends on the instrument"
    # instruments agree on every model, the models differ: the answer names the models, not the instruments
    big = t(["does not hold", "does not hold", "holds"])  # m0, m1 and a model only this instrument covers
    _, answers = analysis.synthesis({"a": big, "b": t(["does not hold", "does not hold"])})
    assert answers.a[0] == "depends on the model or method" and answers.answer[0] == "depends on the model or method"
    _, answers = analysis.synthesis({"a": big, "b": t(["holds", "does not hold"])})  # they disagree on m0
    assert answers.answer[0] == "depends on the instrument"


def test_synthesis_lines_name_every_instrument():
    def t(verdict):
        return pd.DataFrame([{"claim": "C3", "version": "first", "model": "m", "subject": "fp4", "statistic": "S",
                              "estimate": 0.1, "ci_low": 0.0, "ci_high": 0.2, "verdict": verdict,
                              "direction": "loses more at low T"}])  # fmt: skip

    rows, answers = analysis.synthesis({"running text": t("does not hold"), "greedy loops": t("holds")})
    (line,) = analysis.synthesis_lines(answers, rows)
    assert "DEPENDS ON THE INSTRUMENT" in line
    assert "running text: does not hold (1 of 1 does not hold: loses more at low T)" in line
    assert "greedy loops: holds (1 of 1 holds: loses more at low T)" in line


def test_cloze_rows_read_c3_per_method():
    claims = pd.DataFrame([{"claim": c, "model": "m", "statistic": "x", "estimate": e, "ci_low": e - 0.1,
                            "ci_high": e + 0.1, "verdict": "holds"} for c, e in (("C1", 0.2), ("C2", -0.3))])  # fmt: skip
    index = pd.DataFrame([{"model": "m", "method": m, "index": e, "index_low": lo, "index_high": hi}
                          for m, e, lo, hi in (("nf4", 0.18, 0.08, 0.31), ("nf4-dq", 0.17, 0.07, 0.3),
                                               ("fp4", -0.08, -0.18, 0.01))])  # fmt: skip
    rows = analysis.cloze_rows(claims, index).set_index(["claim", "subject"])
    assert rows.verdict["C3", "nf4"] == "holds" and rows.verdict["C3", "fp4"] == "inconclusive"
    assert ("C3", "nf4-dq") not in rows.index  # a replicate, not separate evidence
    assert rows.direction["C2", "nf4 vs fp4"] == "fp4 falls behind nf4 more at high T"
    assert rows.version["C1", "nf4 vs fp4"] == "both"
