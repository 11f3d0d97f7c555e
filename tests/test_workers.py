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
    params["04_temperature_sensitivity"].update(text_store_dir=str(store), text_max_tokens_per_doc=24)
    path = tmp / f"{store.name}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _units(store: Path) -> dict[str, pd.DataFrame]:
    return {p.name: load_table(p)[0] for p in sorted((store / "running_text").glob("*.csv"))}


def test_two_processes_compute_every_unit_once_with_one_process_results(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two, one = tmp_path / "two", tmp_path / "one"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "helpers.workers",
        "--params",
        str(_params(tmp_path, two)),
        "--only",
        "04",
    ]
    out = subprocess.run(launch, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[process 0/2]" in out.stdout and "[process 1/2]" in out.stdout
    solo = [sys.executable, "-m", "helpers.workers", "--params", str(_params(tmp_path, one)), "--only", "04"]
    out = subprocess.run(solo, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    shared, alone = _units(two), _units(one)
    assert len(shared) == 2 and shared.keys() == alone.keys()  # nf4 and fp4, stored once each (same keys)
    writers = {
        json.loads((two / "running_text" / n).with_suffix(".provenance.json").read_text())["unit_key"]["method"]
        for n in shared
    }
    assert writers == {"nf4", "fp4"}
    for name in shared:
        pd.testing.assert_frame_equal(shared[name], alone[name])
