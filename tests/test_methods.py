"""The method registry: names, configs, and what each method actually loads."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from helpers import methods


def test_registry_has_every_method_of_the_study():
    assert list(methods.METHODS) == ["fp32", "bf16", "fp16", "int8", "int8-noout", "nf4", "nf4-dq", "fp4", "fp4-dq"]


def test_unknown_method_is_rejected_with_the_valid_names():
    with pytest.raises(ValueError) as err:
        methods.get_method("nf3")
    msg = str(err.value)
    assert "nf3" in msg and all(name in msg for name in methods.METHODS)
    assert "\n" not in msg


def test_validate_rejects_bad_lists():
    with pytest.raises(ValueError, match="empty"):
        methods.validate_methods([])
    with pytest.raises(ValueError, match="int4"):
        methods.validate_methods(["fp32", "int4"])


def test_bad_parameters_fail_before_any_heavy_work(monkeypatch):
    """An unknown method or model must fail before anything is read from disk."""

    def boom(*args, **kwargs):  # pragma: no cover - reaching it is the failure
        raise AssertionError("from_pretrained was called before validation")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    with pytest.raises(ValueError, match="unknown method"):
        methods.load("smollm2-135m", "int3")
    with pytest.raises(ValueError, match="neither an embedded model"):
        methods.load("no-such-model", "fp32")
    with pytest.raises(ValueError, match="compute_dtype"):
        methods.load("smollm2-135m", "nf4", compute_dtype="float8")
    with pytest.raises(ValueError, match="CUDA is not available|cpu"):
        methods.load("smollm2-135m", "fp32", device="tpu" if torch.cuda.is_available() else "cuda")


def test_nominal_bits():
    assert methods.METHODS["nf4"].nominal_bits == 4.5
    assert methods.METHODS["nf4-dq"].nominal_bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert methods.METHODS["int8"].nominal_bits == 8


def test_compute_dtype_auto():
    nf4, int8, bf16 = (methods.METHODS[m] for m in ("nf4", "int8", "bf16"))
    assert methods.compute_dtype_for(nf4, "cpu") == torch.float32
    assert methods.compute_dtype_for(nf4, "cuda") == torch.bfloat16
    assert methods.compute_dtype_for(int8, "cuda") == torch.float16
    assert methods.compute_dtype_for(bf16, "cpu", "float32") == torch.bfloat16  # float methods keep theirs
    assert methods.compute_dtype_for(nf4, "cpu", "bfloat16") == torch.bfloat16


EXPECTED = {
    # method: (Linear class, weight dtype, extra check)
    "fp32": (torch.nn.Linear, torch.float32),
    "bf16": (torch.nn.Linear, torch.bfloat16),
    "fp16": (torch.nn.Linear, torch.float16),
    "int8": (bnb.nn.Linear8bitLt, torch.int8),
    "int8-noout": (bnb.nn.Linear8bitLt, torch.int8),
    "nf4": (bnb.nn.Linear4bit, torch.uint8),
    "nf4-dq": (bnb.nn.Linear4bit, torch.uint8),
    "fp4": (bnb.nn.Linear4bit, torch.uint8),
    "fp4-dq": (bnb.nn.Linear4bit, torch.uint8),
}


@pytest.mark.models
@pytest.mark.parametrize("method", list(EXPECTED))
def test_each_method_yields_expected_layers(method, loaded):
    model, tokenizer = loaded(method)
    cls, dtype = EXPECTED[method]
    spec = methods.get_method(method)
    block_linears = [m for name, m in model.named_modules() if ".layers." in name and isinstance(m, torch.nn.Linear)]
    assert block_linears and all(type(m) is cls for m in block_linears)
    assert {m.weight.dtype for m in block_linears} == {dtype}
    # what stays unquantized: embeddings and lm_head, in the compute dtype
    compute = methods.compute_dtype_for(spec, "cpu")
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == compute
    assert model.model.embed_tokens.weight.dtype == compute
    if spec.kind == "int8":
        assert {m.state.threshold for m in block_linears} == {spec.int8_threshold}
    if spec.kind == "4bit":
        states = [m.weight.quant_state for m in block_linears]
        assert {s.quant_type for s in states} == {spec.quant_type}
        assert {s.nested for s in states} == {spec.double_quant}
        assert {s.blocksize for s in states} == {64}
    unq = methods.unquantized_parameters(model)
    if spec.quantized:
        assert "model.embed_tokens" in unq and not any(".mlp." in n or ".self_attn." in n and "proj" in n for n in unq)
    assert tokenizer.pad_token is not None


@pytest.mark.models
def test_every_method_shares_one_tokenizer_per_model(loaded):
    _, tok_fp32 = loaded("fp32")
    _, tok_nf4 = loaded("nf4")
    assert tok_fp32 is tok_nf4 is methods.load_tokenizer("smollm2-135m")
    assert tok_fp32.pad_token is not None


@pytest.mark.gpu
@pytest.mark.models
def test_cuda_methods_predict_like_the_cpu_reference(loaded):
    """On a GPU, bf16 and nf4 (bf16 compute) give next-token distributions close to fp32 on CPU."""
    from helpers import measures

    ref, tok = loaded("fp32")
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        expected = ref(**ids).logits[:, -1].float()
        for method, bound in (("bf16", 0.05), ("nf4", 0.5)):
            model, _ = methods.load("smollm2-135m", method, device="cuda")
            got = model(**{k: v.cuda() for k, v in ids.items()}).logits[:, -1].float().cpu()
            kl = measures.next_token_measures(expected, got, [1.0], [0]).kl
            assert (kl < bound).all(), (method, kl.tolist())
            del model
