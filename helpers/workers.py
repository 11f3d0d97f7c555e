"""Spread the resumable units of notebooks 02 and 04 over several processes or machines.

Both notebooks cut their work into units (a model x method, ...) that a
:class:`helpers.store.ResultStore` keeps the moment each is finished. Started with
``accelerate launch``, this module gives every process its share of the pending units; a
process never computes a unit that is already stored, and the notebooks, run afterwards as usual,
only consolidate what the store holds::

    accelerate launch --multi_gpu --num_processes 8 -m helpers.workers --params params/gpu-example.yaml --only 02 04
    python -m helpers.runner --params params/gpu-example.yaml    # finds every unit stored

Several machines sharing one file system (or SLURM, one task per node): the same command with
``--num_machines N --machine_rank R --main_process_ip HOST --main_process_port PORT``. Without
GPUs, ``--multi_gpu`` still starts the processes (through torchrun) and they share CPU work. On GPUs every process works on its
own device (``cuda:<local rank>``). Speed timings (notebook 03) are never spread this way: two
processes timing on one device would measure each other.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from . import REPO_ROOT

U = TypeVar("U")


class Workers:
    """This process's place among those started by ``accelerate launch`` (alone otherwise)."""

    def __init__(self) -> None:
        import torch
        from accelerate import PartialState

        # without a GPU, processes started by torchrun (accelerate's --multi_gpu) share out CPU work
        self.state = PartialState(cpu=not torch.cuda.is_available())

    @property
    def index(self) -> int:
        return self.state.process_index

    @property
    def count(self) -> int:
        return self.state.num_processes

    def share(self, units: Sequence[U]) -> list[U]:
        """Every ``count``-th unit, starting at this process's index (units of one model spread out)."""
        return list(units[self.index :: self.count])

    def wait(self) -> None:
        """Wait until every process reaches this point (units one phase needs are then stored)."""
        self.state.wait_for_everyone()

    def device(self, device: str) -> str:
        """This process's own GPU when ``device`` is CUDA; ``device`` unchanged otherwise."""
        return str(self.state.device) if device.startswith("cuda") else device


def notebook_values(params_file: Path, notebook: str) -> dict[str, Any]:
    """A notebook's parameters as the runner would pass them: its defaults overlaid with the file."""
    from . import runner

    path = runner.NOTEBOOKS_DIR / f"{notebook}.ipynb"
    params = runner.load_params(params_file)
    defaults = runner.parameter_defaults(path)
    return {**defaults, **runner.parameters_for(path, params, set(defaults))}


def _text_study(values: dict[str, Any], progress: Callable | None):
    from .textscore import TextConfig, TextStudy

    return TextStudy(TextConfig.from_parameters(values), values["text_store_dir"], progress)


def _sweep(values: dict[str, Any], progress: Callable | None):
    from .sweep import Sweep, SweepConfig

    return Sweep(SweepConfig.from_parameters(values), values["store_dir"], progress)


STUDIES = {"02_sampling_sweep": _sweep, "04_temperature_sensitivity": _text_study}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params/default.yaml"))
    parser.add_argument("--only", nargs="*", default=["02", "04"], help="notebook numbers (02 and/or 04)")
    args = parser.parse_args(argv)
    params_file = args.params.resolve()
    names = [n for n in STUDIES if n[:2] in args.only]
    if not names:
        parser.error(f"--only must name 02 and/or 04, got {args.only}")
    workers = Workers()
    os.chdir(REPO_ROOT / "notebooks")  # relative paths in parameters resolve as in the notebooks
    for name in names:
        values = notebook_values(params_file, name)
        values["device"] = workers.device(values.get("device", "cpu"))
        study = STUDIES[name](values, None if workers.index == 0 else _silent)
        study.run(workers)
        print(f"[process {workers.index}/{workers.count}] {name}: done")
        workers.wait()
    return 0


class _silent:
    """A progress bar that shows nothing (only the first process draws one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
