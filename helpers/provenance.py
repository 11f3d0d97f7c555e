"""Data files with their provenance.

Every table a notebook saves goes through :func:`save_table`: a CSV for the numbers and a
JSON sidecar of the same name (``x.csv`` -> ``x.provenance.json``) recording what produced
it: notebook, parameters, models and methods, package versions, device and hardware class,
thread settings, machine load, git commit and date. :func:`load_table` reads both back.

**Which code made it.** ``git_commit`` is the commit checked out and ``sources_modified``
says whether the sources that compute results (:data:`SOURCES`) differed from it. Outputs a
run writes into the repository (``data/``, ``figures/``, ``notebooks/executed/``) do not
count, so a run from a clean checkout is recorded as clean although it changes the tree.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from . import REPO_ROOT
from .runtime import cpu_description, hardware_class, machine_load, thread_settings

PACKAGES = ("torch", "transformers", "bitsandbytes", "accelerate", "numpy", "pandas", "gguf")

#: Paths (relative to the repository root) whose content decides the results ...
SOURCES = ("helpers", "notebooks", "params", "pyproject.toml")
#: ... except these outputs inside them.
OUTPUTS_IN_SOURCES = ("notebooks/executed",)


def _git(root: Path, *args: str) -> str | None:
    """stdout of ``git args`` in ``root``, or ``None`` outside git (or without git)."""
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def git_commit(root: Path = REPO_ROOT) -> str:
    """Abbreviated hash (12 digits) of the commit checked out in ``root``; ``"unknown"`` outside git."""
    out = _git(root, "rev-parse", "--short=12", "HEAD")
    return out.strip() if out else "unknown"


def sources_modified(root: Path = REPO_ROOT) -> bool | None:
    """Whether :data:`SOURCES` differ from the commit checked out in ``root`` (edited, added,
    deleted or untracked files; outputs under :data:`OUTPUTS_IN_SOURCES` ignored); ``None``
    outside git."""
    pathspec = [*SOURCES, *(f":(exclude){p}" for p in OUTPUTS_IN_SOURCES)]
    out = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *pathspec)
    return None if out is None else bool(out.strip())


def package_versions() -> dict[str, str]:
    """Installed versions of the packages whose behaviour the results depend on."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def device_description(device: str = "cpu") -> dict[str, Any]:
    """What the computation ran on: hardware class (:func:`helpers.runtime.hardware_class`),
    CPU model and flags, plus the GPU name on CUDA."""
    desc: dict[str, Any] = {"device": device, "hardware_class": hardware_class(device), **cpu_description()}
    if device.startswith("cuda") and torch.cuda.is_available():
        desc["gpu"] = torch.cuda.get_device_name(device)
        desc["cuda"] = torch.version.cuda
    return desc


def provenance(device: str = "cpu", **extra: Any) -> dict[str, Any]:
    """The provenance record: ``extra`` (notebook, parameters, models, methods ...) plus the
    environment the numbers were measured in."""
    return {
        **extra,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "sources_modified": sources_modified(),
        "packages": package_versions(),
        **device_description(device),
        "threads": thread_settings(),
        "load_average_1min": round(machine_load(), 2),
    }


def sidecar(path: str | os.PathLike[str]) -> Path:
    """Provenance file that belongs to data file ``path`` (``x.csv`` or ``x.csv.gz``)."""
    path = Path(path)
    base = path.name.removesuffix(".gz").removesuffix(".csv")
    return path.with_name(base + ".provenance.json")


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The provenance record of data file ``path`` (its sidecar), without reading the table."""
    return json.loads(sidecar(path).read_text())


def save_table(df: pd.DataFrame, path: str | os.PathLike[str], *, device: str = "cpu", **meta: Any) -> Path:
    """Write ``df`` as CSV and its provenance sidecar; return the CSV path.

    Both files are written to a temporary name and renamed, so an interrupted run never
    leaves a half-written table behind. Every text field is quoted, so generated text that holds
    a carriage return, a newline or a quote reads back unchanged with any CSV reader (plain
    ``pandas.read_csv``, Python's ``csv`` module, R, a spreadsheet).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(
        tmp,
        index=False,
        lineterminator="\n",  # on every platform
        quoting=csv.QUOTE_NONNUMERIC,  # numbers bare, text quoted: a bare "\r" in a text field stays data
        compression="gzip" if path.name.endswith(".gz") else None,
    )
    record = provenance(device=device, rows=len(df), columns=list(df.columns), **meta)
    side_tmp = sidecar(path).with_suffix(".tmp")
    side_tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    os.replace(side_tmp, sidecar(path))
    return path


def load_table(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a table written by :func:`save_table` and its provenance (a plain ``pandas.read_csv``
    reads the table the same way)."""
    path = Path(path)
    meta_path = sidecar(path)
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} has no provenance file {meta_path.name}")
    return pd.read_csv(path), json.loads(meta_path.read_text())
