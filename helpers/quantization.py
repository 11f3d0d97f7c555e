"""Codebooks, block-wise round trips and the bits and bytes of quantized models.

Three concerns of notebook 01 (and later 06) that are worth testing on their own:

* **Codebooks.** The 16 values a 4-bit code can take. NF4 and FP4 come from bitsandbytes
  itself; int4 and the N(0,1)-quantile construction of NF4 (QLoRA, Appendix E) are rebuilt
  here with ``torch.special.ndtri`` because bitsandbytes 0.50.2's ``get_4bit_type("int4")``
  raises on CPU and its ``create_normal_map`` needs scipy.
* **Round trips.** Quantize a real weight matrix and dequantize it with bitsandbytes'
  functional API, the same kernels the ``Linear4bit``/``Linear8bitLt`` layers use.
* **Accounting.** The bytes a quantized model really holds, quantization state included
  (``get_memory_footprint()`` omits the 4-bit absmax and the int8 ``SCB`` tensors), and the
  bits per parameter that follow.
* **Teaching measures.** Useful levels of a codebook and how evenly real weights use them, one
  block traced step by step, what double quantization does to the scales, signal-to-quantization
  -noise ratios, where the squared error comes from, and weight-only simulation of a method inside
  a float model. The GGUF grids the embedded baselines sit on are in :mod:`helpers.gguf`.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

BLOCKSIZE = 64  # bitsandbytes' default for 4-bit weights (QLoRA)
NESTED_BLOCKSIZE = 256  # second-level block of double quantization

ROUNDTRIP_METHODS = ("int8", "nf4", "nf4-dq", "fp4", "fp4-dq")


# --------------------------------------------------------------------------- codebooks
def codebook(name: str) -> torch.Tensor:
    """The 16 sorted values of a 4-bit data type, normalised to [-1, 1].

    ``nf4`` and ``fp4`` are read from bitsandbytes; ``int4`` is the symmetric integer code
    bitsandbytes defines (``-7 ... 7`` over 7, so 15 distinct values, zero twice).
    """
    import bitsandbytes.functional as F

    if name in ("nf4", "fp4"):
        values = F.get_4bit_type(name, device="cpu")
    elif name == "int4":
        values = torch.arange(7, -8, -1, dtype=torch.float32).tolist() + [0.0]
        values = torch.tensor(values) / 7.0
    else:
        raise ValueError(f"unknown 4-bit type {name!r}; choose nf4, fp4 or int4")
    return values.float().sort().values


def normal_float_levels(offset: float = 0.9677083) -> torch.Tensor:
    """NF4 rebuilt from N(0,1) quantiles, as QLoRA and bitsandbytes construct it.

    8 positive levels are the quantiles at ``linspace(offset, 0.5, 9)[:-1]`` and 7 negative
    ones at ``linspace(offset, 0.5, 8)[:-1]``, plus an exact zero; then divided by the maximum.
    The asymmetry (8 positive, 7 negative) is what buys the exact zero.
    """
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (values / values.max()).float()


def normal_quantiles(n: int = 16) -> torch.Tensor:
    """Equal-probability quantiles of N(0,1) at ``(i + 0.5) / n``, scaled to a maximum of 1.

    The "ideal" code for normally distributed weights against which a codebook is drawn.
    """
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    q = torch.special.ndtri(p)
    return (q / q.abs().max()).float()


def level_groups(values: torch.Tensor, tol: float) -> list[tuple[float, int]]:
    """``(centre, number of values)`` of each level a codebook can really tell apart: sorted values
    closer than ``tol`` to their neighbour count as one (single linkage). FP4's +0, -0 and +-0.0052
    become one level of 4 codes."""
    v = values.detach().double().flatten().sort().values.numpy()
    groups = np.split(v, np.flatnonzero(np.diff(v) >= tol) + 1) if v.size else []
    return [(float(g.mean()), len(g)) for g in groups]


def distinct_levels(values: torch.Tensor, tol: float) -> int:
    """How many levels :func:`level_groups` finds."""
    return len(level_groups(values, tol))


def worst_rounding_error(values: torch.Tensor) -> float:
    """Largest round-to-nearest error of a codebook on [-1, 1], in units of the absmax: half the
    widest gap between neighbouring values (NF4: (1 - 0.6962) / 2 below -0.70; FP4: (1 - 0.6667) / 2)."""
    v = values.detach().double().flatten().unique()
    if v.numel() < 2:
        raise ValueError("a codebook needs at least two distinct values")
    return float(v.diff().max() / 2)


def code_indices(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The 4-bit code index of each of the first ``n`` weights in bitsandbytes' packing: two
    indices per byte, the first weight in the high nibble (``quantize_4bit`` on every backend)."""
    flat = packed.detach().reshape(-1).view(torch.uint8).long()
    idx = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    if n > idx.numel():
        raise ValueError(f"{packed.numel()} bytes hold {idx.numel()} codes, not {n}")
    return idx[:n]


