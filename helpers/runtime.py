"""Thread control, quiet logging, machine-load readings, the hardware class and a synchronized timer.

Timings on a shared 2-core machine are only comparable when the thread count and the
OpenMP wait policy are fixed and recorded (with another busy process, default OpenMP
spinning made runs up to 3x slower). ``OMP_WAIT_POLICY`` is read by the OpenMP
runtime when it starts, so it must be in the environment *before* Python starts: the
Makefile and :mod:`helpers.runner` export ``OMP_WAIT_POLICY=PASSIVE``.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

CPUINFO = Path("/proc/cpuinfo")
#: CPU flags that decide which kernels torch and bitsandbytes use, recorded in provenance.
SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


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


def cpu_description(cpuinfo: Path = CPUINFO) -> dict[str, Any]:
    """CPU model, vendor, family and model numbers (cpuid), and the SIMD flags (of
    :data:`SIMD_FLAGS`) that decide which kernels run."""
    fields: dict[str, str] = {}
    flags: set[str] = set()
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "flags":
                flags = set(value.split())
            elif key in ("model name", "vendor_id", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
    except OSError:
        pass
    return {
        "cpu": fields.get("model name") or platform.processor() or "unknown",
        "cpu_vendor": fields.get("vendor_id", ""),
        "cpu_family": int(fields["cpu family"]) if fields.get("cpu family", "").isdigit() else None,
        "cpu_model": int(fields["model"]) if fields.get("model", "").isdigit() else None,
        "cpu_flags": sorted(f for f in SIMD_FLAGS if f in flags),
    }


#: Intel family-6 server models by cpuid model number (others are named by their number).
_INTEL_MODELS = {
    0x55: "skylake",  # Skylake-SP, Cascade Lake, Cooper Lake
    0x6A: "icelake",
    0x6C: "icelake",
    0x8F: "sapphirerapids",
    0xCF: "emeraldrapids",
    0xAD: "graniterapids",
    0xAE: "graniterapids",
}


def cpu_family_name(vendor: str, family: int | None, model: int | None, name: str = "") -> str:
    """``vendor-microarchitecture`` of a CPU from its cpuid vendor, family and model numbers:
    ``amd-zen4`` (AMD family 25, model 17), ``amd-zen5`` (family 26), ``intel-sapphirerapids``
    (Intel family 6, model 143). Unknown numbers give ``intel-f6m150``; unknown numbers and no
    numbers at all give the product line from the model name (``intel-xeon``, ``amd-epyc``).
    Two CPUs with the same SIMD flags can still take different kernels at different speeds, so
    the microarchitecture is part of the hardware class."""
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor, "")
    words = [w for w in re.sub(r"\(r\)|\(tm\)|[^a-z0-9 ]", " ", name.lower()).split() if w not in ("intel", "amd")]
    vendor = vendor or ("intel" if "intel" in name.lower() else "amd" if "amd" in name.lower() else "unknown")
    if vendor == "amd" and family is not None and model is not None:
        if family == 23:
            return "amd-zen2" if model >= 0x30 else "amd-zen1"
        if family == 25:
            return (
                "amd-zen4" if (0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF) else "amd-zen3"
            )
        if family == 26:
            return "amd-zen5"
    if vendor == "intel" and family == 6 and model in _INTEL_MODELS:
        return f"intel-{_INTEL_MODELS[model]}"
    if family is not None and model is not None:
        return f"{vendor}-f{family}m{model}"
    return f"{vendor}-{words[0] if words else 'cpu'}"


def cpu_class(flags: Iterable[str]) -> str:
    """``cpu-avx512bf16``, ``cpu-avx512``, ``cpu-avx2`` or ``cpu-generic`` from a CPU's flags
    (the instruction-set part of :func:`hardware_class`).

    AVX512-BF16 gets its own class because bitsandbytes switches its CPU 4-bit path on it: with
    ``bitsandbytes.functional.has_avx512bf16()`` a ``Linear4bit`` repacks its weights for another
    kernel at the first forward. AVX512 and AVX2 decide torch's matmul kernels.
    """
    flags = set(flags)
    if "avx512_bf16" in flags:
        return "cpu-avx512bf16"
    if "avx512f" in flags:
        return "cpu-avx512"
    return "cpu-avx2" if "avx2" in flags else "cpu-generic"


_GPU_VENDOR_WORDS = {"nvidia", "tesla", "geforce", "quadro", "amd", "instinct", "radeon"}
_GPU_PREFIX_WORDS = {"rtx", "gtx", "titan", "pro", "rx"}


def gpu_class(name: str, rocm: bool = False) -> str:
    """``cuda-<short name>`` from a GPU's name: ``NVIDIA H100 80GB HBM3`` -> ``cuda-h100``,
    ``NVIDIA A100-SXM4-40GB`` -> ``cuda-a100``, ``NVIDIA GeForce RTX 4090`` -> ``cuda-rtx4090``
    (``rocm-...`` for AMD GPUs, which torch also calls ``cuda``)."""
    words = [w for w in re.split(r"\s+", name.strip()) if w and w.lower() not in _GPU_VENDOR_WORDS]
    short = ""
    for word in words:
        short += word.split("-")[0].lower()
        if word.lower() not in _GPU_PREFIX_WORDS:
            break
    short = re.sub(r"[^a-z0-9]", "", short) or "unknown"
    return f"{'rocm' if rocm else 'cuda'}-{short}"


def hardware_class(device: str = "cpu", cpuinfo: Path = CPUINFO) -> str:
    """The class of hardware ``device`` computes on: ``cuda-h100``, or on CPU the instruction set
    and the vendor and microarchitecture, ``cpu-avx512bf16-amd-zen4`` (:func:`cpu_class`,
    :func:`cpu_family_name`).

    Results (speed, and on CPU the bitsandbytes kernels and so the exact numbers) are
    comparable within a class; every provenance record carries it. The speed verdicts of notebook
    03 flipped between an Intel Xeon and an AMD EPYC with the same instruction set, hence both parts.
    """
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return "cuda-unavailable"
        return gpu_class(torch.cuda.get_device_name(device), rocm=torch.version.hip is not None)
    cpu = cpu_description(cpuinfo)
    family = cpu_family_name(cpu["cpu_vendor"], cpu["cpu_family"], cpu["cpu_model"], cpu["cpu"])
    return f"{cpu_class(cpu['cpu_flags'])}-{family}"


def resolve_device(device: str) -> str:
    """Validate a device string (``cpu``, ``cuda``, ``cuda:N``) against this machine."""
    if device == "cpu":
        return device
    match = re.fullmatch(r"cuda(?::(\d+))?", device) if isinstance(device, str) else None
    if not match:
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine; use device 'cpu'")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise ValueError(
            f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


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
