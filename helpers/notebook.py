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

import numpy as np
import pandas as pd

from . import methods as registry
from . import provenance, runtime
from .runner import NOTEBOOKS_DIR, parameter_defaults


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


# --------------------------------------------------------------------------- label placement
def spread(values: Sequence[float], gap: float) -> np.ndarray:
    """Positions near ``values``, in their order, at least ``gap`` apart and centred on them."""
    order = np.argsort(values)
    pos = np.asarray(values, dtype=float)[order]
    for i in range(1, len(pos)):
        pos[i] = max(pos[i], pos[i - 1] + gap)
    pos -= (pos - np.sort(values)).mean()
    out = np.empty_like(pos)
    out[order] = pos
    return out


def label_right(ax, xs, ys, texts: Sequence[str], width: float, offset: float, gap: float) -> None:
    """Label points (log axes) in columns to their right without overlaps: a label whose extent
    along x (``width`` decades, starting ``offset`` decades right of its point) meets the column
    before joins it; a column's labels stand right of all its points, spread apart along y (at
    least ``gap`` decades, :func:`spread`), each with a leader line to its point (notebook 03's
    roofline, where several methods share one spot)."""
    left = np.log10(xs) + offset
    columns = []  # [label indices, left edge]
    for i in np.argsort(left):
        if columns and left[i] < columns[-1][1] + width:
            columns[-1][0].append(i)
            columns[-1][1] = left[i]
        else:
            columns.append([[i], left[i]])
    for members, edge in columns:
        for i, y in zip(members, spread(np.log10(np.asarray(ys)[members]), gap)):
            ax.annotate(
                texts[i],
                (xs[i], ys[i]),
                (10**edge, 10**y),
                fontsize=8,
                va="center",
                arrowprops=dict(arrowstyle="-", color="0.5", lw=0.6, shrinkA=0, shrinkB=4),
            )
