"""Smoke tests: one per notebook, each executing its notebook with ``params/smoke.yaml`` (tiny
settings, the embedded SmolLM2 only) through :func:`helpers.runner.run`, then checking a few of
the numbers it recorded. Outputs go to ``build/smoke``, never over the committed results.

Select one notebook with ``-k``, e.g. ``pytest tests/test_smoke.py -k 04``. Notebooks that read
other notebooks' smoke tables (04 reads 01, 02 and 03; 06 reads 01 and 02; the links are the
``build/smoke/...`` paths in their section of ``params/smoke.yaml``) first run those upstream
notebooks, unless this pytest run already ran them or ``build/smoke`` holds their outputs
made from the current notebook sources. Delete ``build/smoke`` to start from nothing.

To cover a new notebook, add a section to ``params/smoke.yaml`` (if it needs one) and a
function decorated with ``@checks("NN_name")`` below. A notebook without checks still gets a
smoke test: it must run without error and write provenance for every table.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import REPO_ROOT, runner
from helpers.provenance import load_table, sidecar

PARAMS_FILE = REPO_ROOT / "params" / "smoke.yaml"
PARAMS = runner.load_params(PARAMS_FILE)
NOTEBOOKS = runner.numbered_notebooks()
SMOKE = REPO_ROOT / "build" / "smoke"


def _from_notebooks_dir(path: str) -> Path:
    """Notebooks run in notebooks/, so relative paths in the parameters start there."""
    return (runner.NOTEBOOKS_DIR / path).resolve()


EXECUTED = REPO_ROOT / PARAMS["runner"]["executed_dir"]
DATA = _from_notebooks_dir(PARAMS["all"]["data_dir"])
FIGURES = _from_notebooks_dir(PARAMS["all"]["figures_dir"])


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def upstream(nb: Path) -> list[Path]:
    """Notebooks whose smoke outputs ``nb`` reads: those named (``NN_...``) by a path in its section."""
    by_prefix = {p.stem[:2]: p for p in NOTEBOOKS}
    found = []
    for value in PARAMS.get(nb.stem, {}).values():
        for s in _strings(value):
            m = re.match(r"(\d{2})_", Path(s).name)
            if m and "/" in s and m.group(1) in by_prefix and by_prefix[m.group(1)] != nb:
                found.append(by_prefix[m.group(1)])
    return sorted(set(found))


def errors_in(executed: Path) -> list[str]:
    cells = json.loads(executed.read_text())["cells"]
    return [
        f"{o.get('ename')}: {o.get('evalue')}"
        for c in cells
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]


def has_fresh_outputs(nb: Path) -> bool:
    """An executed copy made by the runner with the smoke parameters from the current source."""
    executed = EXECUTED / nb.name
    if not executed.exists():
        return False
    stamp = json.loads(executed.read_text())["metadata"].get("compendium", {})
    return (
        stamp.get("source_sha256") == runner.source_hash(nb)
        and stamp.get("params_file", "").endswith(PARAMS_FILE.name)
        and not errors_in(executed)
    )


def clear_outputs(nb: Path) -> None:
    """Remove what an earlier smoke run of ``nb`` left (tables, figures, executed copy, its stores)."""
    doomed = [EXECUTED / nb.name, *DATA.glob(f"{nb.stem}_*"), *FIGURES.glob(f"{nb.stem}_*"), *SMOKE.glob(f"{nb.stem}*")]
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


class SmokeRuns:
    """Which notebooks this pytest run executed, and whether they ran through (shared by all tests)."""

    def __init__(self) -> None:
        self.ok: dict[str, bool] = {}

    def execute(self, nb: Path) -> None:
        if nb.stem in self.ok:
            if not self.ok[nb.stem]:
                pytest.fail(f"{nb.name} already failed in this pytest run")
            return
        clear_outputs(nb)
        ran = False
        try:
            runner.run(PARAMS_FILE, only=[nb.stem])
            ran = True
        except SystemExit:
            pytest.fail(
                f"{nb.name} failed with params/smoke.yaml (the runner's message names the cell); "
                f"executed copy with the traceback: {EXECUTED / nb.name}"
            )
        finally:
            self.ok[nb.stem] = ran

    def ensure_upstream(self, nb: Path) -> None:
        for up in upstream(nb):
            self.ensure_upstream(up)
            if self.ok.get(up.stem) is False:
                pytest.skip(f"{nb.name} reads the smoke outputs of {up.name}, which failed in this pytest run")
            if up.stem not in self.ok and not has_fresh_outputs(up):
                self.execute(up)


@pytest.fixture(scope="session")
def smoke_runs() -> SmokeRuns:
    return SmokeRuns()


def table(name: str) -> tuple[pd.DataFrame, dict]:
    return load_table(DATA / name)


CHECKS: dict[str, Callable[[], None]] = {}


def checks(stem: str):
    """Register the checks of one notebook's smoke outputs."""

    def register(fn):
        CHECKS[stem] = fn
        return fn

    return register


