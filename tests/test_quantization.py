"""Codebooks, round trips and the bit/byte accounting, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import gguf, methods
from helpers import quantization as qz

# bitsandbytes 0.50.2 get_4bit_type('nf4'), the table of QLoRA (arXiv 2305.14314), Appendix E
NF4 = [
    -1.0,
    -0.6962,
    -0.5251,
    -0.3949,
    -0.2844,
    -0.1848,
    -0.0911,
    0.0,
    0.0796,
    0.1609,
    0.2461,
    0.3379,
    0.4407,
    0.5626,
    0.7230,
    1.0,
]


def test_nf4_codebook_matches_the_bitsandbytes_table():
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
    # a fresh int8 model: after a forward pass some bitsandbytes CPU kernels repack the weights and drop the
    # row scales, and the shared fixture's model may have run one in another test
    int8, _ = methods.load("smollm2-135m", "int8", device="cpu")
    rep = qz.storage_report(int8)
    assert rep.total_params == ref.total_params
    assert 8 < rep.bits_per_quantized_parameter < 8.06  # 8 + 32/in_features, in_features >= 576


def test_gguf_step_and_off_grid_noise_by_hand():
    w = torch.tensor([[0.0, 1.5, -3.0, 0.75] * 8])  # one block of 32: absmax 3, range 4.5
    assert gguf.step(w, "Q8_0")[0, 0].item() == pytest.approx(3 / 127)
    assert gguf.step(w, "Q4_1")[0, 0].item() == pytest.approx(4.5 / 15)
    g = torch.Generator().manual_seed(0)
    big = torch.randn(64, 64)
    moved = gguf.off_grid(big, "Q4_1", g) - big
    step = gguf.step(big, "Q4_1")
    assert (moved.abs() <= step / 2 + 1e-7).all()
    assert (moved.abs() / step).mean().item() == pytest.approx(0.25, abs=0.02)  # uniform on +-1/2 step
    with pytest.raises(ValueError, match="GGUF type"):
        gguf.step(w, "IQ2_XS")
    with pytest.raises(ValueError, match="blocks"):
        gguf.step(torch.ones(3, 5), "Q8_0")


def test_total_bits_by_hand():
    assert qz.total_bits(100, 10, 50, other_bits=16) == 8 * 110 + 800
    assert qz.total_bits(100, 10, 50, other_bytes=200) == 8 * 110 + 1600
    with pytest.raises(ValueError):
        qz.total_bits(1, 1, 1)


# ----------------------------------------------------------------------------- teaching measures
def test_distinct_levels_of_the_three_codebooks():
    # FP4's +0, -0 and +-0.0052 merge into one level; int4's two zeros into one; NF4 keeps 16
    got = {name: qz.distinct_levels(qz.codebook(name), tol=0.02) for name in ("nf4", "fp4", "int4")}
    assert got == {"nf4": 16, "fp4": 13, "int4": 15}
    assert qz.distinct_levels(qz.codebook("fp4"), tol=1e-9) == 15  # only the exact double zero merges
    assert qz.distinct_levels(torch.tensor([0.0, 0.5, 0.51, 1.0]), tol=0.02) == 3
    assert qz.distinct_levels(torch.tensor([]), tol=0.1) == 0


def test_worst_rounding_error_is_half_the_widest_gap():
    assert qz.worst_rounding_error(qz.codebook("fp4")) == pytest.approx(1 / 6, abs=1e-6)
    assert qz.worst_rounding_error(qz.codebook("int4")) == pytest.approx(1 / 14, abs=1e-6)
    # NF4 is asymmetric: its widest gap is on the negative side, -1 to -0.6962
    assert qz.worst_rounding_error(qz.codebook("nf4")) == pytest.approx((1 - 0.6962) / 2, abs=1e-4)
    with pytest.raises(ValueError):
        qz.worst_rounding_error(torch.zeros(3))


def test_code_indices_unpack_bitsandbytes_packing():
    import bitsandbytes.functional as F

    assert qz.code_indices(torch.tensor([[0xAB], [0x01]], dtype=torch.uint8), 3).tolist() == [10, 11, 0]
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    for quant_type in ("nf4", "fp4"):
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
        idx = qz.code_indices(packed, w.numel())
        rebuilt = state.code[idx].view(-1, 64) * state.absmax[:, None]
        assert torch.equal(rebuilt.view_as(w), F.dequantize_4bit(packed, state))
    with pytest.raises(ValueError, match="hold"):
        qz.code_indices(torch.zeros(2, dtype=torch.uint8), 5)


def test_usage_entropy_by_hand():
    assert qz.usage_entropy_bits(torch.ones(16)) == pytest.approx(4.0)
    assert qz.usage_entropy_bits(torch.tensor([5.0, 5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert qz.usage_entropy_bits(torch.tensor([3.0, 0.0])) == 0.0
    with pytest.raises(ValueError):
        qz.usage_entropy_bits(torch.tensor([1.0, -1.0]))


def test_sqnr_by_hand_and_summed_over_matrices():
    w, a = torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 3.0]])
    assert qz.sqnr_db(w, a) == pytest.approx(10 * math.log10(25 / 1))
    rel = qz.error_stats(w, a)["rel_frobenius_error"]
    assert qz.sqnr_db(w, a) == pytest.approx(-20 * math.log10(rel))
    assert qz.sqnr_db(w, w) == math.inf
    total = qz.WeightNoise()
    total.add(w, a)
    total.add(torch.tensor([[1.0]]), torch.tensor([[0.0]]))
    assert (total.signal, total.noise, total.count) == (26.0, 2.0, 3)
    assert total.sqnr_db == pytest.approx(10 * math.log10(13))
    with pytest.raises(ValueError, match="shapes"):
        total.add(w, a.T)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_trace_block_reproduces_bitsandbytes(quant_type):
    import bitsandbytes.functional as F

    block = torch.randn(1, 64, generator=torch.Generator().manual_seed(3)) * 0.02
    packed, state = F.quantize_4bit(block, blocksize=64, quant_type=quant_type)
    trace = qz.trace_block(block, qz.codebook(quant_type))
    assert trace.absmax == pytest.approx(block.abs().max().item())
    assert trace.scaled.abs().max().item() == pytest.approx(1.0)
    assert torch.equal(trace.dequantized, F.dequantize_4bit(packed, state).flatten())
    assert torch.allclose(trace.error, trace.dequantized - block.flatten())
    # the absmax itself is stored exactly: its weight has no error
    assert trace.error[block.abs().argmax()].item() == 0.0
    with pytest.raises(ValueError, match="zero"):
        qz.trace_block(torch.zeros(64), qz.codebook("nf4"))


def test_double_quant_moves_each_scale_a_little():
    import bitsandbytes.functional as F

    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(4))
    exact, nested = qz.double_quant_absmax(w, "nf4")
    _, plain = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(exact, plain.absmax) and nested.shape == exact.shape
    rel = (nested / exact - 1).abs()
    assert 0 < rel.median().item() < 0.005 and rel.max().item() < 0.02  # 8 bits per scale, not 32


def test_scale_absmax_row_for_int8_block_for_4bit():
    w = torch.tensor([[1.0, -3.0, 2.0, 0.5], [0.5, 0.25, -0.25, 4.0]])
    assert qz.scale_absmax(w, "int8").tolist() == [[3.0] * 4, [4.0] * 4]
    assert qz.scale_absmax(w, "nf4", blocksize=2).tolist() == [[3.0, 3.0, 2.0, 2.0], [0.5, 0.5, 4.0, 4.0]]
    with pytest.raises(ValueError, match="scale group"):
        qz.scale_absmax(w, "bf16")


def test_error_by_position_by_hand():
    bins = np.array([-1.0, 0.0, 1.0])
    table = qz.error_by_position(np.array([-0.5, 0.5, 0.9]), np.array([0.1, -0.2, 0.2]), bins)
    assert table["count"].tolist() == [1, 2]
    assert table["mean_abs_error"].tolist() == pytest.approx([0.1, 0.2])
    assert table["share_of_squared_error"].tolist() == pytest.approx([0.01 / 0.09, 0.08 / 0.09])
    assert table["bin_center"].tolist() == [-0.5, 0.5]
    with pytest.raises(ValueError):
        qz.error_by_position(np.zeros(2), np.zeros(3), bins)


class _Tiny(torch.nn.Module):
    """Two hidden Linear layers and an output head, like a causal LM's blocks and lm_head."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.blocks = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
        self.head = torch.nn.Linear(64, 32, bias=False)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g)

    def get_output_embeddings(self):
        return self.head

    def forward(self, x):
        return self.head(self.blocks(x))


