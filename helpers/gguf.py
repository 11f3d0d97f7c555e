"""GGUF, the file format the embedded models ship in (llama.cpp's): reading a file's tensor types
and name, converting it to fp32 safetensors one tensor at a time (:func:`convert`, called by
:func:`helpers.models.prepare`), and the grids its quantization types put weights on
(:func:`step`, :func:`off_grid`, :func:`q4_1_grid`): the fp32 baselines of this compendium are
dequantized GGUF weights, so they already sit on such a grid (notebooks 01 and 06).

``import gguf`` inside the functions below is the PyPI package that parses GGUF files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: GGUF tensor names of the per-layer weights, keyed by the Hugging Face module suffix.
TENSOR_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


SHARD_BYTES = 1 << 30  # safetensors shards of at most 1 GiB: the most the conversion holds at once


def convert(gguf_path: Path, out: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """GGUF -> fp32 safetensors shards + config + tokenizer in ``out``, one tensor at a time.

    Each GGUF tensor is dequantized (exact in fp32: every GGUF value is representable), renamed
    and reshaped by transformers' own GGUF tensor processor, and written into a shard of at most
    ``shard_bytes``, so the peak memory is about one shard plus the largest tensor rather than
    two full fp32 copies of the model (14 GiB for the 1.5B through ``from_pretrained(gguf_file=)``).
    Every parameter of the plain model must be written once (a tied head may be absent), or the
    conversion fails.
    """
    import gguf  # the PyPI package that reads GGUF files, not this module
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    from .models import ModelFileError
    from .runtime import quiet

    quiet()
    folder, fname = gguf_path.parent, gguf_path.name
    # The tokenizer must come from a recent transformers: 5.17 built Gemma's without BOS.
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    # The GGUF loader leaves {"quant_method": "gguf"} in the config; a saved folder that
    # keeps it would refuse a bitsandbytes config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
    reader = gguf.GGUFReader(gguf_path)
    architecture = reader.get_field("general.architecture").contents()  # as transformers picks its processor
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    key_map = get_gguf_hf_weights_map(skeleton, processor)

    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    written: dict[str, int] = {}  # name -> shard index
    size = 0
    for tensor in reader.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=key_map, parsed_parameters=parsed
        )
        if result.name not in key_map:
            continue
        name = key_map[result.name]
        # a copy only where the array is a read-only view of the file (tensors stored as F32)
        value = torch.from_numpy(np.require(result.weights, np.float32, ["C", "W"])).reshape(expected[name])
        if name in written:
            raise ModelFileError(f"{gguf_path.name}: two GGUF tensors map to {name}")
        if size and size + value.nbytes > shard_bytes:
            _save_shard(shards, out, save_file)
            shards.append({})
            size = 0
        shards[-1][name] = value
        written[name] = len(shards) - 1
        size += value.nbytes
    missing = set(expected) - set(written)
    if getattr(config, "tie_word_embeddings", False):
        missing.discard("lm_head.weight")
    if missing:
        raise ModelFileError(f"{gguf_path.name}: no GGUF tensor for {sorted(missing)[:3]} ({len(missing)} missing)")
    _save_shard(shards, out, save_file)
    _write_index(out, written, len(shards), expected)
    config.architectures = [type(skeleton).__name__]
    config.save_pretrained(out)
    skeleton.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _shard_name(index: int, total: int | None) -> str:
    return "model.safetensors" if total == 1 else f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def _save_shard(shards: list[dict], out: Path, save_file) -> None:
    """Write the last shard under a provisional name and free its tensors."""
    save_file(shards[-1], out / f"shard-{len(shards) - 1}.tmp", metadata={"format": "pt"})
    shards[-1] = {}


def _write_index(out: Path, written: dict[str, int], total: int, shapes: dict[str, tuple]) -> None:
    """Rename the provisional shards as ``save_pretrained`` names them, with its index file for
    more than one shard."""
    for i in range(total):
        os.replace(out / f"shard-{i}.tmp", out / _shard_name(i, total))
    if total > 1:
        n_bytes = sum(4 * math.prod(shapes[name]) for name in written)
        index = {
            "metadata": {"total_size": n_bytes},
            "weight_map": {name: _shard_name(i, total) for name, i in sorted(written.items())},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def read_types(path: Path) -> dict[str, str]:
    """GGUF storage type (Q4_1, Q8_0, ...) of every tensor of a GGUF file, by GGUF tensor name."""
    import gguf  # the PyPI package

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def read_name(path: Path) -> str:
    """The ``general.name`` the GGUF file's maker wrote (for Qwen-0.5B it names the AWQ source)."""
    import gguf  # the PyPI package

    field = gguf.GGUFReader(path).get_field("general.name")
    return field.contents() if field is not None else ""


