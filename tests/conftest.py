"""Shared fixtures. Tests that need a real model use the prepared SmolLM2 folder; `make test`
prepares it first (and `helpers.models.resolve` prepares it on demand), so these tests fail
loudly rather than skip when the model cannot be prepared."""

from __future__ import annotations

import pytest

from helpers import methods, runtime


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where torch sees a CUDA device; tests marked ``qwen`` only
    where the Qwen2.5-Coder 0.5B model is prepared (``make test`` never downloads it)."""
    import torch

    from helpers import models

    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device")
    if not (models.models_dir() / "qwen2.5-coder-0.5b" / models.MANIFEST).exists():
        skips["qwen"] = pytest.mark.skip(
            reason="needs the prepared Qwen2.5-Coder 0.5B: python -m helpers.models prepare qwen2.5-coder-0.5b"
        )
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _quiet():
    runtime.quiet()


@pytest.fixture(scope="session")
def smol_path() -> str:
    from helpers import models

    return models.resolve("smollm2-135m")


@pytest.fixture(scope="session")
def loaded():
    """Load a (model, method) once per pytest run and keep it."""
    cache: dict = {}

    def get(method: str, model: str = "smollm2-135m"):
        if (model, method) not in cache:
            cache[(model, method)] = methods.load(model, method, device="cpu")
        return cache[(model, method)]

    return get
