"""Measuring speed and memory the way benchmark authors do (notebook 03).

* **Fixed-length generation.** ``min_new_tokens = max_new_tokens``, greedy: every method
  decodes exactly the same number of tokens whatever it predicts (an early EOS would flatter a
  method).
* **Prefill and decode apart.** A :class:`StepClock` passed as a stopping criterion records the
  time after every generated token (the first one marks the end of prefill, i.e. the time to
  first token). Decode speed is ``(N - 1) / (t_N - t_1)``, and one N-token run gives the speed
  of every shorter length too.
* **Warm-up, then repeats.** The first calls are discarded (allocations, kernel selection,
  lazy weight repacking on CPU); the median and the spread of the repeats are reported.
* **Synchronized.** On CUDA, queued work is finished before every clock reading.
* **Memory.** Peak resident memory on CPU (``VmHWM``, reset through ``/proc/self/clear_refs``; NaN
  where the kernel does not support the reset),
  ``max_memory_allocated`` and ``max_memory_reserved`` on CUDA.
* **Roofline.** Decoding one token reads every weight once (plus the KV cache), so a method
  can decode at most ``bandwidth / bytes_per_token`` tokens per second at batch 1
  (:func:`bytes_per_token`, :func:`memory_bandwidth`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .runtime import machine_load, synchronize, timed


class StepClock(StoppingCriteria):
    """A stopping criterion that never stops: it timestamps every decoding step."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.start = 0.0
        self.stamps: list[float] = []

    def reset(self) -> None:
        synchronize(self.device)
        self.stamps = []
        self.start = time.perf_counter()

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class GenerationTiming:
    """One timed fixed-length generation."""

    new_tokens: int
    batch: int
    ttft_s: float  # start -> first token (prefill + first step)
    total_s: float
    step_s: list[float]  # time of each step after the first

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second per sequence after the first token."""
        return (self.new_tokens - 1) / max(self.total_s - self.ttft_s, 1e-12)

    def e2e_tokens_per_s_at(self, n: int) -> float:
        """End-to-end tokens/s (prefill included) of an ``n``-token generation: the first ``n``
        steps of a longer greedy run are the same work as a run of ``n`` tokens."""
        if not 1 <= n <= self.new_tokens:
            raise ValueError(f"n must be in [1, {self.new_tokens}], got {n}")
        return n / max(self.ttft_s + sum(self.step_s[: n - 1]), 1e-12)


def validate(batch_sizes: list[int], max_new_tokens: list[int], repeats: int, warmup: int) -> None:
    """Reject bad benchmark settings with a one-line reason before any model is loaded."""
    for name, values in (("batch_sizes", batch_sizes), ("max_new_tokens", max_new_tokens)):
        if not isinstance(values, (list, tuple)) or not values or not all(isinstance(v, int) and v >= 1 for v in values):
            raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {values!r}")
    if max(max_new_tokens) < 2:
        raise ValueError("max_new_tokens needs a value >= 2 to separate prefill from decoding")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")


def fixed_length_kwargs(tokenizer, new_tokens: int) -> dict[str, Any]:
    """``generate`` arguments for exactly ``new_tokens`` greedy tokens, the same for every method."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                temperature=None, top_p=None, top_k=None)


@torch.inference_mode()
def timed_generate(model, inputs: dict[str, torch.Tensor], tokenizer, new_tokens: int,
                   device: str = "cpu") -> GenerationTiming:
    """Run ``model.generate`` for exactly ``new_tokens`` tokens and time every step."""
    clock = StepClock(device)
    kwargs = fixed_length_kwargs(tokenizer, new_tokens)
    clock.reset()
    out = model.generate(**inputs, **kwargs, stopping_criteria=StoppingCriteriaList([clock]))
    synchronize(device)
    end = time.perf_counter()
    produced = out.shape[1] - inputs["input_ids"].shape[1]
    if produced != new_tokens or len(clock.stamps) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} new tokens, generate produced {produced} "
                           f"({len(clock.stamps)} steps timed)")
    stamps = clock.stamps
    return GenerationTiming(new_tokens, inputs["input_ids"].shape[0], stamps[0] - clock.start, end - clock.start,
                            [b - a for a, b in zip(stamps, stamps[1:])])


