"""Perplexity on held-out text, seeded continuations, and the methods table of notebook 01.

Perplexity is computed over non-overlapping windows of the token stream (every method sees
exactly the same windows, so differences between methods are paired), with log-softmax in
float32 whatever the model's dtype. Per-token negative log-likelihoods are returned so
notebooks can bootstrap confidence intervals over tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import methods as registry
from . import quantization as qz
from .memory import release_memory
from .runtime import machine_load, timed
from .stats import bootstrap_ci


@dataclass
class Perplexity:
    """Perplexity of a text under a model, with the per-token NLLs it was computed from."""

    ppl: float
    n_tokens: int
    token_nll: torch.Tensor  # nats, one per scored token, float32 on CPU


def read_text(path: str | Path) -> str:
    """Read a held-out text file; a clear error if it is missing or empty."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"held-out text {path} does not exist")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"held-out text {path} is empty")
    return text


def token_windows(ids: list[int], window: int, bos_id: int | None) -> list[list[int]]:
    """Split a token stream into windows of at most ``window`` tokens.

    If the stream starts with ``bos_id`` (the tokenizer adds one, as Gemma's does), every
    later window starts with it too, so no window is scored without the context the model
    was trained to expect. The first token of each window is context only.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    has_bos = bos_id is not None and ids and ids[0] == bos_id
    body = ids[1:] if has_bos else ids
    step = window - 1 if has_bos else window
    windows = []
    for start in range(0, len(body), step):
        chunk = body[start : start + step]
        win = ([bos_id] if has_bos else []) + chunk
        if len(win) >= 2:
            windows.append(win)
    return windows


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, max_tokens: int | None = None, window: int = 256) -> Perplexity:
    """Perplexity of ``text`` (first ``max_tokens`` tokens) in windows of ``window`` tokens."""
    ids = tokenizer(text)["input_ids"]
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
        ids = ids[:max_tokens]
    device = next(model.parameters()).device
    nll = []
    for win in token_windows(ids, window, tokenizer.bos_token_id):
        x = torch.tensor([win], device=device)
        logits = model(x).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        nll.append(-logp.gather(1, x[0, 1:, None]).squeeze(1).cpu())
    token_nll = torch.cat(nll)
    mean = token_nll.mean().item()
    # non-finite logits (fp16 overflow) give NaN NLLs: report NaN, not a number that looks valid
    return Perplexity(math.exp(mean) if math.isfinite(mean) else float("nan"), token_nll.numel(), token_nll)


class NonFiniteLogitsError(RuntimeError):
    """The model produced inf/NaN logits (typically fp16 overflow in the residual stream)."""


@torch.inference_mode()
def continuation(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 30,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
) -> str:
    """One sampled continuation of ``prompt``; ``temperature == 0`` means greedy.

    The same ``seed`` gives every method the same random stream, so side-by-side
    continuations differ because of the method, not because of luck. Raises
    :class:`NonFiniteLogitsError` if the prompt's logits are not finite, instead of the
    opaque "probability tensor contains either inf, nan or element < 0" from sampling.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    if not torch.isfinite(model(**enc).logits[0, -1]).all():
        raise NonFiniteLogitsError("non-finite logits for the prompt (fp16 overflow?)")
    torch.manual_seed(seed)
    sampling = (
        dict(do_sample=True, temperature=temperature, top_k=top_k or 0) if temperature > 0 else dict(do_sample=False)
    )
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, top_p=None, **sampling
    )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def scored_bytes(tokenizer, text: str, max_tokens: int | None = None, window: int = 256) -> int:
    """UTF-8 bytes of the text that :func:`perplexity` scores with the same settings.

    ``total NLL / ln 2 / scored_bytes`` is bits per byte: unlike perplexity per token it does
    not depend on the tokenizer, so models with different vocabularies can be compared.
    """
    ids = tokenizer(text)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return sum(
        len(tokenizer.decode(win[1:], skip_special_tokens=True).encode("utf-8"))
        for win in token_windows(ids, window, tokenizer.bos_token_id)
    )


