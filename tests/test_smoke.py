"""Smoke run: every notebook end to end with params/smoke.yaml (tiny settings), then sanity
checks on what it wrote. Outputs go to build/smoke, never over the committed results."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from helpers import REPO_ROOT, runner
from helpers.provenance import load_table

SMOKE = REPO_ROOT / "build" / "smoke"


@pytest.fixture(scope="module")
def smoke_run():
    shutil.rmtree(SMOKE, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "helpers.runner", "--params", "params/smoke.yaml"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.smoke
def test_every_notebook_ran(smoke_run):
    executed = sorted(p.name for p in (SMOKE / "executed").glob("*.ipynb"))
    assert executed == [p.name for p in runner.numbered_notebooks()]
    for nb in (SMOKE / "executed").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors


@pytest.mark.smoke
def test_smoke_outputs_have_provenance_and_sane_numbers(smoke_run):
    figures = list((SMOKE / "figures").glob("01_load_and_quantize_*.png"))
    assert len(figures) >= 5
    table, meta = load_table(SMOKE / "data" / "01_load_and_quantize_methods.csv")
    assert meta["parameters"]["max_eval_tokens"] == 64
    assert set(table.method) == {"fp32", "int8", "nf4", "nf4-dq"}
    by = table.set_index("method")
    # nominal 4.5 and 4.127, plus per-layer codebooks (see test_quantization for the exact count)
    assert 4.5 <= by.loc["nf4", "bits_per_quantized_param"] < 4.53
    assert 4.127 <= by.loc["nf4-dq", "bits_per_quantized_param"] < 4.157
    assert by.loc["nf4", "total_MiB"] < by.loc["int8", "total_MiB"] < by.loc["fp32", "total_MiB"]
    assert table.perplexity.between(1, 1000).all()


@pytest.mark.smoke
def test_smoke_sweep_and_sensitivity_tables(smoke_run):
    exact, meta = load_table(SMOKE / "data" / "02_sampling_sweep_next_token.csv.gz")
    temps, ks = meta["parameters"]["exact_temperatures"], meta["parameters"]["exact_top_ks"]
    assert len(exact) == 3 * 112 * len(temps) * len(ks)  # 3 methods x prompts x grid
    ref = exact[exact.method == "fp32"]
    assert (ref.tv.abs() < 1e-6).all() and (ref.top1_agree == 1).all()
    gen, _ = load_table(SMOKE / "data" / "02_sampling_sweep_generations.csv.gz")
    assert (gen[gen.method == "fp32"].agree_tokens == 1).all()
    claims, _ = load_table(SMOKE / "data" / "04_temperature_sensitivity_claims.csv")
    assert set(claims.claim) == {"C1", "C2", "C3"}
    assert set(claims.verdict) <= {"holds", "does not hold", "inconclusive"}


@pytest.mark.smoke
def test_smoke_speed_memory_tables(smoke_run):
    summary, meta = load_table(SMOKE / "data" / "03_speed_and_memory_cpu_summary.csv")
    p = meta["parameters"]
    assert len(summary) == len(p["methods"]) * len(p["batch_sizes"])
    assert (summary.decode_tokens_per_s > 0).all() and (summary.decode_min <= summary.decode_max).all()
    by = summary[summary.batch == 1].set_index("method")
    # the quantization state is counted; 4-bit reads fewer bytes per token than fp32
    assert by.loc["nf4", "quant_state_MiB"] > 0 and by.loc["fp32", "quant_state_MiB"] == 0
    assert by.loc["nf4", "bytes_per_token"] < by.loc["bf16", "bytes_per_token"] < by.loc["fp32", "bytes_per_token"]
    harness, _ = load_table(SMOKE / "data" / "03_speed_and_memory_cpu_harness.csv")
    assert len(harness) == p["harness_repeats"] and (harness[["bare_s", "harness_s"]] > 0).all().all()


@pytest.mark.smoke
def test_smoke_outliers_and_bits(smoke_run):
    sweep, _ = load_table(SMOKE / "data" / "05_outlier_features_threshold_sweep.csv")
    by = sweep.set_index("threshold")
    # a threshold above every activation decomposes nothing: the same model as threshold 0
    assert by.loc[1e6, "perplexity"] == pytest.approx(by.loc[0.0, "perplexity"], rel=1e-4)
    assert by.loc[0.0, "cols_16bit_share"] == 0 and by.loc[6.0, "cols_16bit_share"] >= 0
    bits, _ = load_table(SMOKE / "data" / "06_bits_vs_quality_bits.csv")
    b = bits.set_index("method")
    assert b.loc["nf4", "bits_deployed"] < b.loc["int8", "bits_deployed"] < b.loc["fp32", "bits_deployed"]
    assert bits.bits_per_byte.between(0.3, 5).all()
    confound, _ = load_table(SMOKE / "data" / "06_bits_vs_quality_gguf_confound.csv")
    assert set(confound.weights) == {"GGUF grid", "off grid"}
    assert (confound[confound.method == "none"].weight_rel_error == 0).all()
