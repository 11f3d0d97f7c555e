"""The results store: atomic units, resume after SIGKILL without loss, duplication or rework."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

from helpers import generation, measures, methods, sweep, textscore, timing
from helpers.store import ResultStore, code_closure, code_digest

SWEEP = textwrap.dedent("""
    import sys, time, pandas as pd
    from helpers.store import ResultStore
    store = ResultStore(sys.argv[1], ("method", "temperature"))
    for method in ("a", "b", "c"):
        for t in (0.0, 0.5, 1.0, 1.5):
            key = {"method": method, "temperature": t}
            if store.done(key):
                continue
            time.sleep(0.15)  # the work
            rows = pd.DataFrame({"sample": range(50), "value": [t * i for i in range(50)]})
            store.write(key, rows)
            print("wrote", method, t, flush=True)
""")


def test_write_read_and_refuse_overwrite(tmp_path):
    store = ResultStore(tmp_path, ("model", "T"))
    key = {"model": "m/x", "T": 0.7, "seeds": 5}
    assert not store.done(key) and store.read().empty
    store.write(key, pd.DataFrame({"v": [1, 2]}))
    assert store.done(key) and store.path(key).name.startswith("m-x__0.7__")
    assert store.read().to_dict("list") == {"v": [1, 2], "model": ["m/x"] * 2, "T": [0.7] * 2, "seeds": [5] * 2}
    with pytest.raises(FileExistsError):
        store.write(key, pd.DataFrame({"v": [3]}))
    # any setting in the key gives another unit
    assert store.path({**key, "seeds": 6}) != store.path(key)


def test_resume_after_sigkill(tmp_path):
    folder = tmp_path / "units"
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    written = 0
    while written < 4:  # let it finish a few units, then kill it mid-sweep without warning
        line = proc.stdout.readline()
        assert line, "sweep ended early"
        written += line.startswith("wrote")
    time.sleep(0.07)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = ResultStore(folder, ("method", "temperature"))
    partial = store.read()
    finished_before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.csv")}
    assert 4 <= len(finished_before) < 12 and len(partial) == 50 * len(finished_before)

    out = subprocess.run(
        [sys.executable, str(script), str(folder)], capture_output=True, text=True, env=env, check=True
    ).stdout
    full = store.read()
    assert len(full) == 12 * 50  # nothing lost
    assert not full.duplicated(["method", "temperature", "sample"]).any()  # nothing twice
    assert out.count("wrote") == 12 - len(finished_before)  # finished units were not redone
    for name, mtime in finished_before.items():
        assert (folder / name).stat().st_mtime_ns == mtime


PROBE = """
SCALE = 2


def helper(x):
    \"\"\"{doc}\"\"\"
    return x * SCALE{tweak}


def unit(x):
    \"\"\"The entry point.\"\"\"
    return helper(x) + 1
"""


def _probe(tmp_path, name: str, doc: str = "Words.", tweak: str = ""):
    """A throwaway module of the helpers package, so that code_digest follows it."""
    import importlib.util

    path = tmp_path / f"{name}.py"
    path.write_text(PROBE.format(doc=doc, tweak=tweak))
    spec = importlib.util.spec_from_file_location(f"helpers.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_code_digest_ignores_docstrings_but_follows_the_code_a_unit_reaches(tmp_path):
    base = code_digest(_probe(tmp_path, "_probe_a").unit)
    assert code_digest(_probe(tmp_path, "_probe_a", doc="Other words, same code.").unit) == base
    # a change in a function the entry point calls, not in the entry point itself
    assert code_digest(_probe(tmp_path, "_probe_a", tweak=" + 0").unit) != base
    reached = code_closure(_probe(tmp_path, "_probe_a").unit)
    assert set(reached) == {"helpers._probe_a:unit", "helpers._probe_a:helper", "helpers._probe_a:SCALE"}
    assert code_digest(_probe(tmp_path, "_probe_a").unit, extra="other documents") != base


def test_running_text_units_do_not_hash_generation_code():
    """Editing generation code (or any docstring) leaves notebook 04's stored units valid."""
    text = code_closure(textscore.TextStudy._unit, textscore.TextStudy._reference_logits, textscore.TextStudy._windows)
    assert "helpers.measures:next_token_measures" in text and "helpers.efftemp:position_curves" in text
    assert not [label for label in text if label.startswith("helpers.generation:")]
    exact = code_closure(sweep.Sweep._exact, sweep.last_token_logits)
    gen = code_closure(sweep.Sweep._generations)
    assert "helpers.generation:generate" in gen and "helpers.generation:generate" not in exact
    assert "helpers.measures:next_token_measures" in exact and "helpers.measures:next_token_measures" not in gen
    timed = code_closure(timing.SpeedBenchmark._measure, methods.load)
    assert "helpers.quantization:storage_report" in timed  # imported inside memory_breakdown
    assert "helpers.timing:_peak_window" not in timed  # lower-case module state is not code
    assert generation.generate.__module__ == "helpers.generation" and measures.MEASURES


def test_model_preparation_is_outside_every_unit_key():
    """Unit keys stop at models.resolve: editing how a model is downloaded or converted recomputes no unit."""
    for unit in (textscore.TextStudy._reference_logits, methods.load):  # every unit loads through methods.load
        reached = code_closure(unit)
        assert "helpers.methods:load" in reached and "helpers.models:resolve" in reached  # resolve's own code counts
        assert not {"helpers.models:prepare", "helpers.models:_convert", "helpers.models:assemble_parts"} & set(reached)
