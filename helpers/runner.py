"""Execute the numbered notebooks in order with papermill.

    python -m helpers.runner --params params/default.yaml        # what `make reproduce` runs
    python -m helpers.runner --params params/smoke.yaml --only 01

A parameters file has three kinds of top-level keys::

    runner:                 # settings of this runner
      executed_dir: notebooks/executed
    all:                    # passed to every notebook that declares the parameter
      models: [smollm2-135m, gemma3-270m]
    01_load_and_quantize:   # passed to that notebook only; an undeclared name is an error
      max_eval_tokens: 512

Before the first notebook starts, every selected notebook's parameters are checked: names the
notebook does not declare, values of the wrong type or out of range (a string where the
notebook has a list, a negative temperature ...), and, where a notebook declares them,
``models`` (each one available: see :func:`helpers.models.check_available`), ``methods``,
``reference`` and ``device``. A bad value fails in seconds naming the notebook and the key,
instead of after the notebooks before it have run.

Notebooks run with ``notebooks/`` as working directory, so relative ``data_dir``,
``figures_dir`` and model folder parameters resolve as they do in JupyterLab. The executed
copy of each notebook is kept in ``executed_dir`` and stamped (``metadata.compendium``) with
the hash of the source notebook's cells, so a test can tell a stale executed copy from a
fresh one. The run stops at the first failing notebook and names the notebook and the cell.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import hashlib
import html
import json
import numbers
import os
import re
import reprlib
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from . import REPO_ROOT

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
NUMBERED = re.compile(r"^\d{2}_[\w-]+\.ipynb$")


class ParameterFileError(ValueError):
    """The parameters file does not fit the notebooks."""


def numbered_notebooks(folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The source notebooks ``NN_name.ipynb`` in numeric order."""
    return sorted(p for p in folder.glob("*.ipynb") if NUMBERED.match(p.name))


def source_hash(notebook: Path | dict) -> str:
    """sha256 over the source of every code cell, the parameters cell included (markdown, outputs
    and metadata ignored): a copy executed from the same code and parameters is fresh whatever
    the prose around it says."""
    nb = json.loads(Path(notebook).read_text()) if not isinstance(notebook, dict) else notebook
    digest = hashlib.sha256()
    for cell in nb["cells"]:
        src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        if cell["cell_type"] != "code" or "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            continue  # prose, and papermill's injected cell, are not part of what runs
        digest.update(cell["cell_type"].encode() + b"\0" + src.encode() + b"\0")
    return digest.hexdigest()


def load_params(path: Path) -> dict[str, Any]:
    """Read and shape-check a parameters file."""
    if not path.exists():
        raise ParameterFileError(f"parameters file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ParameterFileError(f"{path}: top level must be a mapping")
    for key, value in data.items():
        if not isinstance(value, dict):
            raise ParameterFileError(f"{path}: section {key!r} must be a mapping")
    return data


_NO_LITERAL = object()  # a default that is an expression, not a literal: its type is not checked


def parameter_defaults(notebook: Path) -> dict[str, Any]:
    """Name -> default value of every parameter the notebook declares (the literal in its
    ``parameters`` cell; :data:`_NO_LITERAL` where the default is an expression)."""
    import papermill as pm

    defaults = {}
    for name, info in pm.inspect_notebook(str(notebook)).items():
        try:
            defaults[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError, TypeError):
            defaults[name] = _NO_LITERAL
    return defaults


def parameters_for(notebook: Path, params: dict[str, Any], declared: set[str]) -> dict[str, Any]:
    """Shared ``all`` values the notebook declares, overlaid with its own section."""
    own = params.get(notebook.stem, {})
    unknown = sorted(set(own) - declared)
    if unknown:
        raise ParameterFileError(
            f"{notebook.name} has no parameter(s) {', '.join(unknown)}; it declares: {', '.join(sorted(declared))}"
        )
    shared = {k: v for k, v in params.get("all", {}).items() if k in declared}
    return {**shared, **own}


def check_sections(params: dict[str, Any], notebooks: list[Path]) -> None:
    """A section that names none of ``notebooks`` is a typo: fail before anything runs."""
    names = {nb.stem for nb in notebooks} | {"runner", "all"}
    stray = sorted(set(params) - names)
    if stray:
        raise ParameterFileError(
            f"sections {', '.join(stray)} name no notebook; notebooks are: "
            + ", ".join(sorted(names - {"runner", "all"}))
        )


#: Smallest allowed value (of each element, for lists) by parameter name; temperatures and top-k
#: (any name ending in ``temperature(s)`` or ``top_k(s)``) must be >= 0.
AT_LEAST = {
    "threads": 1,
    "batch_size": 1,
    "batch_sizes": 1,
    "max_new_tokens": 1,
    "n_seeds": 1,
    "repeats": 1,
    "n_boot": 1,
    "prompt_tokens": 1,
    "eval_window": 1,
    "max_eval_tokens": 1,
}
NON_NEGATIVE = re.compile(r"(temperatures?|top_ks?)$")
#: Parameters that :func:`check_inputs` checks against this machine.
INPUT_KEYS = {"device", "methods", "confound_methods", "reference", "models"}


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, numbers.Integral):
        return "an integer"
    if isinstance(value, numbers.Real):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return (
        "a list"
        if isinstance(value, (list, tuple))
        else "a mapping"
        if isinstance(value, dict)
        else type(value).__name__
    )


