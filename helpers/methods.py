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
The token embedding, the norms and ``lm_head`` (tied to the embedding in SmolLM2 and Gemma-3,
a separate matrix as large as the embedding in Qwen2.5-Coder) stay in the *compute dtype*. :func:`unquantized_parameters` lists them.

**Compute dtype.** ``"auto"`` means float32 on CPU and bfloat16 (4-bit) / float16 (int8,
as in the LLM.int8() paper) on CUDA. On the CPUs here, bf16/fp16 matmuls are several times
slower than fp32 and 4-bit layers dequantize to the compute dtype on every call, so fp32
compute is the fair CPU setting; pass ``compute_dtype="bfloat16"`` to reproduce GPU practice.

**Models larger than one device.** :func:`load` places the whole model on ``device`` by
default. ``device_map="auto"`` (with ``max_memory`` and ``offload_folder``) lets accelerate
shard it over all visible GPUs and, where memory runs out, offload the rest to CPU RAM and
disk, as lm-evaluation-harness does with ``parallelize=True``; see :func:`load` for what
bitsandbytes supports then.

**Checking parameters up front.** :func:`check_parameters` checks models, methods and device
together in seconds, before anything is loaded; notebooks and :mod:`helpers.runner` call it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from .models import check_available, hub_local_only, resolve
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
        Method(
            "int8",
            "int8",
            "LLM.int8(): int8 vector-wise + fp16 outlier decomposition at |x|>=6",
            int8_threshold=6.0,
            nominal_bits=8,
        ),
        Method(
            "int8-noout",
            "int8",
            "int8 vector-wise, no outlier decomposition (threshold 0)",
            int8_threshold=0.0,
            nominal_bits=8,
        ),
        Method(
            "nf4", "4bit", "4-bit NormalFloat, fp32 absmax per 64", quant_type="nf4", nominal_bits=_bits_4bit(False)
        ),
        Method(
            "nf4-dq",
            "4bit",
            "nf4 + double quantization of the absmax",
            quant_type="nf4",
            double_quant=True,
            nominal_bits=_bits_4bit(True),
        ),
        Method("fp4", "4bit", "4-bit float E2M1, fp32 absmax per 64", quant_type="fp4", nominal_bits=_bits_4bit(False)),
        Method(
            "fp4-dq",
            "4bit",
            "fp4 + double quantization of the absmax",
            quant_type="fp4",
            double_quant=True,
            nominal_bits=_bits_4bit(True),
        ),
    ]
}

#: One colour per method for every figure: quantized variants of one format share a hue, the
#: double-quantized (or no-outlier) twin is its lighter shade.
METHOD_COLORS: dict[str, str] = {
    "fp32": "#222222",
    "bf16": "#9467bd",
    "fp16": "#8c564b",
    "int8": "#2ca02c",
    "int8-noout": "#98df8a",
    "nf4": "#1f77b4",
    "nf4-dq": "#7fb2de",
    "fp4": "#d62728",
    "fp4-dq": "#f4a09c",
}

#: The controls' colours (notebook 04): fp32 logits / c, fp32 logits + noise, and degenerate text.
CONTROL_COLORS: dict[str, str] = {"ctrl-temp": "#7f7f7f", "ctrl-noise": "#b8860b", "ctrl-repeat": "#7f7f7f"}


