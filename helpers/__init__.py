"""Shared code for the post-training-quantization compendium.

One module per concern, one line each; notebooks import what they need:

- :mod:`helpers.models`        the embedded real models (GGUF in PyPI wheels -> safetensors), model names
- :mod:`helpers.gguf`          GGUF files: tensor types, conversion to safetensors, the grids their types use
- :mod:`helpers.methods`       the method registry (fp32 ... fp4-dq) and :func:`~helpers.methods.load`
- :mod:`helpers.quantization`  codebooks, block-wise round trips, bits and bytes of quantized models
- :mod:`helpers.evaluation`    perplexity on held-out text, seeded continuations (notebook 01)
- :mod:`helpers.measures`      exact next-token measures over (T, top-k) and their CPU kernel
- :mod:`helpers.generation`    seeded batched generation, quality of generations, the batch check
- :mod:`helpers.sweep`         the sampling sweep of notebook 02, cut into resumable units
- :mod:`helpers.textscore`     next-word prediction on running text, its units and controls (notebook 04)
- :mod:`helpers.documents`     running text per document: perplexity, the memorisation flag, verdicts without it
- :mod:`helpers.efftemp`       effective temperature under three definitions, its controls, bootstrap refits
- :mod:`helpers.analysis`      every claim's statistic and verdict (C1-C5, equal memory), the synthesis
- :mod:`helpers.judge`         generations judged by another model in bits per novel byte, greedy loops
- :mod:`helpers.timing`        speed measurement, the speed tables of every hardware class (notebook 03)
- :mod:`helpers.memory`        what a model holds, peak memory, bandwidth and bytes per token, the memory bars
- :mod:`helpers.outliers`      LLM.int8() outlier features from recorded activations, notebook 05's panels
- :mod:`helpers.bits`          quality per model bit, larger-at-lower-precision, the GGUF-grid confound (notebook 06)
- :mod:`helpers.explorer`      the temperature explorer (notebook 07)
- :mod:`helpers.stats`         every bootstrap: blocks of tokens, rows of prompts, resampled sums
- :mod:`helpers.store`         append-only results store that survives SIGKILL; the one cache-key rule
- :mod:`helpers.provenance`    data files with their provenance sidecar
- :mod:`helpers.runtime`       thread control, quiet logging, machine load, hardware class, a timer
- :mod:`helpers.notebook`      the one setup call of every notebook, its colours, interval text and log axes
- :mod:`helpers.runner`        executes the numbered notebooks with papermill
- :mod:`helpers.compare`       a rerun's tables against the committed ones: what moved
- :mod:`helpers.workers`       shares the units of notebooks 02 and 04 over processes or machines
- :mod:`helpers.site`          the executed notebooks as an HTML book, checked in headless Chromium
"""

from pathlib import Path

#: Root of the repository (the helpers package is installed in editable mode).
REPO_ROOT = Path(__file__).resolve().parent.parent

__all__ = ["REPO_ROOT"]
