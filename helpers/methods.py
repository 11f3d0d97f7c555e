"""The method registry: every precision the compendium compares, keyed by a short name.

The names follow lit-gpt's ``--quantize bnb.*`` options and the bitsandbytes benchmarks:

========== ============================================================================
name       what the linear layers hold
========== ============================================================================
fp32       float32 weights (the reference)
bf16       bfloat16 weights
fp16       float16 weights
int8       LLM.int8(): int8 weights, vector-wise absmax, outlier columns (|x| >= 6) in 16 bit
int8-noout int8 weights, vector-wise absmax, no outlier decomposition (threshold 0)
nf4        4-bit NormalFloat, absmax per block of 64 stored in fp32
nf4-dq     nf4 with double quantization (absmax in 8 bit, second-level block 256)
fp4        4-bit float E2M1, absmax per block of 64 in fp32
fp4-dq     fp4 with double quantization
========== ============================================================================

**What stays unquantized.** As in Hugging Face (and unlike lit-gpt, which quantized every
Linear), bitsandbytes replaces only the ``nn.Linear`` layers inside the transformer blocks.
The token embedding, the norms and ``lm_head`` (tied to the embedding in both embedded
models) stay in the *compute dtype*. :func:`unquantized_parameters` lists them.

**Compute dtype.** ``"auto"`` means float32 on CPU and bfloat16 (4-bit) / float16 (int8,
as in the LLM.int8() paper) on CUDA. On the CPUs here, bf16/fp16 matmuls are several times
slower than fp32 and 4-bit layers dequantize to the compute dtype on every call, so fp32
compute is the fair CPU setting; pass ``compute_dtype="bfloat16"`` to reproduce GPU practice.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

from .models import resolve
from .runtime import resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Method:
    """One precision setting. ``kind`` decides how the model is loaded."""

    name: str
    kind: Literal["float", "int8", "4bit"]
    description: str
    dtype: str | None = None  # float methods: storage and compute dtype
    quant_type: str | None = None  # 4bit: "nf4" | "fp4"
    double_quant: bool = False
    int8_threshold: float | None = None
    nominal_bits: float = 32.0  # bits per weight of a quantized Linear, quantization state included

    @property
    def quantized(self) -> bool:
        return self.kind != "float"


def _bits_4bit(double_quant: bool, blocksize: int = 64, nested_blocksize: int = 256) -> float:
    # 4 bits per weight + the block's absmax: fp32, or 8 bit + an fp32 absmax per 256 blocks.
    return 4 + (8 / blocksize + 32 / (blocksize * nested_blocksize) if double_quant else 32 / blocksize)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("fp32", "float", "float32 weights (reference)", dtype="float32", nominal_bits=32),
        Method("bf16", "float", "bfloat16 weights", dtype="bfloat16", nominal_bits=16),
        Method("fp16", "float", "float16 weights", dtype="float16", nominal_bits=16),
        Method("int8", "int8", "LLM.int8(): int8 vector-wise + fp16 outlier decomposition at |x|>=6",
               int8_threshold=6.0, nominal_bits=8),
        Method("int8-noout", "int8", "int8 vector-wise, no outlier decomposition (threshold 0)",
               int8_threshold=0.0, nominal_bits=8),
        Method("nf4", "4bit", "4-bit NormalFloat, fp32 absmax per 64", quant_type="nf4",
               nominal_bits=_bits_4bit(False)),
        Method("nf4-dq", "4bit", "nf4 + double quantization of the absmax", quant_type="nf4",
               double_quant=True, nominal_bits=_bits_4bit(True)),
        Method("fp4", "4bit", "4-bit float E2M1, fp32 absmax per 64", quant_type="fp4",
               nominal_bits=_bits_4bit(False)),
        Method("fp4-dq", "4bit", "fp4 + double quantization of the absmax", quant_type="fp4",
               double_quant=True, nominal_bits=_bits_4bit(True)),
    ]
}

#: One colour per method for every figure: quantized variants of one format share a hue, the
#: double-quantized (or no-outlier) twin is its lighter shade.
METHOD_COLORS: dict[str, str] = {
    "fp32": "#222222", "bf16": "#9467bd", "fp16": "#8c564b", "int8": "#2ca02c", "int8-noout": "#98df8a",
    "nf4": "#1f77b4", "nf4-dq": "#7fb2de", "fp4": "#d62728", "fp4-dq": "#f4a09c",
}

#: The methods of the paper, in the order figures use.
PAPER_METHODS = ("bf16", "fp16", "int8", "nf4", "nf4-dq", "fp4", "fp4-dq")


def get_method(name: str) -> Method:
    """The registered method called ``name``; ``ValueError`` listing valid names otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; valid methods are: {', '.join(METHODS)}") from None


