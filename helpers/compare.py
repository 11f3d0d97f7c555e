"""Compare a rerun's tables in ``data/`` with the committed ones: what moved, and by how much.

``python -m helpers.compare [--ref HEAD] [--any-class]`` reads every table of ``data/`` in the work
tree and the same file at git commit ``--ref``. Tables from the same hardware class (their
provenance's ``hardware_class``) are compared cell by cell: text and row counts exactly, numbers
within :data:`RTOL` / :data:`ATOL`. Columns that differ from run to run by design (time, speed,
machine load, resident memory, the machine's name and the code digest: :func:`is_run_specific`)
are only listed. Tables of another hardware class
are skipped unless ``--any-class`` is given (quantized numbers then change in their last digits).
Exit status 1 when a table moved beyond the tolerances, so the check can gate a rerun.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import REPO_ROOT
from .provenance import read_provenance, sidecar

#: Relative and absolute tolerance for numbers that a rerun on the same hardware should reproduce.
RTOL = 1e-6
ATOL = 1e-9
_RUN_SPECIFIC = re.compile(
    r"(_s$|_s_|tokens_per_s|GBps|load_average|rss|seconds|memory_allocated|memory_reserved"
    r"|^overhead$|^speedup$|^date$|^code$|^matched_to$|^hardware_class$|^device_name$)"
)


def is_run_specific(column: str) -> bool:
    """Whether a column differs from run to run by design: a measured time, speed, machine load or
    peak memory, a ratio of two times (the harness ``overhead``, a ``speedup``), the machine, or the
    digest of the code that computed the row (``matched_to``: the stored unit a control was matched
    to, whose file name holds such a digest)."""
    return bool(_RUN_SPECIFIC.search(column))


@dataclass
class Change:
    """How one table differs: ``status`` is ``same``, ``moved``, ``run-specific only``, ``new``,
    ``skipped`` (another hardware class) or ``shape`` (other rows or columns)."""

    table: str
    status: str
    detail: str = ""


def compare_frames(old: pd.DataFrame, new: pd.DataFrame, rtol: float = RTOL, atol: float = ATOL) -> tuple[str, str]:
    """``(status, detail)`` of two versions of one table (see :class:`Change`); ``moved`` lists each
    column with the rows outside the tolerance and the largest difference among them."""
    if list(old.columns) != list(new.columns) or len(old) != len(new):
        return "shape", f"{len(old)}x{len(old.columns)} -> {len(new)}x{len(new.columns)} (rows x columns)"
    moved, timings = [], []
    for col in new.columns:
        a, b = old[col], new[col]
        if pd.api.types.is_numeric_dtype(a) and pd.api.types.is_numeric_dtype(b):
            x, y = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
            close = np.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True) | (x == y)  # equal infinities too
            if close.all():
                continue
            with np.errstate(invalid="ignore"):
                gaps = np.abs(x - y)[~close]
            worst = f", up to {np.nanmax(gaps):.3g}" if np.isfinite(gaps).any() else ", one side not finite"
            (timings if is_run_specific(col) else moved).append(f"{col} ({(~close).sum()} rows{worst})")
        elif not a.astype(str).equals(b.astype(str)):
            n = int((a.astype(str) != b.astype(str)).sum())
            (timings if is_run_specific(col) else moved).append(f"{col} ({n} rows)")
    if moved:
        return "moved", "; ".join(moved) + (f" [run-specific: {', '.join(timings)}]" if timings else "")
    return ("run-specific only", ", ".join(timings)) if timings else ("same", "")


def _committed(path: Path, ref: str) -> bytes | None:
    rel = path.relative_to(REPO_ROOT).as_posix()
    out = subprocess.run(["git", "show", f"{ref}:{rel}"], cwd=REPO_ROOT, capture_output=True)
    return out.stdout if out.returncode == 0 else None


def _read(raw: bytes, name: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(raw), compression="gzip" if name.endswith(".gz") else None)


def compare_tables(folder: Path, ref: str = "HEAD", any_class: bool = False) -> list[Change]:
    """One :class:`Change` per table of ``folder`` (``data/`` and its subfolders)."""
    changes = []
    for path in sorted(p for p in folder.rglob("*.csv*") if sidecar(p).exists()):
        name = path.relative_to(folder).as_posix()
        old_raw, old_meta = _committed(path, ref), _committed(sidecar(path), ref)
        if old_raw is None or old_meta is None:
            changes.append(Change(name, "new"))
            continue
        old_class = json.loads(old_meta).get("hardware_class")
        new_class = read_provenance(path).get("hardware_class")
        if old_class != new_class and not any_class:
            changes.append(Change(name, "skipped", f"hardware class {old_class} -> {new_class}"))
            continue
        status, detail = compare_frames(_read(old_raw, path.name), pd.read_csv(path))
        changes.append(Change(name, status, detail))
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="HEAD", help="git commit of the committed tables (default HEAD)")
    parser.add_argument("--any-class", action="store_true", help="also compare tables of another hardware class")
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "data")
    args = parser.parse_args(argv)
    changes = compare_tables(args.data, args.ref, args.any_class)
    for c in changes:
        if c.status != "same":
            print(f"{c.status:>12}  {c.table}" + (f": {c.detail}" if c.detail else ""))
    counts = pd.Series([c.status for c in changes]).value_counts().to_dict()
    print("tables: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 1 if any(c.status in ("moved", "shape") for c in changes) else 0


if __name__ == "__main__":
    sys.exit(main())
