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

**One cache-key rule.** Every unit key holds the unit's settings and :func:`code_digest` of the
functions that compute its rows: the syntax trees, without docstrings, of those functions and of
every function, class and constant of ``helpers`` that they reach by name, up to the model
folder that :func:`helpers.models.resolve` returns (:data:`BOUNDARIES`). Editing a docstring, a
comment, code that the unit does not run, or how a model is prepared recomputes nothing; changing
code it runs recomputes it. Library versions are recorded in each unit's provenance, not in its key.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import re
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pandas as pd

from .provenance import load_table, read_provenance, save_table, sidecar

PACKAGE = __name__.rsplit(".", 1)[0]  # "helpers"
_CONSTANT = re.compile(r"_?[A-Z][A-Z0-9_]*")
#: Functions whose own code is part of a key but whose callees are not followed. ``models.resolve``
#: returns a prepared model folder, which the unit key names by the model; how the folder was made
#: (download, GGUF conversion, checksums) does not decide a unit's numbers, so editing that code
#: recomputes nothing. A conversion that changed the weights would need a fresh store.
BOUNDARIES = frozenset({f"{PACKAGE}.models:resolve"})


def _target(obj: Any) -> Any:
    """The function behind a property, static or class method, or decorator (else ``obj``)."""
    obj = obj.fget if isinstance(obj, property) else obj
    obj = obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj
    return inspect.unwrap(obj) if inspect.isfunction(obj) else obj


def _ours(obj: Any) -> bool:
    """Whether ``obj`` is a function or class defined in this package."""
    module = getattr(obj, "__module__", None) or ""
    return (inspect.isfunction(obj) or inspect.isclass(obj)) and module.split(".")[0] == PACKAGE


def _tree(obj: Any) -> ast.AST:
    """The syntax tree of a function or class, every docstring in it removed."""
    node = ast.parse(textwrap.dedent(inspect.getsource(obj))).body[0]
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if (
            isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            n.body = body[1:] or [ast.Pass()]
    return node


def _owner(fn: Any) -> type | None:
    """The class a function is defined in (from its qualified name), or None."""
    obj: Any = sys.modules.get(fn.__module__)
    for part in fn.__qualname__.split(".")[:-1]:
        obj = getattr(obj, part, None)
    return obj if inspect.isclass(obj) else None


def _reached(obj: Any, node: ast.AST) -> list[tuple[str, Any]]:
    """``(label, value)`` of every name in ``node``: ``name``, ``module.name`` and ``self.name`` /
    ``cls.name``, resolved in ``obj``'s module and class (the label names a constant)."""
    module = sys.modules[obj.__module__]
    scope = vars(module)
    owner = obj if inspect.isclass(obj) else _owner(obj)
    found = []
    for n in ast.walk(node):
        if isinstance(n, ast.ImportFrom) and n.level:
            # an import inside a function: `from .quantization import storage_report`
            base = importlib.import_module("." * n.level + (n.module or ""), package=module.__package__)
            found += [(f"{base.__name__}:{a.name}", getattr(base, a.name, None)) for a in n.names]
        elif isinstance(n, ast.Name) and n.id in scope:
            found.append((f"{module.__name__}:{n.id}", scope[n.id]))
        elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
            base = scope.get(n.value.id)
            if isinstance(base, types.ModuleType) and base.__name__.split(".")[0] == PACKAGE:
                found.append((f"{base.__name__}:{n.attr}", getattr(base, n.attr, None)))
            elif n.value.id in ("self", "cls") and owner is not None:
                value = inspect.getattr_static(owner, n.attr, None)
                found.append((f"{owner.__module__}:{owner.__qualname__}.{n.attr}", value))
    return found


def code_closure(*entries: Any) -> dict[str, str]:
    """The code a unit runs: ``entries`` (functions, methods or classes of this package) and every
    function, class and upper-case module constant of the package that they reach by name,
    transitively, but not past a :data:`BOUNDARIES` function. Maps ``module:qualname`` to the
    docstring-free syntax tree (``ast.dump``), or to the constant's ``repr``. Calls through other
    objects (a model's ``forward``, a callback) are not followed: library code is recorded by
    version in the provenance, not here."""
    out: dict[str, str] = {}
    todo: list[tuple[str, Any]] = [("", e) for e in entries]
    while todo:
        label, obj = todo.pop()
        obj = _target(obj)
        if _ours(obj):
            label = f"{obj.__module__}:{obj.__qualname__}"
            if label not in out:
                node = _tree(obj)
                out[label] = ast.dump(node)
                if label not in BOUNDARIES:
                    todo += _reached(obj, node)
        elif isinstance(obj, (int, float, str, tuple, frozenset)) and _CONSTANT.fullmatch(label.partition(":")[2]):
            out[label] = repr(obj)  # a module constant such as LOG2E (lower-case names are state)
    return out


def code_digest(*entries: Any, extra: str = "") -> str:
    """Ten hex digits of sha256 over :func:`code_closure` of ``entries`` and ``extra`` (such as the
    input documents): the part of a unit key that says which code computed the unit."""
    h = hashlib.sha256(extra.encode())
    for label, code in sorted(code_closure(*entries).items()):
        h.update(label.encode() + b"\0" + code.encode() + b"\0")
    return h.hexdigest()[:10]


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
        return [read_provenance(p) for p in sorted(self.folder.glob("*.csv")) if sidecar(p).exists()]

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