@pytest.mark.smoke
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_smoke(nb: Path, smoke_runs: SmokeRuns):
    smoke_runs.ensure_upstream(nb)
    smoke_runs.execute(nb)
    executed = EXECUTED / nb.name
    assert not errors_in(executed)
    assert has_fresh_outputs(nb), f"{executed} is not stamped by the runner with {nb.name}'s current source"
    tables = sorted(p for p in DATA.glob(f"{nb.stem}_*.csv*") if not p.name.endswith(".tmp"))
    assert tables, f"{nb.name} wrote no table to {DATA}"
    for path in tables:
        meta = json.loads(sidecar(path).read_text())
        assert meta["notebook"] == nb.stem, f"{sidecar(path).name} names notebook {meta['notebook']}"
    if nb.stem in CHECKS:
        CHECKS[nb.stem]()


# ---------------------------------------------------------------------------------------------
# What each notebook must have written. Bounds are wide enough for any CPU or GPU, and narrow
# enough that a broken computation (a method not applied, a wrong scale, a lost row) crosses them.


@checks("00_class_path")
def _check_00():
    toy, _ = table("00_class_path_toy_int8.csv")
    assert toy.columns_in_full_precision.tolist() == [0, 1]  # the one outlier column, kept by LLM.int8() only
    assert toy.max_abs_error.iloc[1] < toy.max_abs_error.iloc[0] / 3
    tv, _ = table("00_class_path_tv_vs_temperature.csv")
    assert set(tv.method) == {"int8", "nf4", "fp4"}  # the notebook's methods, fp32 being the reference
    assert tv.mean_tv.between(0, 1).all()
    greedy = tv[tv.temperature == 0]  # at T = 0 the TV is 1 where the greedy tokens differ, 0 where they agree
    assert (greedy.mean_tv - (1 - greedy.top1_agree)).abs().max() < 1e-6