def _fits(value: Any, default: Any) -> bool:
    """Whether ``value`` has the type of ``default`` (an int where a float is expected fits;
    ``None``, YAML's ``null``, always fits: notebooks use it for "no limit" and the like)."""
    if value is None or default is None or default is _NO_LITERAL:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, numbers.Integral):
        return isinstance(value, numbers.Integral)
    if isinstance(default, numbers.Real):
        return isinstance(value, numbers.Real)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple)) and (
            not default or all(any(_fits(v, d) for d in default) for v in value)
        )
    return isinstance(value, type(default))


def check_values(notebook: Path, values: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Types and ranges of ``values`` against the notebook's defaults and :data:`AT_LEAST`;
    ``ParameterFileError`` naming the notebook and key. Needs no models and no network."""
    for key, value in values.items():
        default = defaults.get(key, _NO_LITERAL)
        if not _fits(value, default):
            raise ParameterFileError(
                f"{notebook.name}: {key} must be {_type_name(default)} like "
                f"{reprlib.repr(default)}, got {reprlib.repr(value)}"
            )
        items = value if isinstance(value, (list, tuple)) else [value]
        low = AT_LEAST.get(key, 0 if NON_NEGATIVE.search(key) else None)
        if low is not None:
            bad = [v for v in items if isinstance(v, numbers.Real) and not isinstance(v, bool) and not v >= low]
            if bad:
                raise ParameterFileError(f"{notebook.name}: {key} must be >= {low}, got {bad[0]!r}")


def check_inputs(
    notebook: Path, values: dict[str, Any], timeout_s: float = 5.0, seen_models: dict[str, str | None] | None = None
) -> None:
    """Check ``device``, ``methods`` and ``confound_methods``, ``reference`` and ``models`` of one
    notebook on this machine, without loading anything; ``ParameterFileError`` naming the
    notebook and key. Relative model folders are resolved from the working directory, so call
    it from ``notebooks/`` as :func:`check_plan` does.

    ``seen_models`` (model -> error or ``None``) carries results over from other notebooks, so
    each model is looked up once per run.
    """
    if not INPUT_KEYS & values.keys():
        return  # nothing to check: spare the import of torch
    from .methods import get_method, validate_methods
    from .models import check_available
    from .runtime import resolve_device

    seen = {} if seen_models is None else seen_models

    def reference(name: str) -> None:
        get_method(name)
        if "methods" in values and name not in values["methods"]:
            raise ValueError(f"{name!r} is not one of methods {values['methods']}")

    def models(names: list[str]) -> None:
        if isinstance(names, str) or not names:
            check_available(names)  # raises its one-line error for a string or an empty list
        for name in names:
            key = repr(name)
            if key not in seen:
                try:
                    check_available([name], timeout_s=timeout_s)
                    seen[key] = None
                except ValueError as err:
                    seen[key] = str(err)
            if seen[key]:
                raise ValueError(seen[key])

    checks = {
        "device": resolve_device,
        "methods": validate_methods,
        "confound_methods": validate_methods,
        "reference": reference,
        "models": models,
    }  # in this order: models may ask the network
    for key, check in checks.items():
        if key in values:
            try:
                check(values[key])
            except ValueError as err:
                raise ParameterFileError(f"{notebook.name}: {key}: {err}") from None


def _warn_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def check_plan(
    notebooks: list[Path], params: dict[str, Any], notebooks_dir: Path = NOTEBOOKS_DIR, timeout_s: float = 5.0
) -> list[tuple[Path, dict[str, Any]]]:
    """``(notebook, parameters)`` for each notebook, every value checked (:func:`parameters_for`,
    :func:`check_values`, then :func:`check_inputs` on the values the notebook will use: its
    defaults overlaid with ``params``) before any notebook runs."""
    start = time.perf_counter()
    plan, all_defaults, seen_models = [], [], {}
    for nb in notebooks:
        defaults = parameter_defaults(nb)
        values = parameters_for(nb, params, set(defaults))
        check_values(nb, values, defaults)
        plan.append((nb, values))
        all_defaults.append(defaults)
    with contextlib.chdir(notebooks_dir), warnings.catch_warnings():
        warnings.simplefilter("always")  # e.g. "the Hub cannot be reached", once per model
        warnings.showwarning = _warn_one_line
        for (nb, values), defaults in zip(plan, all_defaults):
            literal = {k: v for k, v in defaults.items() if v is not _NO_LITERAL}
            check_inputs(nb, {**literal, **values}, timeout_s, seen_models)
    print(f"parameters of {len(plan)} notebook(s) checked in {time.perf_counter() - start:.1f} s", flush=True)
    return plan


def prepare_embedded(plan: list[tuple[Path, dict[str, Any]]]) -> None:
    """Prepare every embedded model the plan names that is not prepared yet (the Qwen2.5-Coder
    models are downloaded and converted only here, when a profile uses them), before the first
    notebook runs, so a notebook's time and memory are its own."""
    from .models import EMBEDDED, MANIFEST, models_dir, prepare

    names = {name for _, values in plan for name in values.get("models", []) if name in EMBEDDED}
    for name in [n for n in EMBEDDED if n in names and not (models_dir() / n / MANIFEST).exists()]:
        start = time.perf_counter()
        print(f"preparing {name} (download, join, check, convert to fp32 safetensors)", flush=True)
        prepare(name)
        print(f"prepared {name} in {time.perf_counter() - start:.0f} s", flush=True)


def selected_notebooks(
    params: dict[str, Any], only: list[str] | None, notebooks_dir: Path = NOTEBOOKS_DIR
) -> list[Path]:
    """The numbered notebooks that ``--only`` (or the profile's ``runner.only``) names, all by default."""
    notebooks = numbered_notebooks(notebooks_dir)
    only = only or params.get("runner", {}).get("only")  # a profile may be meant for some notebooks only
    if only:
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(o) for o in only)]
        if not notebooks:
            raise ParameterFileError(f"--only {only} matches no notebook")
    return notebooks


