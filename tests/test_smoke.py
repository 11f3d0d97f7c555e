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