def get_method(name: str) -> Method:
    """The registered method called ``name``; ``ValueError`` listing valid names otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; valid methods are: {', '.join(METHODS)}") from None


def validate_methods(names: list[str] | tuple[str, ...]) -> list[Method]:
    """Check a whole list up front, so a typo fails before any model is loaded."""
    if isinstance(names, str):
        raise ValueError(f"methods must be a list of names, e.g. [{names}], got the string {names!r}")
    if not names:
        raise ValueError("the list of methods is empty")
    return [get_method(n) for n in names]


def check_parameters(
    models: Iterable[str] | None = None,
    methods: Iterable[str] | None = None,
    device: str | None = None,
    *,
    timeout_s: float = 5.0,
) -> None:
    """Check a run's models, methods and device in seconds, before any model is loaded.

    Models go through :func:`helpers.models.check_available` (embedded, local folder, or Hub id
    reachable or cached within ``timeout_s``), methods through :func:`validate_methods`, the
    device through :func:`helpers.runtime.resolve_device`. ``None`` skips a check. Raises
    ``ValueError`` with one line naming the bad entry and what to do about it.
    """
    if device is not None:
        resolve_device(device)
    if methods is not None:
        validate_methods(methods if isinstance(methods, str) else list(methods))
    if models is not None:
        check_available(models, timeout_s=timeout_s)


@dataclass
class ComparisonConfig:
    """What every comparison of methods needs: the models, the methods, the reference the others
    are compared with, and where they run. :class:`helpers.sweep.SweepConfig` and
    :class:`helpers.textscore.TextConfig` add their own settings to these."""

    models: list[str]
    methods: list[str]
    reference: str = "fp32"
    device: str = "cpu"
    compute_dtype: str = "auto"

    def validate(self) -> None:
        """Every check of these fields that needs no model: one line naming what is wrong."""
        if not self.models:
            raise ValueError("the list of models is empty")
        validate_methods(self.methods)
        get_method(self.reference)
        if self.reference not in self.methods:
            raise ValueError(f"the reference method {self.reference!r} must be in methods {self.methods}")
        resolve_device(self.device)
        for m in self.methods:
            compute_dtype_for(get_method(m), self.device, self.compute_dtype)


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


def quantization_config(method: Method, compute: torch.dtype, offload_unquantized: bool = False):
    """The ``BitsAndBytesConfig`` for ``method`` (``None`` for float methods).

    ``offload_unquantized`` sets ``llm_int8_enable_fp32_cpu_offload`` (it applies to 4-bit too):
    modules that a device map places on ``cpu`` or ``disk`` are then loaded unquantized.
    """
    from transformers import BitsAndBytesConfig

    if method.kind == "int8":
        return BitsAndBytesConfig(
            load_in_8bit=True,
            llm_int8_threshold=method.int8_threshold,
            llm_int8_enable_fp32_cpu_offload=offload_unquantized,
        )
    if method.kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=method.quant_type,
            bnb_4bit_use_double_quant=method.double_quant,
            bnb_4bit_compute_dtype=compute,
            llm_int8_enable_fp32_cpu_offload=offload_unquantized,
        )
    return None


def load_tokenizer(model: str):
    """The tokenizer of ``model`` (embedded name, folder or Hub id), read once per process.

    Reading Gemma-3's 262k-entry ``tokenizer.json`` takes ~4 s, more than loading and quantizing
    its weights, and notebooks load each model once per method, so every method shares one.
    Nothing in the compendium modifies a tokenizer after its pad token is set here. A Hub id is
    checked first (:func:`helpers.models.hub_local_only`), as in :func:`load`.
    """
    return _tokenizer(str(resolve(model)), hub_local_only(model))


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str, local_only: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = str | dict[str, int | str]


def load(
    model: str,
    method: str,
    device: str = "cpu",
    compute_dtype: str = "auto",
    int8_threshold: float | None = None,
    *,
    device_map: DeviceMap | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    offload_unquantized: bool = False,
):
    """Load ``model`` quantized with ``method`` on ``device``; return ``(model, tokenizer)``.

    ``model`` is an embedded name, a local folder or a Hub id (see :func:`helpers.models.resolve`).
    Bad names fail here, before anything is read; a Hub id that is neither reachable nor in the
    local cache fails in seconds (:func:`helpers.models.hub_local_only`), and one that is cached
    while the Hub cannot be reached loads from the cache without retries. The model is returned in eval mode.
    ``int8_threshold`` overrides the outlier threshold of an int8 method (notebook 05's sweep).

    **Sharding and offload.** By default the whole model goes to ``device``. With
    ``device_map="auto"`` (or ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``, or a dict
    from module name to ``cuda`` index, ``"cpu"`` or ``"disk"``) accelerate places the layers
    itself, within ``max_memory`` (e.g. ``{0: "20GiB", 1: "20GiB", "cpu": "60GiB"}``), and
    modules mapped to ``"disk"`` are read from the safetensors file or ``offload_folder``
    layer by layer. ``device`` is then the device of the inputs (the first GPU: ``"cuda"``) and
    decides the ``"auto"`` compute dtype. What bitsandbytes supports:

    - float methods: every placement, GPUs, CPU and disk;
    - int8 and 4-bit methods sharded over GPUs: every linear layer is quantized on the GPU it
      lives on, and accelerate moves activations between GPUs;
    - int8 and 4-bit with modules offloaded to CPU RAM or disk while computing on a GPU:
      bitsandbytes cannot quantize them; transformers loads them *unquantized* (in the load
      dtype) if ``llm_int8_enable_fp32_cpu_offload`` is set, for 4-bit as for int8, and refuses
      otherwise. Since the result is then only partly ``method``, this needs
      ``offload_unquantized=True``; without it the load fails with a one-line error;
    - int8 and 4-bit on CPU (``device="cpu"``): the whole model must fit in CPU RAM; disk
      offload is refused (that option would leave every CPU module unquantized).
    """
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    spec = get_method(method)
    if int8_threshold is not None:
        if spec.kind != "int8" or not int8_threshold >= 0:
            raise ValueError(
                f"int8_threshold needs an int8 method and a value >= 0, got {method!r}, {int8_threshold!r}"
            )
        spec = replace(spec, int8_threshold=float(int8_threshold))
    device = resolve_device(device)
    dtype = compute_dtype_for(spec, device, compute_dtype)
    placement = _placement(spec, device, device_map, max_memory, offload_folder, offload_unquantized)
    path = resolve(model)
    local_only = hub_local_only(model)
    tokenizer = _tokenizer(str(path), local_only)  # shared with load_tokenizer
    try:
        net = AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=local_only,
            dtype=dtype,
            quantization_config=quantization_config(spec, dtype, offload_unquantized and device != "cpu"),
            low_cpu_mem_usage=True,
            **placement,
        )
    except ValueError as err:  # an "auto" map put quantized modules on cpu or disk
        if spec.quantized and "dispatched on the CPU or the disk" in str(err):
            raise ValueError(_offload_message(spec.name, device)) from None
        raise
    net.eval()
    return net, tokenizer


def _offload_message(method: str, device: str) -> str:
    if device == "cpu":
        return (
            f"{method} cannot be offloaded to disk on CPU: bitsandbytes quantizes only modules in memory; "
            "give max_memory['cpu'] room for the whole model, or use a float method"
        )
    return (
        f"{method} with modules offloaded to cpu or disk: bitsandbytes cannot quantize those; give the GPUs "
        "more max_memory, or pass offload_unquantized=True to load the offloaded modules unquantized"
    )


def _placement(
    spec: Method,
    device: str,
    device_map: DeviceMap | None,
    max_memory: dict | None,
    offload_folder: str | os.PathLike[str] | None,
    offload_unquantized: bool,
) -> dict:
    """``from_pretrained`` keywords that place the model (see :func:`load`); bad combinations fail here."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None or offload_unquantized:
            raise ValueError("max_memory, offload_folder and offload_unquantized need device_map ('auto' or a dict)")
        return {"device_map": {"": device}}
    if not isinstance(device_map, dict) and device_map not in DEVICE_MAP_STRATEGIES:
        raise ValueError(f"device_map must be a dict or one of {', '.join(DEVICE_MAP_STRATEGIES)}, got {device_map!r}")
    if spec.quantized and isinstance(device_map, dict):
        offloaded = {"disk"} if device == "cpu" else {"cpu", "disk"}
        if offloaded & set(device_map.values()) and (device == "cpu" or not offload_unquantized):
            raise ValueError(_offload_message(spec.name, device))
    placement: dict = {"device_map": device_map}
    if max_memory is not None:
        placement["max_memory"] = max_memory
    if offload_folder is not None:
        placement["offload_folder"] = str(offload_folder)
    return placement


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