def usage_entropy_bits(counts: torch.Tensor) -> float:
    """Shannon entropy in bits of how often each code is used; ``2**H`` is the number of equally
    used levels the code is worth (4 bits, 16 levels, at best)."""
    c = counts.detach().double().flatten()
    if not (c >= 0).all() or c.sum() <= 0:
        raise ValueError("counts must be non-negative with a positive sum")
    p = c[c > 0] / c.sum()
    return float(-(p * p.log2()).sum())


# --------------------------------------------------------------------------- round trips
@dataclass
class RoundTrip:
    """A weight matrix after quantize -> dequantize, with what the quantized form stores."""

    method: str
    dequantized: torch.Tensor
    payload_bytes: int  # the packed codes
    state_bytes: int  # absmax / SCB and nested statistics

    @property
    def bits_per_parameter(self) -> float:
        return 8 * (self.payload_bytes + self.state_bytes) / self.dequantized.numel()


def roundtrip(weight: torch.Tensor, method: str, blocksize: int = BLOCKSIZE) -> RoundTrip:
    """Quantize ``weight`` (2-D float) with bitsandbytes and dequantize it again.

    ``int8`` is the weight format of LLM.int8(): one absmax scale per output row
    (``int8_vectorwise_quant``); its outlier decomposition acts on activations, not
    weights, so ``int8`` and ``int8-noout`` share this round trip. The 4-bit methods use
    ``quantize_4bit`` with absmax blocks of ``blocksize`` and, for ``-dq``, 8-bit absmax.
    """
    import bitsandbytes.functional as F

    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(weight.shape)}")
    w = weight.detach().float().cpu().contiguous()
    if method in ("int8", "int8-noout"):
        codes, scales, _ = F.int8_vectorwise_quant(w.half())
        deq = codes.float() * scales.float()[:, None] / 127.0
        return RoundTrip(method, deq, codes.numel() * codes.element_size(), _nbytes(scales))
    if method in ("nf4", "nf4-dq", "fp4", "fp4-dq"):
        packed, state = F.quantize_4bit(
            w, blocksize=blocksize, quant_type=method[:3], compress_statistics=method.endswith("-dq")
        )
        deq = F.dequantize_4bit(packed, state)
        return RoundTrip(method, deq, _nbytes(packed), quant_state_bytes(state))
    raise ValueError(f"no round trip for {method!r}; choose one of {', '.join(ROUNDTRIP_METHODS)}")


