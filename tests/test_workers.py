"""Units spread over two processes started by `accelerate launch`: each unit once, same numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import REPO_ROOT
from helpers.provenance import load_table

pytestmark = pytest.mark.models


def _params(tmp: Path, store: Path) -> Path:
    params = yaml.safe_load((REPO_ROOT / "params" / "smoke.yaml").read_text())
    params["04_temperature_sensitivity"].update(text_store_dir=str(store / "04"), text_max_tokens_per_doc=24)
    params["02_sampling_sweep"].update(store_dir=str(store / "02"))
    path = tmp / f"{store.name}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _units(store: Path) -> dict[str, pd.DataFrame]:
    return {str(p.relative_to(store)): load_table(p)[0] for p in sorted(store.glob("*/*/*.csv"))}


def test_two_processes_compute_every_unit_once_with_one_process_results(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two, one = tmp_path / "two", tmp_path / "one"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["-m", "helpers.workers", "--params", str(_params(tmp_path, two)), "--only", "02", "04"]
    out = subprocess.run(launch, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("[process 0/2]") == 2 and out.stdout.count("[process 1/2]") == 2  # 02, then 04
    solo = [sys.executable, "-m", "helpers.workers", "--params", str(_params(tmp_path, one)), "--only", "02", "04"]
    out = subprocess.run(solo, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    shared, alone = _units(two), _units(one)
    assert shared.keys() == alone.keys()  # every unit stored, once (writing a stored unit again raises)
    assert any(n.startswith("02/next_token/") for n in shared) and any(n.startswith("02/generations/") for n in shared)
    text_methods = {
        json.loads((two / n).with_suffix(".provenance.json").read_text())["unit_key"]["method"]
        for n in shared
        if n.startswith("04/")
    }
    assert text_methods == {"nf4", "fp4", "ctrl-temp", "ctrl-noise"}
    for name in shared:
        if name.startswith("02/"):  # timings differ between runs; the measures must not
            a, b = shared[name], alone[name]
            pd.testing.assert_frame_equal(
                a.drop(columns=[c for c in a if c.endswith("_s")]), b.drop(columns=[c for c in b if c.endswith("_s")])
            )
        else:
            pd.testing.assert_frame_equal(shared[name], alone[name])