@checks("01_load_and_quantize")
def _check_01():
    own = PARAMS["01_load_and_quantize"]
    assert len(list(FIGURES.glob("01_load_and_quantize_*.png"))) >= 5
    methods, meta = table("01_load_and_quantize_methods.csv")
    assert meta["parameters"]["max_eval_tokens"] == own["max_eval_tokens"]  # the runner's values reached the notebook
    assert set(methods.method) == set(own["methods"])
    for model, m in methods.groupby("model"):
        by = m.set_index("method")
        # measured bits: nominal 4.5 / 4.127 plus the per-layer codebooks (test_quantization has the exact count)
        assert 4.5 <= by.loc["nf4", "bits_per_quantized_param"] < 4.53
        assert 4.127 <= by.loc["nf4-dq", "bits_per_quantized_param"] < 4.157
        assert 8.0 <= by.loc["int8", "bits_per_quantized_param"] < 8.1  # + one fp32 scale per output row
        assert by.loc["nf4", "total_MiB"] < by.loc["int8", "total_MiB"] < by.loc["fp32", "total_MiB"]
        # double quantization shrinks the 4-bit state about 3.5x; get_memory_footprint() leaves the state out
        assert by.loc["nf4-dq", "quant_state_MiB"] < by.loc["nf4", "quant_state_MiB"] / 2
        assert by.loc["nf4", "hf_footprint_MiB"] < by.loc["nf4", "total_MiB"]
        # SmolLM2 on 64 held-out tokens: fp32 perplexity about 80, int8 and nf4 within 10% of it
        assert 10 < by.loc["fp32", "perplexity"] < 300
        ratio = (by.perplexity / by.loc["fp32", "perplexity"]).dropna()  # NaN: fp16 overflow (Gemma-3)
        assert ratio.between(1 / 1.5, 2.0).all(), (model, ratio.to_dict())
    roundtrip, _ = table("01_load_and_quantize_roundtrip.csv")
    for model, r in roundtrip.groupby("model"):
        err = r.set_index("method").rel_frobenius_error
        # one real weight matrix: int8 about 0.01, nf4 about 0.09, fp4 about 0.13 (relative Frobenius error)
        assert err["int8"] < 0.02 and 0.05 < err["nf4"] < err["fp4"] < 0.2, (model, err.to_dict())
    continuations, _ = table("01_load_and_quantize_continuations.csv")
    fp32 = continuations[continuations.method == "fp32"].continuation
    assert len(fp32) and fp32.str.strip().astype(bool).all()


@checks("02_sampling_sweep")
def _check_02():
    exact, meta = table("02_sampling_sweep_next_token.csv.gz")
    p = meta["parameters"]
    n_prompts = len(pd.read_csv(REPO_ROOT / "data" / "prompts.csv"))
    grid = len(p["exact_temperatures"]) * len(p["exact_top_ks"])
    assert len(exact) == len(p["models"]) * len(p["methods"]) * n_prompts * grid
    eps = 1e-6  # float32 rounding
    assert exact.tv.between(-eps, 1 + eps).all() and exact.p_answer.dropna().between(-eps, 1 + eps).all()
    ref = exact[exact.method == p["reference"]]
    assert (ref.tv.abs() < 1e-6).all() and (ref.top1_agree == 1).all()
    # greedy (T = 0): every distribution is one-hot, so TV is 1 exactly where the top-1 token differs
    greedy = exact[exact.temperature == 0]
    assert np.allclose(greedy.tv, 1 - greedy.top1_agree)
    assert greedy.p_answer.dropna().isin([0.0, 1.0]).all()
    # the fp32 model answers most cloze prompts greedily (0.66 of 62 on SmolLM2)
    cloze = greedy[(greedy.kind == "cloze") & (greedy.top_k == 0)]
    assert cloze[cloze.method == p["reference"]].p_answer.mean() > 0.4
    # 4-bit moves the next-token distribution measurably but not beyond recognition (TV 0.3-0.4 at T = 1)
    at_1 = exact[(exact.temperature == 1.0) & (exact.top_k == 0)].groupby(["model", "method"]).tv.mean()
    for (model, method), tv in at_1.items():
        if method in ("nf4", "fp4"):
            assert 0.05 < tv < 0.8, (model, method, tv)
    gen, _ = table("02_sampling_sweep_generations.csv.gz")
    assert (gen[gen.method == p["reference"]].agree_tokens == 1).all()
    assert set(gen.method) == set(p["gen_methods"] or p["methods"])
    batched, _ = table("02_sampling_sweep_batched_vs_loop.csv")
    # batched sampling draws the per-sample loop's tokens; a sequence may part where a uniform number falls
    # within rounding of a token boundary (batched logits differ by ~1e-5), a broken stream parts them all
    assert (batched.identical_sequences > 0.5).all()


