"""The one setup call every numbered notebook makes right after its ``parameters`` cell.

``nb = notebook.setup("03_speed_and_memory", globals())`` quiets the libraries, pins the threads,
creates the output folders, sets the figure style, and returns a :class:`Notebook` that knows the
parameters as papermill declared them (every name of the ``parameters`` cell, with the value this
run uses, injected or default). Its :meth:`~Notebook.save_table` and :meth:`~Notebook.savefig` name
every output ``<notebook>_<name>`` and record those parameters next to every table, so the
provenance cannot drift from the parameters cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import methods as registry
from . import provenance, runtime
from .runner import NOTEBOOKS_DIR, parameter_defaults

#: One colour per method and per control, the same in every figure of every notebook.
PALETTE: dict[str, str] = {**registry.METHOD_COLORS, **registry.CONTROL_COLORS}
#: Colours for models, from a palette that shares no colour with :data:`PALETTE`, so that a figure
#: colouring models never reads as one colouring methods (seaborn's "Dark2").
MODEL_PALETTE = "Dark2"


def declared_names(notebook: Path) -> list[str]:
    """Names assigned in the notebook's cell tagged ``parameters``, in order, read as the runner reads
    them (:func:`helpers.runner.parameter_defaults`)."""
    names = list(parameter_defaults(Path(notebook)))
    if not names:
        raise ValueError(f"{notebook} has no cell tagged 'parameters'")
    return names


@dataclass
class Notebook:
    """What a notebook's cells share: its name, parameters, output folders and writers."""

    name: str
    params: dict[str, Any]
    data_dir: Path
    figures_dir: Path
    device: str = "cpu"
    thread_info: dict[str, Any] | None = None
    #: extra provenance recorded with every table (for example the settings of an upstream run)
    context: dict[str, Any] = field(default_factory=dict)

    def data_path(self, name: str) -> Path:
        """``data_dir / "<notebook>_<name>"``."""
        return self.data_dir / f"{self.name}_{name}"

    def save_table(self, df: pd.DataFrame, name: str, **meta: Any) -> Path:
        """Write ``df`` as ``<notebook>_<name>`` in ``data_dir`` with its provenance sidecar."""
        meta = {
            "notebook": self.name,
            "device": self.device,
            "parameters": self.params,
            "threads": self.thread_info,
            **self.context,
            **meta,
        }
        return provenance.save_table(df, self.data_path(name), **meta)

    def savefig(self, fig, name: str, **kwargs: Any) -> Path:
        """Save ``fig`` as ``<notebook>_<name>.png`` in ``figures_dir`` (150 dpi, tight box)."""
        path = self.figures_dir / f"{self.name}_{name}.png"
        fig.savefig(path, **{"dpi": 150, "bbox_inches": "tight", **kwargs})
        return path

    @staticmethod
    def panels(n: int, width: float, height: float, ncols: int = 2, **kwargs: Any):
        """``(fig, axes)``: ``n`` panels of ``width`` x ``height`` inches in rows of at most
        ``ncols`` (one per model, say), so that four models make a 2 x 2 grid rather than a strip;
        ``axes`` is a flat list of the ``n`` panels, the unused ones removed."""
        import matplotlib.pyplot as plt

        cols = max(1, min(ncols, n))
        rows = -(-n // cols)
        fig, grid = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, **kwargs)
        axes = list(grid.flat)
        for ax in axes[n:]:
            ax.remove()
        return fig, axes[:n]

    def method_order(self, names) -> list[str]:
        """``names`` in the registry's order (fp32, bf16, fp16, int8 ... fp4-dq)."""
        return [m for m in registry.METHODS if m in set(names)]

    @property
    def palette(self) -> dict[str, str]:
        """:data:`PALETTE`: one colour per method and control."""
        return PALETTE

    @staticmethod
    def model_colors(models: Sequence[str]) -> dict[str, tuple[float, float, float]]:
        """One colour per model, in the order given, none of them a method's colour."""
        import seaborn as sns

        return dict(zip(models, sns.color_palette(MODEL_PALETTE, len(models))))


def setup(name: str, namespace: dict[str, Any], notebooks_dir: Path | None = None) -> Notebook:
    """Prepare a notebook run and return its :class:`Notebook`.

    ``namespace`` is the notebook's ``globals()`` after the parameters (and papermill's injected
    values) are set. Parameters named ``threads``, ``device``, ``data_dir`` and ``figures_dir``
    are acted on when the notebook declares them; ``device`` is checked against this machine.
    """
    import seaborn as sns

    folder = Path(notebooks_dir) if notebooks_dir is not None else Path.cwd()
    path = folder / f"{name}.ipynb"
    if not path.exists():
        path = NOTEBOOKS_DIR / f"{name}.ipynb"
    if not path.exists():
        raise FileNotFoundError(
            f"notebook {name}.ipynb not found in {folder} or {NOTEBOOKS_DIR}: its parameters cell "
            "says which names are parameters"
        )
    params = {k: namespace[k] for k in declared_names(path) if k in namespace}
    runtime.quiet()
    thread_info = runtime.configure_threads(params["threads"]) if "threads" in params else None
    device = runtime.resolve_device(params["device"]) if "device" in params else "cpu"
    dirs = {}
    for key, default in (("data_dir", "../data"), ("figures_dir", "../figures")):
        dirs[key] = Path(params.get(key, default))
        dirs[key].mkdir(parents=True, exist_ok=True)
    sns.set_theme(style="whitegrid", context="notebook")
    return Notebook(name, params, dirs["data_dir"], dirs["figures_dir"], device, thread_info)


# --------------------------------------------------------------------------- text and axes
def ci_text(value: float, low: float, high: float, fmt: str = "+.1%") -> str:
    """``value [low, high]`` in one format, the way every takeaway prints an estimate and its
    interval: ``ci_text(0.012, -0.002, 0.026)`` is ``"+1.2% [-0.2%, +2.6%]"``."""
    return f"{value:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def log_axis(axis, subs: Sequence[float] = (1, 2, 5)) -> None:
    """Plain numbers (0.2, 5, 100) at ``subs`` x each power of ten on a log-scaled ``axis``
    (``ax.xaxis`` or ``ax.yaxis``), no minor ticks: log axes a reader does not have to decode."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(NullLocator())


# --------------------------------------------------------------------------- temperature bands
#: How the temperature bands of the verdicts are shaded: grey hatching, never a fill, so that no
#: band reads as a method's interval ribbon (those are filled in the method's colour).
BAND_HATCH: dict[str, str] = {"low": "//", "high": "\\\\"}
BAND_EDGE = "0.84"


def shade_bands(ax, bands: dict[str, Sequence[float]]) -> None:
    """Hatch each ``name -> (T low, T high)`` band of ``bands`` across ``ax``, behind the data."""
    for name, (low, high) in bands.items():
        ax.axvspan(low, high, facecolor="none", edgecolor=BAND_EDGE, hatch=BAND_HATCH[name], lw=0, zorder=0)
        for edge in (low, high):  # a firm edge, dashed (not a grid line): hatching alone ends raggedly
            ax.axvline(edge, color="0.55", lw=0.9, ls=(0, (4, 3)), zorder=0)


def band_handles(bands: dict[str, Sequence[float]]) -> list:
    """Legend entries for :func:`shade_bands`: ``"low band [0.25, 0.8]"`` and so on."""
    from matplotlib.patches import Patch

    return [
        Patch(facecolor="none", edgecolor=BAND_EDGE, hatch=BAND_HATCH[name], label=f"{name} band {list(band)}")
        for name, band in bands.items()
    ]
