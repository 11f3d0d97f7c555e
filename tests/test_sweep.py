"""The sweep orchestration on a tiny grid with the real SmolLM2 model."""

from __future__ import annotations

import pandas as pd
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


@pytest.mark.parametrize("change,pattern", [
    ({"methods": ["nf4"]}, "reference method"),
    ({"methods": ["fp32", "nf5"]}, "unknown method"),
    ({"exact_temperatures": [-1.0]}, "temperature"),
    ({"gen_top_ks": [-2]}, "top_k"),
    ({"max_new_tokens": [0]}, "max_new_tokens"),
    ({"n_seeds": 0}, "n_seeds"),
    ({"device": "gpu"}, "device"),
])
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
    cfg = sweep.SweepConfig(models=["smollm2-135m"], methods=["fp32", "nf4"], prompts_file=PROMPTS,
                            exact_temperatures=[0.0, 0.7, 1.5], exact_top_ks=[0, 5], gen_prompts_per_kind=2,
                            gen_temperatures=[0.0, 1.0], gen_top_ks=[0], max_new_tokens=[1, 4], n_seeds=2)
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