@checks("03_speed_and_memory")
def _check_03():
    summary, meta = table("03_speed_and_memory_summary.csv")  # tables of the device it ran on
    kind = meta["hardware_class"]
    p = meta["parameters"]
    assert len(summary) == len(p["models"]) * len(p["methods"]) * len(p["batch_sizes"])
    assert (summary.decode_tokens_per_s > 0).all()
    assert (
        (summary.decode_min <= summary.decode_tokens_per_s) & (summary.decode_tokens_per_s <= summary.decode_max)
    ).all()
    for model, s in summary[summary.batch == 1].groupby("model"):
        b1 = s.set_index("method")
        # batch 1 reads every weight once per token: no method decodes faster than bandwidth / bytes per token
        share = b1.decode_tokens_per_s / b1.roofline_tokens_per_s
        assert (share < 1).all(), (model, share.to_dict())
        # the quantization state is counted; per token 4-bit reads less than int8, int8 less than fp32,
        # and bf16 holds half of fp32's bytes
        assert b1.loc["nf4", "quant_state_MiB"] > 0 and b1.loc["fp32", "quant_state_MiB"] == 0
        assert b1.loc["nf4", "bytes_per_token"] < b1.loc["int8", "bytes_per_token"] < b1.loc["fp32", "bytes_per_token"]
        assert b1.loc["fp32", "weights_MiB"] == pytest.approx(2 * b1.loc["bf16", "weights_MiB"], rel=0.01)
    harness, _ = table(f"03_speed_and_memory_{kind}_harness.csv")
    assert len(harness) == p["harness_repeats"] and (harness[["bare_s", "harness_s"]] > 0).all().all()
    claims, _ = table(f"03_speed_and_memory_{kind}_claims.csv")
    assert len(claims) == 2 * len(p["batch_sizes"]) * len(p["models"])  # C4 and C5 per model and batch
    assert set(claims.verdict) <= {"holds", "does not hold", "inconclusive"}


@checks("04_temperature_sensitivity")
def _check_04():
    claims, _ = table("04_temperature_sensitivity_claims.csv")
    assert set(claims.claim) == {"C1", "C2", "C3"}
    assert set(claims.verdict) <= {"holds", "does not hold", "inconclusive"}
    assert (claims.ci_low <= claims.ci_high).all()
    # C1 lists notebook 03's decode speeds: the smoke speed table was found
    assert claims[claims.claim == "C1"].numbers.str.contains("decode tok/s").all()
    quality, _ = table("04_temperature_sensitivity_quality_vs_temperature.csv")
    fp32 = quality[(quality.metric == "expected_accuracy") & (quality.method == "fp32")]
    for model, q in fp32.groupby("model"):
        acc = q.set_index("temperature")["mean"].sort_index()
        # sampling hotter spreads probability away from the answer (SmolLM2: 0.66 greedy, 0.17 at T = 1.5)
        assert acc.iloc[0] > acc.iloc[-1] + 0.1, (model, acc.to_dict())
    degradation, _ = table("04_temperature_sensitivity_degradation.csv")
    assert np.isfinite(degradation["mean"]).all() and (degradation["mean"] <= 1).all()  # R = 1 - Q/Q_ref <= 1
    index, _ = table("04_temperature_sensitivity_sensitivity_index.csv")
    assert np.allclose(index["index"], index.R_low_band - index.R_high_band)
    # running text: every method's block sums cover the same positions as the reference's
    blocks, meta = table("04_temperature_sensitivity_text_blocks.csv.gz")
    nominal = blocks[(blocks.view == "nominal") & (blocks.top_k == 0)]
    n = nominal.groupby(["model", "method", "temperature"]).n.sum()
    assert n.nunique() == 1 and n.iloc[0] >= 3 * meta["parameters"]["text_block"]
    assert (nominal.p_true <= nominal.n + 1e-6).all() and (nominal.kl[nominal.temperature > 0] >= 0).all()
    fits, _ = table("04_temperature_sensitivity_text_fits.csv")
    assert fits.kl_method_ref.between(0.5, 2).all() and fits.best_T.between(0.3, 3).all()
    # the temperature control: every definition returns its c, and matching removes it entirely
    eff, _ = table("04_temperature_sensitivity_text_effective_temperature.csv")
    temp = eff[eff.method == "ctrl-temp"].set_index(["model", "quantity"]).estimate
    c = meta["parameters"]["control_temperature"]
    for model in set(eff.model):
        assert [temp[model, d] for d in ("kl_method_ref", "kl_ref_method", "logloss")] == pytest.approx(
            [c] * 3, rel=0.01
        )
    curves, _ = table("04_temperature_sensitivity_text_curves.csv")
    assert set(curves.view) == {"nominal", "matched:kl_method_ref", "matched:kl_ref_method", "matched:logloss"}
    assert (curves.R <= 1).all()
    matched_temp = curves[(curves.method == "ctrl-temp") & (curves.view != "nominal")]
    assert matched_temp.R.abs().max() < 1e-3
    text_claims, _ = table("04_temperature_sensitivity_text_claims.csv")
    assert set(text_claims.claim) == {"C1", "C2", "C3"} and set(text_claims.version) == {"first", "later", "both"}
    assert (text_claims.ci_low <= text_claims.ci_high).all()
    # generations judged by the other family's fp32 (and by themselves), and one answer per claim
    judged, meta = table("04_temperature_sensitivity_generations_judged.csv.gz")
    assert set(judged.view) == {"self", "independent"} and "ctrl-repeat" in set(judged.method)
    assert (judged.bits >= 0).all() and (judged.novel_bytes <= judged.bytes).all()
    assert len(judged[judged.view == "independent"]) == len(judged[judged.view == "self"])
    answers, _ = table("04_temperature_sensitivity_synthesis_answers.csv")
    assert {"C1", "C3"} <= set(answers.claim) and "running text" in answers.columns