def test_weight_only_swaps_the_block_linears_and_restores_them():
    model = _Tiny()
    assert list(qz.quantizable_linears(model)) == ["blocks.0", "blocks.2"]  # not the head
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(6))
    with qz.weight_only(model, "nf4") as noise:
        for name in ("blocks.0", "blocks.2"):
            w = before[f"{name}.weight"]
            assert torch.equal(model.get_submodule(name).weight, qz.roundtrip(w, "nf4").dequantized)
        assert torch.equal(model.head.weight, before["head.weight"])
        assert noise.count == 64 * 128 * 2
        expected = qz.WeightNoise()
        for name in ("blocks.0", "blocks.2"):
            w = before[f"{name}.weight"]
            expected.add(w, qz.roundtrip(w, "nf4").dequantized)
        assert noise.sqnr_db == pytest.approx(expected.sqnr_db)
        y_q = model(x)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not torch.equal(y_q, model(x))
    with pytest.raises(RuntimeError, match="inside"):
        with qz.weight_only(model, "int8"):
            raise RuntimeError("inside")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_dequantized_linears_read_what_bitsandbytes_stores():
    import bitsandbytes as bnb

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(7))
    q4 = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4")
    q4.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=False)
    q8 = bnb.nn.Linear8bitLt(128, 64, bias=False, has_fp16_weights=False)
    q8.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    model = torch.nn.ModuleDict({"a": q4, "b": q8}).to("cpu")
    got = dict(qz.dequantized_linears(model))
    assert list(got) == ["a", "b"]
    assert torch.equal(got["a"], qz.roundtrip(w, "nf4").dequantized)
    assert torch.allclose(got["b"], qz.roundtrip(w, "int8").dequantized)