def executed_folder(params: dict[str, Any], executed_dir: Path | None = None) -> Path:
    """Where executed copies go: ``executed_dir``, else the profile's ``runner.executed_dir``, else
    ``build/executed``; relative paths are taken from the repository root."""
    out_dir = Path(executed_dir or params.get("runner", {}).get("executed_dir", "build/executed"))
    return out_dir if out_dir.is_absolute() else REPO_ROOT / out_dir


def run(
    params_file: Path,
    only: list[str] | None = None,
    executed_dir: Path | None = None,
    notebooks_dir: Path = NOTEBOOKS_DIR,
) -> list[dict]:
    """Execute the selected notebooks; return one summary row per notebook.

    Raises ``SystemExit(1)`` at the first failure after printing which notebook and cell.
    """
    import papermill as pm

    params = load_params(params_file)
    check_sections(params, numbered_notebooks(notebooks_dir))
    notebooks = selected_notebooks(params, only, notebooks_dir)
    plan = check_plan(notebooks, params, notebooks_dir)
    prepare_embedded(plan)
    out_dir = executed_folder(params, executed_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by OpenMP when the kernel starts
    summary = []
    for i, (nb, values) in enumerate(plan, 1):
        copy_path = out_dir / nb.name
        print(
            f"[{i}/{len(plan)}] {nb.name} -> {copy_path.relative_to(REPO_ROOT) if copy_path.is_relative_to(REPO_ROOT) else copy_path}",
            flush=True,
        )
        start = time.perf_counter()
        try:
            pm.execute_notebook(
                str(nb),
                str(copy_path),
                parameters=values,
                cwd=str(notebooks_dir),
                kernel_name="python3",
                progress_bar=True,
                log_output=False,
                kernel_manager_class=kernel_manager_class(),
            )
        except pm.PapermillExecutionError as err:
            cell = source_cell_number(copy_path, err.cell_index)
            first_line = (err.source or "").strip().splitlines()[:1]
            print(
                f"\nFAILED: {nb.name}, cell {cell} counting from 1 (first line: {first_line[0] if first_line else ''!r}): "
                f"{err.ename}: {err.evalue}\nThe executed copy with the full traceback is {copy_path}",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(1) from None
        seconds = time.perf_counter() - start
        stamp(copy_path, nb, params_file, values, seconds)
        summary.append({"notebook": nb.name, "seconds": round(seconds, 1)})
        print(f"    done in {seconds:.0f} s", flush=True)
    total = sum(r["seconds"] for r in summary)
    print(f"all {len(summary)} notebook(s) done in {total:.0f} s; executed copies in {out_dir}")
    return summary


@functools.cache
def kernel_manager_class() -> type:
    """The kernel manager for papermill: encrypts the local kernel's channels (CurveZMQ).

    A kernel talking plain TCP prints "Kernel is running over TCP without encryption ..." for
    every notebook; with keys provisioned by the manager (``transport_encryption="auto"``, for
    kernels that declare support, as ipykernel does) it has no reason to. Where pyzmq lacks
    CurveZMQ this is the plain manager, and the kernel keeps its warning.
    """
    import zmq
    from jupyter_client import AsyncKernelManager
    from traitlets import default

    if not zmq.has("curve") or "transport_encryption" not in AsyncKernelManager.class_trait_names():
        return AsyncKernelManager

    class EncryptedKernelManager(AsyncKernelManager):
        @default("transport_encryption")
        def _encrypt_when_supported(self) -> str:
            return "auto"

    return EncryptedKernelManager


def source_cell_number(executed: Path, cell_index: int) -> int:
    """1-based number in the *source* notebook of cell ``cell_index`` of the executed copy
    (papermill inserts an ``injected-parameters`` cell that the source does not have)."""
    try:
        cells = json.loads(executed.read_text())["cells"][:cell_index]
    except (OSError, ValueError, KeyError):
        return cell_index + 1
    injected = sum("injected-parameters" in c.get("metadata", {}).get("tags", []) for c in cells)
    return cell_index - injected + 1


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def final_progress(nb: dict) -> int:
    """Replace each progress bar (a tqdm widget) of an executed notebook by one line of its final
    state, e.g. ``load + evaluate: 100% 36/36 [09:42<00:00, 38.61s/it]``: a saved widget shows its
    first state ("0/36") wherever widgets do not run (GitHub, a static site). Other widgets are
    kept, and so is the saved widget state while any remains. Returns the number replaced."""
    state = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    replaced = 0
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get(WIDGET_VIEW)
            box = state.get(view["model_id"], {}) if view else {}
            children = [state.get(c.removeprefix("IPY_MODEL_"), {}) for c in box.get("state", {}).get("children", [])]
            if not any(c.get("model_name") in ("FloatProgressModel", "IntProgressModel") for c in children):
                continue
            words = [html.unescape(c["state"].get("value", "")) for c in children if c.get("model_name") == "HTMLModel"]
            out["data"] = {"text/plain": " ".join(" ".join(words).replace("\u2007", " ").split())}
            replaced += 1
    if replaced and not any(WIDGET_VIEW in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", [])):
        nb["metadata"].pop("widgets", None)
    return replaced


def _write_notebook(path: Path, nb: dict) -> None:
    """Write an executed copy the way papermill leaves it (one-space indent, UTF-8 as is)."""
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def stamp(executed: Path, source: Path, params_file: Path, values: dict[str, Any], seconds: float) -> None:
    """Record in the executed copy what it was made from (see module docstring), with its progress
    bars at their final counts (:func:`final_progress`)."""
    nb = json.loads(executed.read_text())
    final_progress(nb)
    nb["metadata"]["compendium"] = {
        "source": source.name,
        "source_sha256": source_hash(source),
        "params_file": str(params_file),
        "parameters": values,
        "seconds": round(seconds, 1),
    }
    _write_notebook(executed, nb)


def sync_prose(source: Path, executed: Path) -> bool:
    """Give an executed copy the markdown of its source, outputs untouched, where the two run the
    same code (:func:`source_hash`): a prose edit then needs no re-execution. Markdown cells may be
    added, removed or edited; the code cells, papermill's injected cell and their outputs are kept.
    Returns whether the copy changed; raises if the code differs (that needs a rerun)."""
    src, ex = json.loads(Path(source).read_text()), json.loads(Path(executed).read_text())
    if source_hash(src) != source_hash(ex):
        raise ValueError(f"{executed} was not executed from the code of {source}: rerun it")
    injected = [c for c in ex["cells"] if "injected-parameters" in c.get("metadata", {}).get("tags", [])]
    code = iter(c for c in ex["cells"] if c["cell_type"] == "code" and c not in injected)
    cells = []
    for cell in src["cells"]:
        cells.append(next(code) if cell["cell_type"] == "code" else cell)
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            cells += injected  # where papermill puts its cell: right after the parameters
    if cells == ex["cells"]:
        return False
    ex["cells"] = cells
    _write_notebook(Path(executed), ex)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params" / "default.yaml")
    parser.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 01 03")
    parser.add_argument("--executed-dir", type=Path, help="where executed copies go (overrides the file)")
    parser.add_argument("--sync-prose", action="store_true",
                        help="copy the sources' markdown into the executed copies, without running anything")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        if args.sync_prose:
            params = load_params(args.params)
            folder = executed_folder(params, args.executed_dir)
            for source in selected_notebooks(params, args.only):
                executed = folder / source.name
                if executed.exists() and sync_prose(source, executed):
                    print(f"{executed}: prose synced")
            return 0
        run(args.params, args.only, args.executed_dir)
    except ParameterFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
