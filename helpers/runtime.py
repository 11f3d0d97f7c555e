"""Thread control, quiet logging, machine-load readings and a synchronized timer.

Timings on a shared 2-core machine are only comparable when the thread count and the
OpenMP wait policy are fixed and recorded (REFERENCE: with another busy process, default
OpenMP spinning made runs up to 3x slower). ``OMP_WAIT_POLICY`` is read by the OpenMP
runtime when it starts, so it must be in the environment *before* Python starts: the
Makefile and :mod:`helpers.runner` export ``OMP_WAIT_POLICY=PASSIVE``.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")


def configure_threads(num_threads: int) -> dict[str, Any]:
    """Pin torch to ``num_threads`` intra-op threads and return the settings in force.

    Raises ``ValueError`` for a non-positive count. Warns when the OpenMP wait policy is
    not PASSIVE, since timings are then sensitive to other load on the machine.
    """
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"threads must be a positive integer, got {num_threads!r}")
    torch.set_num_threads(num_threads)
    policy = os.environ.get("OMP_WAIT_POLICY")
    if (policy or "").upper() != "PASSIVE":
        warnings.warn(
            "OMP_WAIT_POLICY is not PASSIVE: timings may be erratic on a shared machine. "
            "Start Jupyter with `OMP_WAIT_POLICY=PASSIVE jupyter lab` or use the Makefile.",
            stacklevel=2,
        )
    return thread_settings()


def thread_settings() -> dict[str, Any]:
    """The thread-related settings that affect timings, for provenance records."""
    return {
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
    }


def machine_load() -> float:
    """One-minute load average: the other work on the machine, to record next to a timing."""
    return os.getloadavg()[0]


def quiet() -> None:
    """Silence per-call log lines and weight-loading progress bars in notebooks.

    bitsandbytes logs "MatMul8bitLt: inputs will be cast ..." on every int8 layer call,
    and transformers draws a progress bar for every ``from_pretrained``.
    """
    from transformers.utils import logging as hf_logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")


def resolve_device(device: str) -> str:
    """Validate a device string (``cpu``, ``cuda``, ``cuda:N``) against this machine."""
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
        return device
    raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")


def synchronize(device: str) -> None:
    """Wait for queued GPU work before reading a timer or a memory counter (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: str = "cpu") -> tuple[float, T]:
    """``(seconds, fn())``: wall time of one call, with queued GPU work finished on both sides
    (so the GPU's asynchronous execution is not mistaken for speed)."""
    synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - t0, result