def test_q4_1_grid_recovers_a_block_on_its_grid():
    codes = torch.tensor([0, 15, 3, 7, 7, 12] * 5 + [1, 2])
    block = -0.03 + 0.004 * codes.double()
    grid, step = gguf.q4_1_grid(block)
    assert step == pytest.approx(0.004) and grid[0].item() == pytest.approx(-0.03)
    assert gguf.grid_distance(block, grid).max().item() < 1e-12
    assert gguf.grid_distance(torch.tensor([-0.029]), grid).item() == pytest.approx(0.001)
    assert gguf.bits_per_parameter_q4_1() == 5.0


def test_dequantize_path_gives_dequantize_plus_matmul():
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(8))
    layer = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=False)
    model = torch.nn.Sequential(layer).to("cpu")
    assert qz.cpu_fused_4bit(model) == F.has_avx512bf16()  # this CPU decides
    assert qz.use_dequantize_path(model) == int(F.has_avx512bf16())
    assert not qz.cpu_fused_4bit(model)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        y = model(x)
    assert torch.equal(y, torch.nn.functional.linear(x, qz.roundtrip(w, "nf4").dequantized))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert qz.use_dequantize_path(torch.nn.Linear(2, 2)) == 0


def test_level_groups_name_the_merged_codes():
    groups = qz.level_groups(torch.tensor([1.0, 0.0, 0.51, 0.5]), tol=0.02)
    assert [n for _, n in groups] == [1, 2, 1]
    assert groups[1][0] == pytest.approx(0.505)
    fp4_zero = max(qz.level_groups(qz.codebook("fp4"), tol=0.02), key=lambda g: g[1])
    assert fp4_zero[1] == 4 and fp4_zero[0] == pytest.approx(0.0)  # +0, -0 and +-0.0052
