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

Notebooks run with ``notebooks/`` as working directory, so relative ``data_dir`` and
``figures_dir`` parameters resolve as they do in JupyterLab. The executed copy of each
notebook is kept in ``executed_dir`` and stamped (``metadata.compendium``) with the hash of
the source notebook's cells, so a test can tell a stale executed copy from a fresh one.
The run stops at the first failing notebook and names the notebook and the cell.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
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
    """sha256 over the type and source of every cell (outputs and metadata ignored)."""
    nb = json.loads(Path(notebook).read_text()) if not isinstance(notebook, dict) else notebook
    digest = hashlib.sha256()
    for cell in nb["cells"]:
        src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            continue  # papermill's injected cell is not part of the source
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


def declared_parameters(notebook: Path) -> set[str]:
    """Names assigned in the notebook's ``parameters`` cell."""
    import papermill as pm

    return set(pm.inspect_notebook(str(notebook)).keys())


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
        raise ParameterFileError(f"sections {', '.join(stray)} name no notebook; notebooks are: "
                                 + ", ".join(sorted(names - {'runner', 'all'})))


def run(params_file: Path, only: list[str] | None = None, executed_dir: Path | None = None,
        notebooks_dir: Path = NOTEBOOKS_DIR) -> list[dict]:
    """Execute the selected notebooks; return one summary row per notebook.

    Raises ``SystemExit(1)`` at the first failure after printing which notebook and cell.
    """
    import papermill as pm

    params = load_params(params_file)
    notebooks = numbered_notebooks(notebooks_dir)
    check_sections(params, notebooks)
    if only:
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(o) for o in only)]
        if not notebooks:
            raise ParameterFileError(f"--only {only} matches no notebook")
    out_dir = Path(executed_dir or params.get("runner", {}).get("executed_dir", "build/executed"))
    out_dir = out_dir if out_dir.is_absolute() else REPO_ROOT / out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    # checked for every notebook before the first one runs
    plan = [(nb, parameters_for(nb, params, declared_parameters(nb))) for nb in notebooks]

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by OpenMP when the kernel starts
    summary = []
    for i, (nb, values) in enumerate(plan, 1):
        target = out_dir / nb.name
        print(f"[{i}/{len(plan)}] {nb.name} -> {target.relative_to(REPO_ROOT) if target.is_relative_to(REPO_ROOT) else target}",
              flush=True)
        start = time.perf_counter()
        try:
            pm.execute_notebook(str(nb), str(target), parameters=values, cwd=str(notebooks_dir),
                                kernel_name="python3", progress_bar=True, log_output=False)
        except pm.PapermillExecutionError as err:
            cell = source_cell_number(target, err.cell_index)
            first_line = (err.source or "").strip().splitlines()[:1]
            print(f"\nFAILED: {nb.name}, cell {cell} counting from 1 (first line: {first_line[0] if first_line else ''!r}): "
                  f"{err.ename}: {err.evalue}\nThe executed copy with the full traceback is {target}",
                  file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        seconds = time.perf_counter() - start
        stamp(target, nb, params_file, values, seconds)
        summary.append({"notebook": nb.name, "seconds": round(seconds, 1)})
        print(f"    done in {seconds:.0f} s", flush=True)
    total = sum(r["seconds"] for r in summary)
    print(f"all {len(summary)} notebook(s) done in {total:.0f} s; executed copies in {out_dir}")
    return summary


def source_cell_number(executed: Path, cell_index: int) -> int:
    """1-based number in the *source* notebook of cell ``cell_index`` of the executed copy
    (papermill inserts an ``injected-parameters`` cell that the source does not have)."""
    try:
        cells = json.loads(executed.read_text())["cells"][:cell_index]
    except (OSError, ValueError, KeyError):
        return cell_index + 1
    injected = sum("injected-parameters" in c.get("metadata", {}).get("tags", []) for c in cells)
    return cell_index - injected + 1


def stamp(executed: Path, source: Path, params_file: Path, values: dict[str, Any], seconds: float) -> None:
    """Record in the executed copy what it was made from (see module docstring)."""
    nb = json.loads(executed.read_text())
    nb["metadata"]["compendium"] = {
        "source": source.name,
        "source_sha256": source_hash(source),
        "params_file": str(params_file),
        "parameters": values,
        "seconds": round(seconds, 1),
    }
    executed.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params" / "default.yaml")
    parser.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 01 03")
    parser.add_argument("--executed-dir", type=Path, help="where executed copies go (overrides the file)")
    args = parser.parse_args(argv)
    try:
        run(args.params, args.only, args.executed_dir)
    except ParameterFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