def evaluate_method(
    model_name: str,
    method: str,
    *,
    device: str,
    compute_dtype: str,
    text: str | None,
    max_eval_tokens: int | None,
    eval_window: int,
    generation: dict[str, Any],
    fp32_weights: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
) -> tuple[dict[str, Any], str, np.ndarray | None]:
    """Load one (model, method) and measure its row of notebook 01's methods table.

    Storage and bits are read before the first forward pass (some CPU kernels repack 4-bit weights
    then); the weight SQNR compares each dequantized layer with ``fp32_weights([name])`` (``{name +
    ".weight": tensor}``, asked one layer at a time; None skips it); perplexity on ``text`` (None skips it); a seeded
    continuation with ``generation`` (prompt, max_new_tokens, temperature, top_k, seed).
    Returns ``(row, continuation, per-token NLL or None)``.
    """
    spec = registry.get_method(method)
    load_s, (model, tokenizer) = timed(
        lambda: registry.load(model_name, method, device=device, compute_dtype=compute_dtype), device
    )
    report = qz.storage_report(model)
    noise = qz.WeightNoise()
    if spec.quantized and fp32_weights is not None:
        # one layer at a time (also before the first forward): an fp32 copy of every layer of a 1.5B
        # model is 5 GiB, twice that with its dequantized twin
        for name, deq in qz.dequantized_linears(model):
            noise.add(fp32_weights([name])[f"{name}.weight"], deq)
    fused = qz.cpu_fused_4bit(model)  # this CPU's 4-bit kernel: fused bf16, or dequantize + matmul
    layers = registry.layer_summary(model)
    eval_s, ppl = timed(
        lambda: (
            None if text is None else perplexity(model, tokenizer, text, max_tokens=max_eval_tokens, window=eval_window)
        ),
        device,
    )
    try:
        text_out, prompt_finite = continuation(model, tokenizer, **generation), True
    except NonFiniteLogitsError as err:
        text_out, prompt_finite = f"[no continuation: {err}]", False
    footprint = model.get_memory_footprint()  # what transformers reports, for comparison
    linear_class = next((c for c in layers if c.startswith("Linear")), "?")
    dtype = registry.compute_dtype_for(spec, device, compute_dtype)
    row = {
        "model": model_name,
        "method": method,
        "compute_dtype": str(dtype).replace("torch.", ""),
        "linear_class": linear_class,
        "linear_weight_dtype": layers.get(linear_class, {}).get("weight_dtype"),
        "quantized_params": report.quantized_params,
        "other_params": report.other_params,
        "payload_MiB": report.quantized_payload_bytes / 2**20,
        "quant_state_MiB": report.quant_state_bytes / 2**20,
        "other_MiB": report.other_bytes / 2**20,
        "total_MiB": report.total_bytes / 2**20,
        "hf_footprint_MiB": footprint / 2**20,
        "bits_per_quantized_param": report.bits_per_quantized_parameter,
        "nominal_bits": spec.nominal_bits if spec.quantized else np.nan,
        "weight_sqnr_db": noise.sqnr_db if noise.count else np.nan,
        "fused_cpu_4bit_kernel": fused,
        "perplexity_evaluated": ppl is not None,
        "perplexity": ppl.ppl if ppl is not None else np.nan,
        "finite_logits": prompt_finite and (ppl is None or bool(torch.isfinite(ppl.token_nll).all())),
        "scored_tokens": ppl.n_tokens if ppl is not None else 0,
        "load_s": load_s,
        "eval_s": eval_s,
        "load_average": machine_load(),
    }
    model = tokenizer = None  # drop the last references, then hand the freed gigabytes back to the system
    release_memory(device)
    return row, text_out, None if ppl is None else ppl.token_nll.numpy()


def paired_nll_delta(
    token_nll: dict[tuple[str, str], np.ndarray], model: str, key: str, n_boot: int, seed: int = 0, reference="fp32"
) -> tuple[float, float, float]:
    """Mean per-token NLL difference of ``key`` from ``reference`` on the same tokens, with its
    block-bootstrap interval (blocks of 32 tokens); NaN where either was not scored or overflowed."""
    ref, other = token_nll.get((model, reference)), token_nll.get((model, key))
    if ref is None or other is None or not np.isfinite(other - ref).all():
        return (np.nan, np.nan, np.nan)
    return bootstrap_ci(other - ref, block=32, n_boot=n_boot, seed=seed)