@checks("05_outlier_features")
def _check_05():
    sweep, _ = table("05_outlier_features_threshold_sweep.csv")
    for model, s in sweep.groupby("model"):
        by = s.set_index("threshold")
        # a threshold above every activation decomposes nothing: the same model as threshold 0
        assert by.loc[1e6, "perplexity"] == pytest.approx(by.loc[0.0, "perplexity"], rel=1e-4)
        assert by.loc[1e6, "cols_16bit_share"] == 0
        # SmolLM2 has a few activations far above 6 (up to about 3000): some columns, but few, go to 16 bit
        assert 0 < by.loc[6.0, "cols_16bit_share"] < 0.2, model
        assert (by.perplexity / by.fp32_perplexity).between(1 / 1.5, 1.5).all()


@checks("06_bits_vs_quality")
def _check_06():
    bits, meta = table("06_bits_vs_quality_bits.csv")
    for _model, m in bits.groupby("model"):
        b = m.set_index("method")
        assert b.loc["nf4", "bits_deployed"] < b.loc["int8", "bits_deployed"] < b.loc["fp32", "bits_deployed"]
        assert b.loc["fp32", "bits_as_measured"] == pytest.approx(32 * b.loc["fp32", "params"], rel=1e-3)
    assert bits.bits_per_byte.dropna().between(0.5, 2.5).all()  # SmolLM2: about 1.3 on 64 tokens
    verdict, _ = table("06_bits_vs_quality_verdict.csv")
    if len(meta["parameters"]["models"]) == 1:
        assert verdict.verdict.iloc[0].startswith("cannot be tested")
    confound, _ = table("06_bits_vs_quality_gguf_confound.csv")
    assert set(confound.weights) == {"GGUF grid", "off grid"}
    for model, c in confound[confound.method == "none"].groupby("model"):
        none = c.set_index("weights").perplexity
        assert none["off grid"] != pytest.approx(none["GGUF grid"], rel=1e-4), model  # the noise moved the weights
    nf4 = confound[confound.method == "nf4"].weight_rel_error
    assert nf4.between(0.05, 0.15).all(), nf4.to_list()
