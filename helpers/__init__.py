"""Shared code for the post-training-quantization compendium.

One module per concern; notebooks import what they need:

- :mod:`helpers.models`        the embedded real models (GGUF in PyPI wheels -> safetensors) and
                               how a model name in the parameters is resolved
- :mod:`helpers.methods`       the method registry (fp32 ... fp4-dq) and :func:`~helpers.methods.load`
- :mod:`helpers.quantization`  codebooks, block-wise round trips, bits and bytes of quantized models
- :mod:`helpers.evaluation`    perplexity and seeded continuations
- :mod:`helpers.sampling`      exact next-token measures over (T, top-k); seeded batched generation
                               with common random numbers; quality measures of generations
- :mod:`helpers.sweep`         the sampling sweep of notebook 02, cut into resumable units
- :mod:`helpers.store`         append-only results store that survives SIGKILL
- :mod:`helpers.stats`         block-bootstrap confidence intervals
- :mod:`helpers.analysis`      paired method-vs-reference comparisons over prompts, verdicts (notebook 04)
- :mod:`helpers.timing`        speed and memory measurement, bandwidth and bytes per token (notebook 03)
- :mod:`helpers.outliers`      LLM.int8() outlier features from recorded activations (notebook 05)
- :mod:`helpers.runtime`       thread control, quiet logging, machine load, a synchronized timer
- :mod:`helpers.provenance`    data files with their provenance sidecar
- :mod:`helpers.runner`        executes the numbered notebooks with papermill
"""

from pathlib import Path

#: Root of the repository (the helpers package is installed in editable mode).
REPO_ROOT = Path(__file__).resolve().parent.parent

__all__ = ["REPO_ROOT"]
