"""An append-only results store that survives being killed.

A sweep is cut into *units* (for example: one model x method x temperature x top-k). Each
finished unit is written as one CSV, named by its settings, with its provenance sidecar, by
:func:`helpers.provenance.save_table`, which writes to a temporary name and renames: a unit file
either exists whole or not at all. So a sweep killed at any moment (even SIGKILL) and rerun

* loses no finished unit (its file is on disk),
* duplicates no row (a unit is written once; :meth:`ResultStore.read` checks keys are unique),
* redoes no finished work (:meth:`ResultStore.done` is checked before computing a unit).

Leftover ``*.tmp`` files of a unit that was being written when the process died are ignored
and removed on the next :meth:`ResultStore.read`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from .provenance import load_table, save_table, sidecar


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "-", f"{value:g}" if isinstance(value, float) else str(value))


class ResultStore:
    """One folder of unit files. ``label_fields`` name the readable part of each file name."""

    def __init__(self, folder: str | Path, label_fields: tuple[str, ...]):
        self.folder = Path(folder)
        self.label_fields = label_fields

    def path(self, key: dict[str, Any]) -> Path:
        """File of the unit with settings ``key``: readable label + hash of the full key."""
        missing = [f for f in self.label_fields if f not in key]
        if missing:
            raise KeyError(f"unit key lacks {missing}")
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
        label = "__".join(_slug(key[f]) for f in self.label_fields)
        return self.folder / f"{label}__{digest}.csv"

    def done(self, key: dict[str, Any]) -> bool:
        """Whether the unit is finished (its file and its provenance are both on disk)."""
        p = self.path(key)
        return p.exists() and sidecar(p).exists()

    def write(self, key: dict[str, Any], rows: pd.DataFrame, **meta: Any) -> Path:
        """Store a finished unit. Scalar key fields become columns (list-valued ones, such as a
        grid, stay in the provenance's ``unit_key``). Refuses to overwrite a stored unit."""
        p = self.path(key)
        if self.done(key):
            raise FileExistsError(f"unit {p.name} is already stored")
        scalars = {k: v for k, v in key.items() if not isinstance(v, (list, tuple, dict)) and k not in rows.columns}
        rows = rows.assign(**scalars)
        return save_table(rows, p, unit_key=key, **meta)

    def read_unit(self, key: dict[str, Any]) -> pd.DataFrame:
        """One finished unit's rows (empty if the unit is not stored)."""
        return load_table(self.path(key))[0] if self.done(key) else pd.DataFrame()

    def metadata(self) -> list[dict[str, Any]]:
        """The provenance of every finished unit (its key, timing, machine...), in file order."""
        return [json.loads(sidecar(p).read_text()) for p in sorted(self.folder.glob("*.csv")) if sidecar(p).exists()]

    def read(self) -> pd.DataFrame:
        """All finished units as one table (empty if none). Raises if two files share a key."""
        for tmp in self.folder.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        frames, keys = [], set()
        for p in sorted(self.folder.glob("*.csv")):
            if not sidecar(p).exists():
                continue  # killed between the two renames: treated as unfinished
            df, meta = load_table(p)
            key = json.dumps(meta["unit_key"], sort_keys=True, default=str)
            if key in keys:
                raise ValueError(f"duplicate unit {p.name}")
            keys.add(key)
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
