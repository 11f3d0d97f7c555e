"""Models split over devices (accelerate device maps, CPU and disk offload) compute what the
model on one device computes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from helpers import methods

IDS = torch.tensor([[1, 504, 2000, 33, 4000, 17, 900, 12]])


def _split_map(on_disk_from: int, layers: int = 30) -> dict[str, str]:
    """SmolLM2's modules: the first layers (and embedding, norm, head) on cpu, the rest on disk."""
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" if i < on_disk_from else "disk" for i in range(layers)})
    return device_map


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.models
def test_fp32_split_over_cpu_and_disk_equals_one_device(loaded, tmp_path):
    reference = _logits(loaded("fp32")[0])
    split, _ = methods.load("smollm2-135m", "fp32", device_map=_split_map(15), offload_folder=tmp_path)
    assert Counter(split.hf_device_map.values()) == {"cpu": 19, "disk": 15}
    assert torch.allclose(_logits(split), reference, rtol=0, atol=1e-6)


@pytest.mark.models
def test_fp32_auto_map_within_max_memory_equals_one_device(loaded, tmp_path):
    reference = _logits(loaded("fp32")[0])
    auto, _ = methods.load(
        "smollm2-135m", "fp32", device_map="auto", max_memory={"cpu": "250MB"}, offload_folder=tmp_path
    )
    assert {"cpu", "disk"} <= set(auto.hf_device_map.values())  # 538 MB of weights do not fit in 250 MB
    assert torch.allclose(_logits(auto), reference, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def four_layers(smol_path, tmp_path_factory) -> str:
    """SmolLM2 cut to its first 4 blocks: quantizing it on CPU takes a second, not ten."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("smollm2-4-layers")
    AutoModelForCausalLM.from_pretrained(smol_path, num_hidden_layers=4, dtype=torch.float32).save_pretrained(folder)
    methods.load_tokenizer(smol_path).save_pretrained(folder)
    return str(folder)


@pytest.mark.models
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_with_a_module_level_map_equals_one_device(four_layers, method):
    """On CPU a quantized model cannot be split (see test below); a module-level map works."""
    import bitsandbytes as bnb

    reference = _logits(methods.load(four_layers, method)[0])
    mapped, _ = methods.load(four_layers, method, device_map=_split_map(on_disk_from=4, layers=4))
    assert isinstance(mapped.model.layers[3].mlp.down_proj, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert torch.allclose(_logits(mapped), reference, rtol=0, atol=1e-6)


def test_quantized_disk_offload_on_cpu_is_refused_up_front(monkeypatch):
    import transformers

    monkeypatch.setattr(
        transformers.AutoModelForCausalLM,
        "from_pretrained",
        lambda *a, **k: pytest.fail("loaded before the placement was checked"),
    )
    for method in ("int8", "nf4-dq"):
        with pytest.raises(ValueError, match=f"^{method} cannot be offloaded to disk on CPU: .*max_memory") as err:
            methods.load("smollm2-135m", method, device_map=_split_map(20), offload_unquantized=True)
        assert "\n" not in str(err.value)


@pytest.mark.models
def test_quantized_auto_map_that_needs_disk_on_cpu_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^nf4 cannot be offloaded to disk on CPU") as err:
        methods.load("smollm2-135m", "nf4", device_map="auto", max_memory={"cpu": "60MB"})
    assert "\n" not in str(err.value)


def test_bad_placements_fail_before_loading():
    with pytest.raises(ValueError, match="need device_map"):
        methods.load("smollm2-135m", "fp32", max_memory={"cpu": "1GB"})
    with pytest.raises(ValueError, match="need device_map"):
        methods.load("smollm2-135m", "fp32", offload_folder="/tmp/x")
    with pytest.raises(ValueError, match="device_map must be a dict or one of auto, balanced"):
        methods.load("smollm2-135m", "fp32", device_map="everywhere")


def test_offload_unquantized_reaches_bitsandbytes():
    for name in ("int8", "nf4"):
        spec = methods.get_method(name)
        assert not methods.quantization_config(spec, torch.float16).llm_int8_enable_fp32_cpu_offload
        assert methods.quantization_config(
            spec, torch.float16, offload_unquantized=True
        ).llm_int8_enable_fp32_cpu_offload
