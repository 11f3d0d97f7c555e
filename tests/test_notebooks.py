"""Notebook policy: sources carry no outputs, parameters are plain values papermill can see, and
every parameters file fits the notebooks.

Tests marked ``artifacts`` check the committed results instead: every executed copy in
notebooks/executed was made from the current source, every data file has provenance, every
figure is named after a notebook. They fail after a notebook changes until `make reproduce` has
run again (select them with ``pytest -m artifacts``, leave them out with ``-m "not artifacts"``)."""

from __future__ import annotations

import ast
import json

import papermill as pm
import pytest

from helpers import REPO_ROOT, runner
from helpers.provenance import sidecar

SOURCES = runner.numbered_notebooks()
EXECUTED = REPO_ROOT / "notebooks" / "executed"
PARAM_FILES = sorted((REPO_ROOT / "params").glob("*.yaml"))


def test_there_are_notebooks():
    assert [p.name for p in SOURCES][:2] == ["00_class_path.ipynb", "01_load_and_quantize.ipynb"]


@pytest.mark.parametrize("nb", SOURCES, ids=lambda p: p.stem)
def test_sources_have_no_outputs(nb):
    cells = json.loads(nb.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), (
        f"{nb.name} was saved with outputs: clear them (executed copies live in notebooks/executed)"
    )


@pytest.mark.parametrize("nb", SOURCES, ids=lambda p: p.stem)
def test_parameters_cell_holds_plain_values(nb):
    cells = json.loads(nb.read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{nb.name} needs exactly one cell tagged 'parameters'"
    tree = ast.parse("".join(tagged[0]["source"]))
    names = set()
    for stmt in tree.body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name), (
            f"{nb.name}: parameters cell may only assign names: {ast.unparse(stmt)}"
        )
        ast.literal_eval(stmt.value)  # raises unless a plain literal
        names.add(stmt.targets[0].id)
    # papermill must see every one of them (an '=' in a comment hides a parameter from it)
    assert set(pm.inspect_notebook(str(nb))) == names


@pytest.mark.artifacts
@pytest.mark.parametrize("nb", SOURCES, ids=lambda p: p.stem)
def test_executed_copy_is_fresh(nb):
    executed = EXECUTED / nb.name
    assert executed.exists(), f"no executed copy of {nb.name}: run `make reproduce`"
    meta = json.loads(executed.read_text())["metadata"].get("compendium", {})
    assert meta.get("source_sha256") == runner.source_hash(nb), (
        f"notebooks/executed/{nb.name} is stale: {nb.name} changed since it was executed; run `make reproduce`"
    )
    assert meta.get("params_file", "").endswith("default.yaml")


@pytest.mark.artifacts
@pytest.mark.parametrize("executed", sorted((EXECUTED / "full").glob("*.ipynb")), ids=lambda p: p.stem)
def test_full_profile_copies_are_fresh(executed):
    """The full profile's copies too (notebook 03's is redrawn in seconds: params/full-redraw.yaml)."""
    meta = json.loads(executed.read_text())["metadata"].get("compendium", {})
    assert meta.get("source_sha256") == runner.source_hash(runner.NOTEBOOKS_DIR / executed.name), (
        f"notebooks/executed/full/{executed.name} is stale; rerun it with its profile ({meta.get('params_file')})"
    )


@pytest.mark.artifacts
def test_no_executed_copy_without_a_source():
    assert {p.name for p in EXECUTED.glob("*.ipynb")} <= {p.name for p in SOURCES}


@pytest.mark.parametrize("params_file", PARAM_FILES, ids=lambda p: p.stem)
def test_parameter_files_fit_the_notebooks(params_file):
    params = runner.load_params(params_file)
    runner.check_sections(params, SOURCES)
    for nb in SOURCES:
        runner.parameters_for(nb, params, set(runner.parameter_defaults(nb)))


@pytest.mark.artifacts
@pytest.mark.parametrize("nb", SOURCES, ids=lambda p: p.stem)
def test_every_notebook_has_committed_results(nb):
    tables = list((REPO_ROOT / "data").glob(f"{nb.stem}_*.csv*"))
    figures = list((REPO_ROOT / "figures").glob(f"{nb.stem}_*.png"))
    assert tables and figures, f"data/ or figures/ holds nothing from {nb.name}: run `make reproduce`"


@pytest.mark.artifacts
def test_every_data_file_has_provenance():
    # results are named after their notebook (NN_...); inputs such as prompts.csv are documented in data/README.md
    data = sorted(p for p in (REPO_ROOT / "data").rglob("[0-9][0-9]_*.csv*") if not p.name.endswith(".tmp"))
    assert data, "data/ holds no results: run `make reproduce`"
    for csv in data:
        meta = json.loads(sidecar(csv).read_text())
        for key in ("notebook", "parameters", "git_commit", "date", "packages", "device", "threads"):
            assert key in meta, f"{sidecar(csv).name} lacks {key}"
        assert (REPO_ROOT / "notebooks" / f"{meta['notebook']}.ipynb").exists()


@pytest.mark.artifacts
def test_every_figure_is_named_after_a_notebook():
    stems = {nb.stem for nb in SOURCES}
    figures = sorted((REPO_ROOT / "figures").glob("*.png"))
    assert figures
    for fig in figures:
        assert any(fig.name.startswith(s + "_") for s in stems), f"{fig.name} is named after no notebook"