# --------------------------------------------------------------------------- grids (notebooks 01 and 06)
#: Quantization step of the GGUF types the embedded models ship in, per block of 32 weights:
#: ("absmax", d) -> step = absmax / d (symmetric types); ("range", d) -> step = (max - min) / d
#: (types with a per-block minimum). K-quants use 32-weight sub-blocks inside 256-weight
#: super-blocks; their sub-block step is approximated the same way.
STEPS: dict[str, tuple[str, int]] = {
    "Q4_0": ("absmax", 8),
    "Q5_0": ("absmax", 16),
    "Q8_0": ("absmax", 127),
    "Q6_K": ("absmax", 32),
    "Q3_K": ("absmax", 4),
    "Q4_1": ("range", 15),
    "Q5_1": ("range", 31),
    "Q2_K": ("range", 3),
    "Q4_K": ("range", 15),
    "Q5_K": ("range", 31),
}


def step(weight: torch.Tensor, gguf_type: str, block: int = 32) -> torch.Tensor:
    """Per-block quantization step of ``gguf_type`` for ``weight``, one value per weight."""
    if gguf_type not in STEPS:
        raise ValueError(f"no step rule for GGUF type {gguf_type!r}; known: {', '.join(STEPS)}")
    kind, d = STEPS[gguf_type]
    w = weight.detach().float().reshape(-1)
    if w.numel() % block:
        raise ValueError(f"{w.numel()} weights do not split into blocks of {block}")
    b = w.reshape(-1, block)
    per_block = b.abs().amax(1) / d if kind == "absmax" else (b.amax(1) - b.amin(1)) / d
    return per_block.repeat_interleave(block).reshape(weight.shape)


def off_grid(weight: torch.Tensor, gguf_type: str, generator: torch.Generator, block: int = 32) -> torch.Tensor:
    """``weight`` plus uniform noise of +-step/2 of its GGUF grid: weights of the same error size
    as the GGUF quantization that produced them, but no longer on its grid."""
    import torch

    noise = (torch.rand(weight.shape, generator=generator) - 0.5) * step(weight, gguf_type, block)
    return (weight.detach().float() + noise).to(weight.dtype)


def q4_1_grid(block: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The 16 values a GGUF Q4_1 block can hold, recovered from its dequantized weights:
    ``min + step * k`` for k = 0..15 with ``step = (max - min) / 15`` (llama.cpp's reference
    ``quantize_row_q4_1`` maps the block minimum to code 0 and the maximum to code 15)."""
    import torch

    b = block.detach().double().flatten()
    lo, hi = float(b.min()), float(b.max())
    step = (hi - lo) / 15
    return torch.tensor([lo + step * k for k in range(16)], dtype=torch.float64), step


def grid_distance(values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Distance of each value to the nearest grid point."""
    v, g = values.detach().double().flatten(), grid.detach().double().flatten()
    return (v[:, None] - g[None, :]).abs().amin(dim=1)


def bits_per_parameter_q4_1(block: int = 32) -> float:
    """GGUF Q4_1: 4-bit codes plus an fp16 scale and an fp16 minimum per block, ``4 + 32/32 = 5``."""
    return 4 + (16 + 16) / block
