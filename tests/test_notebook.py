"""The notebook prelude: parameters as declared, outputs named after the notebook, provenance."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import notebook  # noqa: E402
from helpers.provenance import load_table  # noqa: E402
from tests.nbfactory import write_notebook  # noqa: E402

PARAMS = 'models = ["a"]\nthreads = 1\nn_boot = 10  # a comment\ndata_dir = "DATA"\nfigures_dir = "FIGS"'


def test_declared_names_in_order(tmp_path):
    path = write_notebook(tmp_path / "01_x.ipynb", "y = 2", params=PARAMS)
    assert notebook.declared_names(path) == ["models", "threads", "n_boot", "data_dir", "figures_dir"]


def test_declared_names_needs_a_parameters_cell(tmp_path):
    path = write_notebook(tmp_path / "01_x.ipynb", params="x = 1")
    text = path.read_text().replace('"parameters"', '"other"')
    path.write_text(text)
    with pytest.raises(ValueError, match="parameters"):
        notebook.declared_names(path)


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.filterwarnings("ignore:OMP_WAIT_POLICY")
def test_setup_records_declared_parameters_with_their_run_values(tmp_path, keep_threads):
    write_notebook(
        tmp_path / "01_x.ipynb", params=PARAMS.replace("DATA", str(tmp_path / "d")).replace("FIGS", str(tmp_path / "f"))
    )
    # the namespace of a run: papermill injected n_boot = 50; helper variables are not parameters
    namespace = {
        "models": ["a"],
        "threads": 1,
        "n_boot": 50,
        "data_dir": str(tmp_path / "d"),
        "figures_dir": str(tmp_path / "f"),
        "np": object(),
        "x": 3,
    }
    nb = notebook.setup("01_x", namespace, notebooks_dir=tmp_path)
    assert nb.params == {
        "models": ["a"],
        "threads": 1,
        "n_boot": 50,
        "data_dir": str(tmp_path / "d"),
        "figures_dir": str(tmp_path / "f"),
    }
    assert nb.data_dir.is_dir() and nb.figures_dir.is_dir() and nb.thread_info["torch_num_threads"] == 1
    nb.context["upstream"] = "v1"
    path = nb.save_table(pd.DataFrame({"a": [1, 2]}), "table.csv", source="test")
    assert path == tmp_path / "d" / "01_x_table.csv"
    df, meta = load_table(path)
    assert df.a.tolist() == [1, 2]
    assert meta["notebook"] == "01_x" and meta["parameters"]["n_boot"] == 50
    assert meta["upstream"] == "v1" and meta["source"] == "test" and meta["device"] == "cpu"
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    assert nb.savefig(fig, "figure") == tmp_path / "f" / "01_x_figure.png"
    assert (tmp_path / "f" / "01_x_figure.png").stat().st_size > 0
    plt.close(fig)
    assert nb.method_order(["fp4", "fp32", "int8"]) == ["fp32", "int8", "fp4"]


def test_setup_names_a_missing_notebook(tmp_path):
    with pytest.raises(FileNotFoundError, match="99_missing.ipynb"):
        notebook.setup("99_missing", {}, notebooks_dir=tmp_path)


def test_panels_wrap_models_into_rows_of_two():
    for n, shape in ((1, (1, 1)), (3, (2, 2)), (4, (2, 2)), (5, (3, 2))):
        fig, axes = notebook.Notebook.panels(n, 5.0, 3.0)
        assert len(axes) == n == len(fig.axes)  # the unused panel of an odd count is removed
        assert tuple(fig.get_size_inches()) == (5.0 * shape[1], 3.0 * shape[0])
        assert axes[-1].get_subplotspec().rowspan.start == shape[0] - 1
        plt.close(fig)


def test_ci_text_and_log_axis():
    assert notebook.ci_text(0.012, -0.002, 0.026) == "+1.2% [-0.2%, +2.6%]"
    assert notebook.ci_text(1.23456, 1.2, 1.3, ".3f") == "1.235 [1.200, 1.300]"
    fig, ax = plt.subplots()
    ax.plot([0.1, 100], [1, 2])
    ax.set_xscale("log")
    notebook.log_axis(ax.xaxis)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if 0.1 <= t.get_position()[0] <= 100]
    assert labels == ["0.1", "0.2", "0.5", "1", "2", "5", "10", "20", "50", "100"]
    assert ax.xaxis.get_minor_locator().tick_values(0.1, 100) == []
    plt.close(fig)


def test_bands_are_hatched_not_filled_and_named_in_the_legend():
    """The temperature bands must not read as a method's interval ribbon (a filled colour)."""
    bands = {"low": (0.25, 0.8), "high": (1.0, 1.5)}
    fig, ax = plt.subplots()
    notebook.shade_bands(ax, bands)
    spans = ax.patches
    assert len(spans) == 2
    for span, (name, (low, high)) in zip(spans, bands.items()):
        assert span.get_x() == pytest.approx(low) and span.get_x() + span.get_width() == pytest.approx(high)
        assert span.get_hatch() == notebook.BAND_HATCH[name]
        assert span.get_facecolor()[3] == 0  # no fill
    handles = notebook.band_handles(bands)
    assert [h.get_label() for h in handles] == ["low band [0.25, 0.8]", "high band [1.0, 1.5]"]
    assert [h.get_hatch() for h in handles] == [s.get_hatch() for s in spans]
    plt.close(fig)
