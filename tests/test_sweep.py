"""The sweep orchestration on a tiny grid with the real SmolLM2 model."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import REPO_ROOT, sweep

PROMPTS = str(REPO_ROOT / "data" / "prompts.csv")


def test_prompts_file_meets_the_study_design():
    df = sweep.read_prompts(PROMPTS)
    assert len(df) >= 100 and (df.kind == "cloze").sum() >= 50
    assert df.category.nunique() >= 10


def test_bad_prompt_files_are_rejected(tmp_path):
    bad = tmp_path / "p.csv"
    bad.write_text("id,kind,category,prompt,answer\na,cloze,x,The sky is,\n")
    with pytest.raises(ValueError, match="without an answer"):
        sweep.read_prompts(bad)
    bad.write_text("id,kind,prompt\na,open,Hi\n")
    with pytest.raises(ValueError, match="missing column"):
        sweep.read_prompts(bad)
    with pytest.raises(FileNotFoundError):
        sweep.read_prompts(tmp_path / "none.csv")


@pytest.mark.parametrize(
    "change,pattern",
    [
        ({"methods": ["nf4"]}, "reference method"),
        ({"methods": ["fp32", "nf5"]}, "unknown method"),
        ({"exact_temperatures": [-1.0]}, "temperature"),
        ({"gen_top_ks": [-2]}, "top_k"),
        ({"max_new_tokens": [0]}, "max_new_tokens"),
        ({"n_seeds": 0}, "n_seeds"),
        ({"device": "gpu"}, "device"),
    ],
)
def test_bad_configs_fail_before_any_model_is_loaded(change, pattern):
    cfg = sweep.SweepConfig(models=["smollm2-135m"], methods=["fp32", "nf4"], prompts_file=PROMPTS)
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ValueError, match=pattern):
        cfg.validate()


@pytest.mark.models
def test_last_token_logits_do_not_depend_on_the_batch(loaded):
    model, tok = loaded("fp32")
    prompts = ["The capital of France is", "Once upon a", "1, 2, 3, 4,"]
    batched = sweep.last_token_logits(model, tok, prompts, batch_size=3)
    single = torch.cat([sweep.last_token_logits(model, tok, [p]) for p in prompts])
    assert torch.allclose(batched, single, atol=1e-4)
    assert tok.decode(batched[0].argmax()).strip() == "Paris"


@pytest.mark.models
def test_tiny_sweep_runs_stores_and_resumes(tmp_path, smol_path):
    cfg = sweep.SweepConfig(
        models=["smollm2-135m"],
        methods=["fp32", "nf4"],
        prompts_file=PROMPTS,
        exact_temperatures=[0.0, 0.7, 1.5],
        exact_top_ks=[0, 5],
        gen_prompts_per_kind=2,
        gen_temperatures=[0.0, 1.0],
        gen_top_ks=[0],
        max_new_tokens=[1, 4],
        n_seeds=2,
    )
    run = sweep.Sweep(cfg, tmp_path)
    assert len(run.pending()) == 2 * (1 + 2)
    run.run()
    assert run.pending() == []
    exact = run.exact_store.read()
    assert len(exact) == 2 * 112 * 3 * 2
    ref = exact[exact.method == "fp32"]
    assert (ref.tv.abs() < 1e-6).all() and ref.top1_agree.all()
    nf4 = exact[(exact.method == "nf4") & (exact.temperature == 0.7) & (exact.top_k == 0)]
    assert 0 < nf4.tv.mean() < 0.5
    gen = run.gen_store.read()
    # greedy: one sample per prompt; T=1: n_seeds samples; rows per prefix length
    assert len(gen[(gen.temperature == 0.0)]) == 2 * 4 * 1 * 2
    assert len(gen[(gen.temperature == 1.0)]) == 2 * 4 * 2 * 2
    assert (gen[gen.method == "fp32"].agree_tokens == 1).all()
    assert gen[gen.method == "nf4"].agree_tokens.between(0, 1).all()  # looked up from the reference unit
    assert gen.ref_nll.notna().any() and gen.first_word_correct.dropna().isin([0, 1]).all()
    assert gen.finite.all() and exact.finite.all()
    mine = run.collect()
    assert len(mine[0]) == len(exact) and len(mine[1]) == len(gen)
    # timings are read back from the stored units: one per unit, with positive durations
    timings = run.timings()
    assert sorted(timings.unit.value_counts().items()) == [("exact", 2), ("gen", 4)]
    assert (timings.forward_s.dropna() > 0).all() and (timings.generate_s.dropna() > 0).all()
    # a second Sweep over the same folder finds nothing to do
    assert sweep.Sweep(cfg, tmp_path).pending() == []


@pytest.mark.parametrize(
    "gen_methods,pattern",
    [
        (["nf4"], "reference method 'fp32' must be in gen_methods"),
        (["fp32", "nf5"], "unknown method"),
        (["fp32", "fp4"], r"gen_methods \['fp4'\] are not in methods"),
        ([], "empty"),
    ],
)
def test_gen_methods_are_checked_before_any_model_is_loaded(gen_methods, pattern, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sweep.registry, "load", no_loading)
    cfg = sweep.SweepConfig(
        models=["smollm2-135m"], methods=["fp32", "nf4"], gen_methods=gen_methods, prompts_file=PROMPTS
    )
    with pytest.raises(ValueError, match=pattern):
        sweep.Sweep(cfg, tmp_path)


def test_gen_methods_default_to_methods_and_only_they_generate(tmp_path):
    cfg = sweep.SweepConfig(
        models=["smollm2-135m"],
        methods=["nf4", "fp32", "fp4"],
        prompts_file=PROMPTS,
        gen_temperatures=[0.0, 1.0],
        gen_top_ks=[0],
    )
    assert cfg.ordered_gen_methods == ["fp32", "nf4", "fp4"]
    cfg.gen_methods = ["fp4", "fp32"]
    assert cfg.ordered_gen_methods == ["fp32", "fp4"]
    units = sweep.Sweep(cfg, tmp_path).units()
    assert [u.method for u in units if u.kind == "exact"] == ["fp32", "nf4", "fp4"]
    assert [(u.method, u.temperature) for u in units if u.kind == "gen"] == [
        ("fp32", 0.0),
        ("fp32", 1.0),
        ("fp4", 0.0),
        ("fp4", 1.0),
    ]


def _decode(ids, skip_special_tokens=True):
    return " ".join(f"w{t}" for t in ids)


def test_generation_scores_on_hand_made_tokens():
    eos = {0}
    tokens = [5, 6] + [7] * 10  # falls into a one-token loop after two tokens
    ref = [5, 6, 7, 8, 0, 3, 3, 3, 3, 3, 3, 3]  # the reference's text: 4 tokens, then it ended
    nll = torch.arange(1.0, 13.0)
    rows = {r["max_new_tokens"]: r for r in sweep.score_generation(tokens, nll, ref, [2, 4, 12], eos, _decode, "w5")}
    assert rows[2]["ref_nll"] == 1.5 and rows[2]["first_word_correct"] == 1.0
    assert (rows[2]["diverge_at"], rows[2]["agree_tokens"], rows[2]["agree_prefix"]) == (2, 1.0, 1.0)
    assert (rows[2]["loop_tokens"], rows[2]["in_loop"]) == (0, 0.0)
    assert (rows[4]["diverge_at"], rows[4]["agree_tokens"], rows[4]["agree_prefix"]) == (3, 0.75, 0.75)
    assert (rows[4]["loop_tokens"], rows[4]["in_loop"]) == (2, 0.0)
    # 12 tokens: ten 7s loop; the reference ended after 4 tokens, so only the first 3 agree
    assert (rows[12]["loop_tokens"], rows[12]["in_loop"], rows[12]["n_tokens"]) == (10, 1.0, 12)
    assert (rows[12]["diverge_at"], rows[12]["agree_tokens"]) == (3, 0.25)
    assert rows[12]["text"].startswith("w5 w6 w7") and rows[4]["text"] == ""
    assert rows[12]["tokens"] == " ".join(map(str, tokens))
    # two texts that end at the same token agree to the end, whatever follows the end
    same_end = sweep.score_generation([5, 6, 7, 0, 9, 9], nll, [5, 6, 7, 0, 1, 2], [6], eos, _decode)[0]
    assert (same_end["diverge_at"], same_end["agree_tokens"], same_end["n_tokens"]) == (6, 1.0, 3)
    assert same_end["ref_nll"] == 2.0 and math.isnan(same_end["first_word_correct"])  # open prompt: no answer
    # no reference generation: NaN; overflowed logits: scores NaN, tokens kept
    alone = sweep.score_generation(tokens, nll, None, [4], eos, _decode)[0]
    assert math.isnan(alone["diverge_at"]) and math.isnan(alone["agree_tokens"])
    flagged = sweep.score_generation(tokens, nll, ref, [4], eos, _decode, "w5", finite=False)[0]
    assert all(math.isnan(flagged[c]) for c in sweep.GENERATION_SCORES) and flagged["tokens"] == "5 6 7 7"


@pytest.mark.models
def test_generation_units_of_a_method_are_decoded_together(tmp_path, smol_path):
    cfg = sweep.SweepConfig(
        models=["smollm2-135m"],
        methods=["fp32", "nf4"],
        prompts_file=PROMPTS,
        exact_temperatures=[0.0, 1.0],
        exact_top_ks=[0],
        gen_prompts_per_kind=1,
        gen_temperatures=[0.0, 0.8],
        gen_top_ks=[0, 5],
        max_new_tokens=[2, 6],
        n_seeds=2,
        batch_size=64,
    )
    run = sweep.Sweep(cfg, tmp_path)
    assert len(run.pending()) == 2 + 2 * 4
    run.run()
    _, gen = run.collect()
    assert set(gen.method) == {"fp32", "nf4"}
    assert len(gen) == 2 * 2 * (2 * 1 + 2 * 2) * 2  # methods x top-k x (greedy + sampled sequences) x prefixes
    ref = gen[gen.method == "fp32"]
    assert (ref.diverge_at == ref.max_new_tokens).all() and (ref.agree_prefix == 1).all()
    nf4 = gen[gen.method == "nf4"]
    assert nf4.diverge_at.between(0, nf4.max_new_tokens).all() and nf4.in_loop.isin([0, 1]).all()
    assert (nf4.loop_tokens <= nf4.n_tokens).all()
    # greedy decoding ignores top-k: the two greedy units hold the same generations
    greedy = gen[gen.temperature == 0].pivot_table(
        index=["method", "prompt_id", "max_new_tokens"], columns="top_k", values="tokens", aggfunc="first"
    )
    assert (greedy[0] == greedy[5]).all()
    timings = run.timings()
    gen_t = timings[timings.unit == "gen"]
    # greedy units decode one sequence at a time (what one user gets), sampled units together
    greedy_t, sampled_t = gen_t[gen_t.temperature == 0], gen_t[gen_t.temperature > 0]
    assert (greedy_t.group_units == 2).all() and (greedy_t.group_sequences == 2).all()
    assert (greedy_t.batch_size == 1).all() and (gen[gen.temperature == 0].batch == 1).all()
    assert (sampled_t.group_units == 2).all() and (sampled_t.group_sequences == 2 * 2 * 2).all()
    assert (sampled_t.batch_size == 64).all() and (gen[gen.temperature > 0].batch == 64).all()
    assert gen_t.groupby("method").generate_s.sum().gt(0).all()
    # the reference's generations bring their own NLL: no reference pass for fp32
    assert (gen_t[gen_t.method == "fp32"].reference_s == 0).all() and (
        gen_t[gen_t.method == "nf4"].reference_s > 0
    ).all()


@pytest.mark.models
def test_single_user_logits_are_the_batch_1_logits(loaded):
    """The exact analysis and the explorer compute one prompt per pass: for int8, whose outputs
    depend on the batch, that equals each prompt alone exactly; a padded batch need not."""
    from helpers.sweep import last_token_logits

    model, tok = loaded("int8")
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived a", "2 + 2 ="]
    got = last_token_logits(model, tok, prompts)
    with torch.inference_mode():
        alone = [model(**tok(p, return_tensors="pt"), logits_to_keep=1).logits[0, -1].float() for p in prompts]
    alone = torch.stack(alone)
    assert torch.equal(got, alone)
    batched = last_token_logits(model, tok, prompts, batch_size=len(prompts))
    if torch.equal(batched, alone):
        pytest.skip("int8 does not depend on the batch on this CPU: nothing for the batched path to get wrong")
    assert (batched - alone).abs().max() > 1e-3