def error_stats(weight: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius, mean absolute and maximum absolute error of ``approx``."""
    w, a = weight.float(), approx.float()
    diff = a - w
    return {
        "rel_frobenius_error": (diff.norm() / w.norm()).item(),
        "mean_abs_error": diff.abs().mean().item(),
        "max_abs_error": diff.abs().max().item(),
    }


def sqnr_db(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||w||^2 / ||w - w_hat||^2)`` in dB (inf if
    exact). About 6.02 dB per bit for a uniform quantizer; it equals ``-20 log10`` of the relative
    Frobenius error."""
    noise = WeightNoise()
    noise.add(weight, approx)
    return noise.sqnr_db


@dataclass
class WeightNoise:
    """Signal and quantization-noise energy summed over many weight matrices."""

    signal: float = 0.0  # sum of w^2
    noise: float = 0.0  # sum of (w - w_hat)^2
    count: int = 0  # weights added

    def add(self, weight: torch.Tensor, approx: torch.Tensor) -> None:
        """Add one matrix and its quantized approximation (float32 dot products per matrix,
        summed in Python floats: 3x faster than float64 copies, the same dB to 1e-5)."""
        if weight.shape != approx.shape:
            raise ValueError(f"shapes differ: {tuple(weight.shape)} vs {tuple(approx.shape)}")
        w = weight.detach().float().flatten()
        d = approx.detach().float().flatten().to(w.device) - w
        self.signal += float(torch.dot(w, w))
        self.noise += float(torch.dot(d, d))
        self.count += w.numel()

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        return 10 * math.log10(self.signal / self.noise)


@dataclass
class BlockTrace:
    """One block quantized by hand: what each step of absmax quantization produces."""

    weights: torch.Tensor  # the block as given
    absmax: float  # its largest |weight|: the scale, stored in fp32
    scaled: torch.Tensor  # weights / absmax, in [-1, 1]
    index: torch.Tensor  # position of the nearest value in the sorted codebook
    code_value: torch.Tensor  # that value
    dequantized: torch.Tensor  # code_value * absmax

    @property
    def error(self) -> torch.Tensor:
        return self.dequantized - self.weights


def trace_block(block: torch.Tensor, code: torch.Tensor) -> BlockTrace:
    """Quantize one block step by step: absmax -> scale to [-1, 1] -> nearest code value
    (round to nearest, ties to the lower value as ``torch.bucketize`` does in bitsandbytes) ->
    dequantize. ``code`` is a codebook such as :func:`codebook`."""
    w = block.detach().float().flatten()
    values = code.detach().float().flatten().sort().values
    absmax = float(w.abs().max())
    if absmax == 0:
        raise ValueError("an all-zero block has no scale")
    scaled = w / absmax
    index = (scaled[:, None] - values[None, :]).abs().argmin(dim=1)
    return BlockTrace(w, absmax, scaled, index, values[index], values[index] * absmax)


def double_quant_absmax(
    weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's absmax as bitsandbytes stores it without double quantization (fp32, exact)
    and with it (the layer's mean absmax ``offset`` subtracted, then an 8-bit dynamic code with one
    fp32 scale per ``NESTED_BLOCKSIZE`` blocks), both as fp32 values. Their ratio is how much double quantization moves a scale."""
    import bitsandbytes.functional as F

    w = weight.detach().float().cpu().contiguous()
    _, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    nested = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    flat = w.reshape(-1)
    n = flat.numel() // blocksize * blocksize
    exact = flat[:n].view(-1, blocksize).abs().amax(dim=1)
    if n < flat.numel():
        exact = torch.cat([exact, flat[n:].abs().amax().reshape(1)])
    return exact, nested.float()


def scale_absmax(weight: torch.Tensor, method: str, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """Per-element absmax of the group that shares one scale: the output row for ``int8``
    (vector-wise), the flat block of ``blocksize`` for the 4-bit methods."""
    if method in ("int8", "int8-noout"):
        w = weight.detach().float()
        return w.abs().amax(dim=1, keepdim=True).expand_as(w)
    if method in ("nf4", "nf4-dq", "fp4", "fp4-dq"):
        return block_absmax(weight, blocksize)
    raise ValueError(f"no scale group for {method!r}; choose one of {', '.join(ROUNDTRIP_METHODS)}")


def error_by_position(position: np.ndarray, error: np.ndarray, bins: np.ndarray):
    """Round-trip error binned by position (weight / its scale's absmax): per bin the number of
    weights, their mean |error|, and the bin's share of the total squared error (sums to 1).
    The mean says how badly a weight there is rounded; the share says where the error *is*."""
    import pandas as pd

    pos, err = np.asarray(position, float).ravel(), np.asarray(error, float).ravel()
    if pos.shape != err.shape:
        raise ValueError("position and error must have the same number of elements")
    nb = len(bins) - 1
    idx = np.clip(np.digitize(pos, bins) - 1, 0, nb - 1)
    count = np.bincount(idx, minlength=nb)
    abs_sum = np.bincount(idx, np.abs(err), nb)
    sq_sum = np.bincount(idx, err**2, nb)
    total = sq_sum.sum()
    return pd.DataFrame(
        {
            "bin_center": (bins[:-1] + bins[1:]) / 2,
            "count": count,
            "mean_abs_error": np.where(count > 0, abs_sum / np.maximum(count, 1), np.nan),
            "share_of_squared_error": sq_sum / total if total > 0 else np.zeros(nb),
        }
    )


def block_absmax(weight: torch.Tensor, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """Per-element absmax of the flat block of ``blocksize`` each element falls in."""
    flat = weight.detach().float().reshape(-1)
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    amax = blocks.abs().amax(dim=1, keepdim=True).expand_as(blocks).reshape(-1)
    return amax[: flat.numel()].view_as(weight)


def distinct_values_per_block(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Number of distinct values in each flat block of ``blocksize`` consecutive weights.

    A GGUF Q4 block of 32 holds at most 16 distinct values; counting them shows the grid a
    GGUF-derived "full-precision" baseline already sits on.
    """
    flat = weight.detach().reshape(-1)
    n = flat.numel() // blocksize * blocksize
    blocks = flat[:n].view(-1, blocksize).sort(dim=1).values
    return 1 + (blocks[:, 1:] != blocks[:, :-1]).sum(dim=1)


# --------------------------------------------------------------------------- weight-only simulation
def quantizable_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The ``nn.Linear`` layers a bitsandbytes load quantizes: every one except the output
    embedding (``lm_head``: tied to the token embedding in SmolLM2 and Gemma-3, its own matrix in
    Qwen2.5-Coder)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


@contextlib.contextmanager
def weight_only(model: torch.nn.Module, method: str, blocksize: int = BLOCKSIZE) -> Iterator[WeightNoise]:
    """Inside the ``with`` block, every layer of :func:`quantizable_linears` holds the round trip
    of its weight through ``method`` while activations stay in the model's float dtype: a
    weight-only simulation of ``method``. The original weights are back on exit. Yields the
    :class:`WeightNoise` summed over the replaced weights."""
    layers = quantizable_linears(model)
    originals: dict[str, torch.Tensor] = {}
    noise = WeightNoise()
    with tempfile.TemporaryDirectory(prefix="weight-only-") as spill:
        try:
            for i, (name, layer) in enumerate(layers.items()):
                w = layer.weight.data
                approx = roundtrip(w, method, blocksize).dequantized.to(device=w.device, dtype=w.dtype)
                noise.add(w, approx)
                originals[name] = _spilled(w, f"{spill}/{i}") if w.device.type == "cpu" else w
                layer.weight.data = approx
            yield noise
        finally:
            for name, w in originals.items():
                layers[name].weight.data = w.clone() if w.device.type == "cpu" else w


def _spilled(t: torch.Tensor, path: str) -> torch.Tensor:
    """A copy of CPU tensor ``t`` in a memory-mapped file: page cache the system can drop, not
    process memory. The originals of a 1.5B model's linear layers are 5 GiB in fp32, which would
    otherwise sit beside their round trips for the whole weight-only simulation."""
    copy = torch.from_file(path, shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
    copy.copy_(t)
    return copy


def dequantized_linears(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(module name, float32 weight)`` of every bitsandbytes ``Linear4bit`` / ``Linear8bitLt``
    in ``model``, dequantized from what it stores. Call it before the first forward: on CPUs with
    AVX512-BF16, bitsandbytes repacks 4-bit weights at the first forward (then this raises)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                raise ValueError(
                    f"{name}: 4-bit weights were repacked for the CPU kernel; dequantize before the first forward"
                )
            yield name, F.dequantize_4bit(module.weight.data, state).float().cpu()
        elif isinstance(module, bnb.nn.Linear8bitLt):
            w = module.weight
            yield name, (w.data.float() * w.SCB.float()[:, None] / 127.0).cpu()


def cpu_fused_4bit(model: torch.nn.Module) -> bool:
    """Whether ``model``'s 4-bit layers take bitsandbytes' fused CPU kernel: on CPUs with
    AVX512-BF16, ``Linear4bit`` repacks its weights at the first forward and multiplies in bf16
    with bf16 absmax values, so its output differs from dequantize + float matmul."""
    import bitsandbytes as bnb

    return any(
        isinstance(m, bnb.nn.Linear4bit)
        and getattr(m, "support_avx512bf16_for_cpu", False)
        and m.weight.device.type == "cpu"
        for m in model.modules()
    )


def use_dequantize_path(model: torch.nn.Module) -> int:
    """Make every ``Linear4bit`` of ``model`` dequantize its weights to the compute dtype and use
    a plain matmul on CPU (what bitsandbytes does on CPUs without AVX512-BF16); call it before
    the first forward. Returns the number of layers changed."""
    import bitsandbytes as bnb

    changed = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            if getattr(m.weight.quant_state, "packing_format_for_cpu", False):
                raise ValueError("4-bit weights were already repacked by a forward pass")
            changed += bool(getattr(m, "support_avx512bf16_for_cpu", False))
            m.support_avx512bf16_for_cpu = False
    return changed


# --------------------------------------------------------------------------- accounting
def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def quant_state_bytes(state) -> int:
    """Bytes of a bitsandbytes 4-bit ``QuantState``: absmax, code, and the nested state."""
    total = _nbytes(state.absmax) + _nbytes(getattr(state, "code", None))
    if getattr(state, "nested", False):
        total += _nbytes(state.offset) + _nbytes(state.state2.absmax) + _nbytes(state.state2.code)
    return total


def bits_per_parameter_4bit(
    double_quant: bool, blocksize: int = BLOCKSIZE, nested_blocksize: int = NESTED_BLOCKSIZE
) -> float:
    """Nominal bits per weight of a 4-bit layer, block statistics included.

    ``4 + 32/64 = 4.5`` without double quantization, ``4 + 8/64 + 32/(64*256) ~ 4.127``
    with it (QLoRA, Section 3). Codebooks and offsets are per layer and negligible.
    """
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)
    return 4 + 32 / blocksize


@dataclass
class StorageReport:
    """What a loaded model holds in memory, split the way the compendium reports it."""

    quantized_params: int  # weights inside quantized Linear layers
    quantized_payload_bytes: int  # their packed codes
    quant_state_bytes: int  # absmax / SCB / nested statistics
    other_params: int  # embeddings, norms, biases, lm_head (tied counted once), float Linear
    other_bytes: int  # their bytes, plus buffers such as rotary tables

    @property
    def total_bytes(self) -> int:
        return self.quantized_payload_bytes + self.quant_state_bytes + self.other_bytes

    @property
    def bits_per_quantized_parameter(self) -> float:
        if not self.quantized_params:
            return float("nan")
        return 8 * (self.quantized_payload_bytes + self.quant_state_bytes) / self.quantized_params

    @property
    def total_params(self) -> int:
        return self.quantized_params + self.other_params


def storage_report(model: torch.nn.Module) -> StorageReport:
    """Walk ``model`` and count every tensor it holds once (tied weights de-duplicated).

    For 4-bit layers the parameter count comes from the quantization state's shape, not
    from ``numel()`` of the packed tensor, which reports half of it (transformers#25978).
    Call it before the first forward: some bitsandbytes CPU kernels repack weights then.
    """
    import bitsandbytes as bnb

    seen: set[tuple[int, int]] = set()

    def count(t: torch.Tensor | None) -> int:
        if t is None or not isinstance(t, torch.Tensor):
            return 0
        key = (t.data_ptr(), _nbytes(t))
        if key in seen:
            return 0
        seen.add(key)
        return _nbytes(t)

    q_params = q_payload = q_state = o_params = o_bytes = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            q_params += int(torch.Size(w.quant_state.shape).numel())
            q_payload += count(w)
            st = w.quant_state
            q_state += count(st.absmax) + count(st.code)
            if st.nested:
                q_state += count(st.offset) + count(st.state2.absmax) + count(st.state2.code)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            w = module.weight
            q_params += w.numel()
            q_payload += count(w)
            q_state += count(getattr(w, "SCB", None))
        # everything else the module owns directly: biases, norms, embeddings, float Linear
        # weights, and buffers (bytes only: a rotary table is not a parameter)
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and name == "weight":
                continue
            nbytes = count(p)
            o_params += p.numel() if nbytes else 0
            o_bytes += nbytes
        for b in module.buffers(recurse=False):
            o_bytes += count(b)
    return StorageReport(q_params, q_payload, q_state, o_params, o_bytes)


def total_bits(
    quantized_payload_bytes: int,
    quant_state_bytes: int,
    other_params: int,
    other_bits: int | None = None,
    other_bytes: int | None = None,
) -> int:
    """Total model bits: quantized payload + quantization state + the unquantized parameters,
    either as stored (``other_bytes``) or as if held at ``other_bits`` each (e.g. 16, as deployed
    on a GPU where the non-quantized layers are bf16)."""
    if (other_bits is None) == (other_bytes is None):
        raise ValueError("give exactly one of other_bits and other_bytes")
    other = other_bytes * 8 if other_bytes is not None else other_params * other_bits
    return 8 * (quantized_payload_bytes + quant_state_bytes) + other
