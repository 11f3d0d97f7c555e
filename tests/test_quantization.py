"""Codebooks, round trips and the bit/byte accounting, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import quantization as qz

# REFERENCE.md: bitsandbytes get_4bit_type('nf4')
NF4 = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
       0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]


def test_nf4_codebook_matches_reference():
    assert qz.codebook("nf4").tolist() == pytest.approx(NF4, abs=1e-4)


def test_nf4_is_the_normal_quantile_construction():
    assert torch.allclose(qz.normal_float_levels(), qz.codebook("nf4"), atol=1e-6)
    assert (qz.normal_float_levels() == 0).sum() == 1  # exactly one zero


def test_fp4_is_e2m1():
    mags = sorted({round(abs(v) * 12, 4) for v in qz.codebook("fp4").tolist()})
    assert mags == [0, 0.0625, 2, 3, 4, 6, 8, 12]


def test_int4_codebook():
    vals = qz.codebook("int4")
    assert vals.numel() == 16 and vals.unique().numel() == 15
    assert (vals * 7).round().tolist() == sorted(list(range(-7, 8)) + [0])


def test_unknown_codebook():
    with pytest.raises(ValueError, match="nf4, fp4 or int4"):
        qz.codebook("nf3")


def test_normal_quantiles_symmetric():
    q = qz.normal_quantiles(16)
    assert torch.allclose(q, -q.flip(0)) and q.max() == 1


def test_bits_per_parameter_arithmetic():
    assert qz.bits_per_parameter_4bit(False) == 4.5
    assert qz.bits_per_parameter_4bit(True) == pytest.approx(4.126953125)  # 4 + 1/8 + 1/512
    assert qz.bits_per_parameter_4bit(False, blocksize=128) == 4.25


def test_roundtrip_storage_is_counted_exactly():
    """256x512 weights: 65536 packed bytes; absmax fp32 per 64 -> 2048*4; codebook 16*4."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    rt = qz.roundtrip(w, "nf4")
    assert rt.payload_bytes == 65536
    assert rt.state_bytes == 2048 * 4 + 16 * 4
    assert rt.bits_per_parameter == pytest.approx(8 * (65536 + 8192 + 64) / 131072)
    dq = qz.roundtrip(w, "nf4-dq")
    # absmax in uint8 (2048), nested absmax fp32 per 256 blocks (8*4), nested code 256*4, offset 4, code 64
    assert dq.state_bytes == 2048 + 8 * 4 + 256 * 4 + 4 + 16 * 4
    i8 = qz.roundtrip(w, "int8")
    assert i8.payload_bytes == 131072 and i8.state_bytes == 256 * 4  # one fp32 scale per row


def test_roundtrip_error_ordering_on_gaussian_weights():
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(1))
    err = {m: qz.error_stats(w, qz.roundtrip(w, m).dequantized)["rel_frobenius_error"] for m in qz.ROUNDTRIP_METHODS}
    assert err["int8"] < err["nf4"] < err["fp4"]
    assert err["nf4-dq"] == pytest.approx(err["nf4"], rel=0.02)  # dq changes the scales only slightly
    assert 0.05 < err["nf4"] < 0.15  # 4-bit: about 10% relative error on N(0,1) weights


def test_roundtrip_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        qz.roundtrip(torch.randn(4, 4, 4), "nf4")
    with pytest.raises(ValueError, match="no round trip"):
        qz.roundtrip(torch.randn(4, 64), "bf16")


def test_error_stats_hand_case():
    w = torch.tensor([[3.0, 4.0]])
    s = qz.error_stats(w, torch.tensor([[3.0, 3.0]]))
    assert s == {"rel_frobenius_error": pytest.approx(0.2), "mean_abs_error": 0.5, "max_abs_error": 1.0}