def validate_methods(names: list[str] | tuple[str, ...]) -> list[Method]:
    """Check a whole list up front, so a typo fails before any model is loaded."""
    if not names:
        raise ValueError("the list of methods is empty")
    return [get_method(n) for n in names]


def compute_dtype_for(method: Method, device: str, compute_dtype: str = "auto") -> torch.dtype:
    """The dtype of activations and unquantized modules for ``method`` on ``device``."""
    if method.kind == "float":
        return DTYPES[method.dtype]  # type: ignore[index]
    if compute_dtype == "auto":
        if device == "cpu":
            return torch.float32
        return torch.float16 if method.kind == "int8" else torch.bfloat16
    try:
        return DTYPES[compute_dtype]
    except KeyError:
        raise ValueError(f"compute_dtype must be 'auto' or one of {', '.join(DTYPES)}, got {compute_dtype!r}") from None


def quantization_config(method: Method, compute: torch.dtype):
    """The ``BitsAndBytesConfig`` for ``method`` (``None`` for float methods)."""
    from transformers import BitsAndBytesConfig

    if method.kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=method.int8_threshold)
    if method.kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=method.quant_type,
            bnb_4bit_use_double_quant=method.double_quant,
            bnb_4bit_compute_dtype=compute,
        )
    return None


def load_tokenizer(model: str):
    """The tokenizer of ``model`` (embedded name, folder or Hub id), read once per process.

    Reading Gemma-3's 262k-entry ``tokenizer.json`` takes ~4 s, more than loading and quantizing
    its weights, and notebooks load each model once per method, so every method shares one.
    Nothing in the compendium modifies a tokenizer after its pad token is set here.
    """
    return _tokenizer(str(resolve(model)))


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load(model: str, method: str, device: str = "cpu", compute_dtype: str = "auto",
         int8_threshold: float | None = None):
    """Load ``model`` quantized with ``method`` on ``device``; return ``(model, tokenizer)``.

    ``model`` is an embedded name, a local folder or a Hub id (see :func:`helpers.models.resolve`).
    Bad names fail here, before anything is read. The model is returned in eval mode.
    ``int8_threshold`` overrides the outlier threshold of an int8 method (notebook 05's sweep).
    """
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    spec = get_method(method)
    if int8_threshold is not None:
        if spec.kind != "int8" or not int8_threshold >= 0:
            raise ValueError(f"int8_threshold needs an int8 method and a value >= 0, got {method!r}, {int8_threshold!r}")
        spec = replace(spec, int8_threshold=float(int8_threshold))
    device = resolve_device(device)
    dtype = compute_dtype_for(spec, device, compute_dtype)
    path = resolve(model)
    tokenizer = _tokenizer(str(path))  # see load_tokenizer
    net = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        quantization_config=quantization_config(spec, dtype),
        device_map={"": device},
        low_cpu_mem_usage=True,
    )
    net.eval()
    return net, tokenizer


def layer_summary(model: torch.nn.Module) -> dict[str, dict[str, str]]:
    """Module class and weight dtype of every module that owns a ``weight``, by class.

    Used by tests and notebooks to show what a method actually produced.
    """
    seen: dict[str, dict[str, str]] = {}
    for _, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not list(module.children()):
            cls = type(module).__name__
            seen.setdefault(cls, {"weight_dtype": str(weight.dtype).replace("torch.", ""), "count": "0"})
            seen[cls]["count"] = str(int(seen[cls]["count"]) + 1)
    return seen


def unquantized_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Modules left in floating point by a quantized load, with their parameter counts.

    Tied parameters (``lm_head`` sharing the embedding) are counted once, under the first
    module that owns them.
    """
    import bitsandbytes as bnb

    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    out: dict[str, int] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, quantized) or list(module.children()):
            continue
        for p in module.parameters(recurse=False):
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            out[name] = out.get(name, 0) + p.numel()
    return out
