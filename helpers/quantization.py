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
"""

from __future__ import annotations

from dataclasses import dataclass

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


# --------------------------------------------------------------------------- accounting
def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def quant_state_bytes(state) -> int:
    """Bytes of a bitsandbytes 4-bit ``QuantState``: absmax, code, and the nested state."""
    total = _nbytes(state.absmax) + _nbytes(getattr(state, "code", None))
    if getattr(state, "nested", False):
        total += _nbytes(state.offset) + _nbytes(state.state2.absmax) + _nbytes(state.state2.code)
    return total


def bits_per_parameter_4bit(double_quant: bool, blocksize: int = BLOCKSIZE,
                            nested_blocksize: int = NESTED_BLOCKSIZE) -> float:
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


# --------------------------------------------------------------------------- GGUF grids (notebook 06)
#: Quantization step of the GGUF types the embedded models ship in, per block of 32 weights:
#: ("absmax", d) -> step = absmax / d (symmetric types); ("range", d) -> step = (max - min) / d
#: (types with a per-block minimum). K-quants use 32-weight sub-blocks inside 256-weight
#: super-blocks; their sub-block step is approximated the same way.
GGUF_STEPS: dict[str, tuple[str, int]] = {
    "Q4_0": ("absmax", 8), "Q5_0": ("absmax", 16), "Q8_0": ("absmax", 127), "Q6_K": ("absmax", 32),
    "Q3_K": ("absmax", 4), "Q4_1": ("range", 15), "Q5_1": ("range", 31), "Q2_K": ("range", 3),
    "Q4_K": ("range", 15), "Q5_K": ("range", 31),
}


def gguf_step(weight: torch.Tensor, gguf_type: str, block: int = 32) -> torch.Tensor:
    """Per-block quantization step of ``gguf_type`` for ``weight``, one value per weight."""
    if gguf_type not in GGUF_STEPS:
        raise ValueError(f"no step rule for GGUF type {gguf_type!r}; known: {', '.join(GGUF_STEPS)}")
    kind, d = GGUF_STEPS[gguf_type]
    w = weight.detach().float().reshape(-1)
    if w.numel() % block:
        raise ValueError(f"{w.numel()} weights do not split into blocks of {block}")
    b = w.reshape(-1, block)
    step = b.abs().amax(1) / d if kind == "absmax" else (b.amax(1) - b.amin(1)) / d
    return step.repeat_interleave(block).reshape(weight.shape)


def off_grid(weight: torch.Tensor, gguf_type: str, generator: torch.Generator, block: int = 32) -> torch.Tensor:
    """``weight`` plus uniform noise of +-step/2 of its GGUF grid: weights of the same error size
    as the GGUF quantization that produced them, but no longer on its grid."""
    step = gguf_step(weight, gguf_type, block)
    noise = (torch.rand(weight.shape, generator=generator) - 0.5) * step
    return (weight.detach().float() + noise).to(weight.dtype)


def total_bits(quantized_payload_bytes: int, quant_state_bytes: int, other_params: int, other_bits: int | None = None,
               other_bytes: int | None = None) -> int:
    """Total model bits: quantized payload + quantization state + the unquantized parameters,
    either as stored (``other_bytes``) or as if held at ``other_bits`` each (e.g. 16, as deployed
    on a GPU where the non-quantized layers are bf16)."""
    if (other_bits is None) == (other_bytes is None):
        raise ValueError("give exactly one of other_bits and other_bytes")
    other = other_bytes * 8 if other_bytes is not None else other_params * other_bits
    return 8 * (quantized_payload_bytes + quant_state_bytes) + other