def test_block_absmax_and_distinct_values():
    w = torch.tensor([[1.0, -3.0, 2.0, 2.0], [0.5, 0.5, -0.25, 0.5]])
    assert qz.block_absmax(w, 2).tolist() == [[3.0, 3.0, 2.0, 2.0], [0.5, 0.5, 0.5, 0.5]]
    assert qz.distinct_values_per_block(w, 4).tolist() == [3, 2]
    assert qz.distinct_values_per_block(w, 2).tolist() == [2, 1, 1, 2]


def _expected_layer_bytes(n: int, double_quant: bool) -> int:
    """Hand count for one 4-bit layer of n weights: packed codes + absmax + codebook, and for
    double quantization uint8 absmax + fp32 absmax per 256 blocks + 256-entry fp32 code + offset."""
    blocks = math.ceil(n / 64)
    if double_quant:
        return n // 2 + blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 4 + 16 * 4
    return n // 2 + blocks * 4 + 16 * 4


@pytest.mark.models
@pytest.mark.parametrize("method,nominal", [("nf4", 4.5), ("nf4-dq", 4.127), ("fp4", 4.5), ("fp4-dq", 4.127)])
def test_storage_report_on_the_real_model(method, nominal, loaded):
    import bitsandbytes as bnb

    fp32, _ = loaded("fp32")
    model, _ = loaded(method)
    ref = qz.storage_report(fp32)
    rep = qz.storage_report(model)
    # 4-bit numel() reports half the parameters (transformers#25978); the report must not
    assert rep.total_params == ref.total_params
    sizes = [m.in_features * m.out_features for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    expected = sum(_expected_layer_bytes(n, method.endswith("-dq")) for n in sizes)
    assert rep.quantized_params == sum(sizes)
    assert rep.quantized_payload_bytes + rep.quant_state_bytes == expected
    # per-layer constants put the measured value slightly above the nominal one
    assert nominal <= rep.bits_per_quantized_parameter < nominal + 0.03
    assert rep.quant_state_bytes > 0
    # get_memory_footprint() leaves the quantization state out
    assert model.get_memory_footprint() < rep.total_bytes


@pytest.mark.models
def test_storage_report_int8_and_fp32(loaded):
    fp32, _ = loaded("fp32")
    ref = qz.storage_report(fp32)
    assert ref.quantized_params == 0 and ref.other_bytes >= 4 * ref.other_params  # fp32, plus buffers
    assert 134e6 < ref.total_params < 135e6  # SmolLM2-135M: 134.5M parameters, tied embedding once
    int8, _ = loaded("int8")
    rep = qz.storage_report(int8)
    assert rep.total_params == ref.total_params
    assert 8 < rep.bits_per_quantized_parameter < 8.06  # 8 + 32/in_features, in_features >= 576


def test_gguf_step_and_off_grid_noise_by_hand():
    w = torch.tensor([[0.0, 1.5, -3.0, 0.75] * 8])  # one block of 32: absmax 3, range 4.5
    assert qz.gguf_step(w, "Q8_0")[0, 0].item() == pytest.approx(3 / 127)
    assert qz.gguf_step(w, "Q4_1")[0, 0].item() == pytest.approx(4.5 / 15)
    g = torch.Generator().manual_seed(0)
    big = torch.randn(64, 64)
    moved = qz.off_grid(big, "Q4_1", g) - big
    step = qz.gguf_step(big, "Q4_1")
    assert (moved.abs() <= step / 2 + 1e-7).all()
    assert (moved.abs() / step).mean().item() == pytest.approx(0.25, abs=0.02)  # uniform on +-1/2 step
    with pytest.raises(ValueError, match="GGUF type"):
        qz.gguf_step(w, "IQ2_XS")
    with pytest.raises(ValueError, match="blocks"):
        qz.gguf_step(torch.ones(3, 5), "Q8_0")


def test_total_bits_by_hand():
    assert qz.total_bits(100, 10, 50, other_bits=16) == 8 * 110 + 800
    assert qz.total_bits(100, 10, 50, other_bytes=200) == 8 * 110 + 1600
    with pytest.raises(ValueError):
        qz.total_bits(1, 1, 1)
