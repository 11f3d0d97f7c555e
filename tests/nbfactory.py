"""Tiny notebooks for the runner's tests: a ``parameters`` cell and some code cells."""

from __future__ import annotations

from pathlib import Path

import nbformat


def write_notebook(path: Path, *sources: str, params: str = "x = 1") -> Path:
    """Write a notebook whose first cell (tagged ``parameters``) is ``params``, then ``sources``."""
    cells = [nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]})]
    cells += [nbformat.v4.new_code_cell(s) for s in sources]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path