def repeat(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[Any]:
    """``warmup`` discarded calls, then ``repeats`` recorded ones (each with the machine load)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        load = machine_load()
        out.append((fn(), load))
    return out


# --------------------------------------------------------------------------- memory
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_SLACK_MIB = 8.0  # after a reset the high-water mark equals the resident size, give or take this
_peak_window = False  # whether VmHWM has counted from a reset that took (see reset_peak_rss)


def _status_mib(field: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` in MiB; None where there is no such file or field."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark and check that the reset took.

    Writing ``5`` to ``/proc/self/clear_refs`` sets ``VmHWM`` to the current ``VmRSS`` (Linux).
    Some kernels and sandboxes refuse the write, and some accept it and do nothing; ``VmHWM``
    then stays the lifetime peak, and a "peak while loading and generating" read from it would
    be wrong. Returns True only if ``VmHWM`` is back near ``VmRSS`` afterwards; otherwise
    :func:`peak_memory` reports NaN until a later reset succeeds.
    """
    global _peak_window
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        _peak_window = False
        return False
    hwm, rss = _status_mib("VmHWM"), _status_mib("VmRSS")
    _peak_window = hwm is not None and rss is not None and hwm - rss <= RESET_SLACK_MIB
    return _peak_window


def rss_mib(field: str = "VmRSS") -> float:
    """Current (``VmRSS``) or peak (``VmHWM``: since the last reset, or over the process's life
    where resets do not work, see :func:`reset_peak_rss`) resident memory, MiB."""
    value = _status_mib(field)
    if value is not None:
        return value
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # fallback: lifetime peak


def reset_peak_memory(device: str) -> bool:
    """Start a new peak-memory window on ``device`` (CUDA counters, or RSS on CPU).

    False where the CPU high-water mark cannot be reset (then the CPU peak is NaN)."""
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return reset_peak_rss()


def peak_memory(device: str) -> dict[str, float]:
    """Peak memory since :func:`reset_peak_memory`, MiB, under the names the plots use.

    On CPU, NaN if the last reset did not take: a lifetime peak is not what the plots mean."""
    if device.startswith("cuda"):
        synchronize(device)
        return {"max_memory_allocated_MiB": torch.cuda.max_memory_allocated(device) / 2**20,
                "max_memory_reserved_MiB": torch.cuda.max_memory_reserved(device) / 2**20}
    return {"peak_rss_MiB": rss_mib("VmHWM") if _peak_window else float("nan")}


# --------------------------------------------------------------------------- roofline
def memory_bandwidth(size_mib: int = 256, repeats: int = 5, device: str = "cpu") -> dict[str, float]:
    """Measured memory bandwidth, GB/s (1e9 bytes): the best of ``repeats``.

    *read*: ``x.sum()`` reads every byte once (what decoding does to the weights);
    *copy*: ``y.copy_(x)`` reads and writes (counted as 2 bytes moved per byte).
    Use arrays much larger than the last-level cache.
    """
    n = size_mib * 2**20 // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    best = {"read_GBps": 0.0, "copy_GBps": 0.0}
    for _ in range(repeats + 1):  # the first round is warm-up (page faults)
        read_s, _ = timed(x.sum, device)
        copy_s, _ = timed(lambda: y.copy_(x), device)
        best["read_GBps"] = max(best["read_GBps"], x.nbytes / read_s / 1e9)
        best["copy_GBps"] = max(best["copy_GBps"], 2 * x.nbytes / copy_s / 1e9)
    return best


def kv_cache_bytes(config, context_tokens: int, bytes_per_value: int) -> int:
    """Bytes of keys and values of ``context_tokens`` positions for one sequence."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * head_dim * context_tokens * bytes_per_value


def bytes_per_token(weight_bytes: int, input_embedding_bytes: int, tied_embeddings: bool, kv_bytes: int) -> int:
    """Bytes read from memory to decode one token at batch 1.

    Every weight is read once per step (quantized payload + its quantization state + the
    layers left unquantized), except the input embedding table, of which a lookup reads one
    row, unless it is tied to the output head, which reads all of it. Plus the KV cache.
    """
    if min(weight_bytes, input_embedding_bytes, kv_bytes) < 0 or input_embedding_bytes > weight_bytes:
        raise ValueError("byte counts must be >= 0 and the embedding part of the weights")
    return weight_bytes - (0 if tied_embeddings else input_embedding_bytes) + kv_bytes


def release_memory(device: str = "cpu") -> None:
    """Return freed memory to the operating system after a model is deleted, so the next
    model's resident-memory reading does not start from the previous one's leftovers."""
    import ctypes
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: readings then include the allocator's cache
