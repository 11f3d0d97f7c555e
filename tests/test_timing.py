"""Timing and memory helpers (helpers.timing) on synthetic workloads; no timed assertions."""

import math
import time

import pytest
import torch

from helpers import timing


def test_generation_timing_arithmetic():
    t = timing.GenerationTiming(new_tokens=5, batch=1, ttft_s=0.5, total_s=1.3, step_s=[0.1, 0.2, 0.2, 0.3])
    assert t.decode_tokens_per_s == pytest.approx(4 / 0.8)
    # a 3-token generation: prefill + first token, then two steps
    assert t.e2e_tokens_per_s_at(3) == pytest.approx(3 / (0.5 + 0.1 + 0.2))
    assert t.e2e_tokens_per_s_at(1) == pytest.approx(1 / 0.5)
    assert t.e2e_tokens_per_s_at(5) == pytest.approx(5 / t.total_s)  # the whole run
    for bad in (0, 6):
        with pytest.raises(ValueError):
            t.e2e_tokens_per_s_at(bad)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(batch_sizes=[], max_new_tokens=[16], repeats=5, warmup=1), "batch_sizes"),
    (dict(batch_sizes=[1], max_new_tokens=[0], repeats=5, warmup=1), "max_new_tokens"),
    (dict(batch_sizes=[1], max_new_tokens=[1], repeats=5, warmup=1), "prefill"),
    (dict(batch_sizes=[1], max_new_tokens=[16], repeats=0, warmup=1), "repeats"),
    (dict(batch_sizes=[1], max_new_tokens=[16], repeats=5, warmup=-1), "warmup"),
])
def test_bad_benchmark_settings_fail_in_one_line(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern) as err:
        timing.validate(**kwargs)
    assert "\n" not in str(err.value)


def test_repeat_discards_warmup_and_records_load():
    calls = []
    out = timing.repeat(lambda: calls.append(1) or len(calls), repeats=3, warmup=2)
    assert [v for v, _ in out] == [3, 4, 5] and all(load >= 0 for _, load in out)


def _allocate_and_free(mib: int = 64) -> None:
    """Touch ``mib`` MiB and free them (large blocks go back to the system), raising VmHWM over VmRSS."""
    x = torch.ones(mib * 2**20 // 4)
    x += 1
    del x


def test_peak_rss_sees_a_synthetic_allocation_and_can_be_reset():
    if not timing.reset_peak_rss():  # kernels and sandboxes without a working clear_refs
        _allocate_and_free()
        assert math.isnan(timing.peak_memory("cpu")["peak_rss_MiB"])
        pytest.skip("this kernel cannot reset the peak RSS; the NaN path was checked instead")
    before = timing.rss_mib("VmHWM")
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    x += 1
    peak = timing.peak_memory("cpu")["peak_rss_MiB"]
    assert peak - before > 50
    del x
    assert timing.reset_peak_rss()  # the high-water mark falls back to the current RSS
    assert timing.rss_mib("VmHWM") < peak - 50


@pytest.mark.parametrize("refuses", [True, False])
def test_a_peak_rss_reset_that_does_not_take_gives_nan_not_the_lifetime_peak(tmp_path, monkeypatch, refuses):
    # a sandbox either refuses the write (no such file) or accepts it and does nothing (a plain file)
    fake = tmp_path / "missing" / "clear_refs" if refuses else tmp_path / "clear_refs"
    monkeypatch.setattr(timing, "_CLEAR_REFS", fake)
    _allocate_and_free()  # now VmHWM is at least 64 MiB above VmRSS
    if timing.rss_mib("VmHWM") - timing.rss_mib("VmRSS") <= timing.RESET_SLACK_MIB:
        pytest.skip("no /proc/self/status high-water mark on this system")
    assert timing.reset_peak_memory("cpu") is False
    assert math.isnan(timing.peak_memory("cpu")["peak_rss_MiB"])


def test_bandwidth_is_positive_and_bytes_per_token_by_hand():
    bw = timing.memory_bandwidth(size_mib=16, repeats=1)
    assert bw["read_GBps"] > 0 and bw["copy_GBps"] > 0
    # tied: the output head reads the whole table; untied: one embedding row is negligible
    assert timing.bytes_per_token(1000, 300, tied_embeddings=True, kv_bytes=10) == 1010
    assert timing.bytes_per_token(1000, 300, tied_embeddings=False, kv_bytes=10) == 710
    with pytest.raises(ValueError):
        timing.bytes_per_token(100, 300, tied_embeddings=False, kv_bytes=0)


class _Cfg:
    num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_size, head_dim = 2, 4, 2, 64, 16


def test_kv_cache_bytes_by_hand():
    # 2 (K and V) x 2 layers x 2 kv heads x 16 dims x 10 tokens x 2 bytes
    assert timing.kv_cache_bytes(_Cfg(), 10, 2) == 2 * 2 * 2 * 16 * 10 * 2


@pytest.mark.models
def test_timed_generate_is_fixed_length_and_steps_add_up(loaded):
    model, tok = loaded("fp32")
    inputs = tok(["Hello there", "The capital of France is"], return_tensors="pt", padding=True)
    t = timing.timed_generate(model, inputs, tok, 6)
    assert t.new_tokens == 6 and t.batch == 2 and len(t.step_s) == 5
    assert 0 < t.ttft_s < t.total_s
    assert t.ttft_s + sum(t.step_s) == pytest.approx(t.total_s, rel=0.2)


class _CudaRecorder:
    """Stands in for ``torch.cuda``'s synchronize and memory counters, logging each call, so
    the CUDA branch of the timing helpers runs (and is checked) on a machine without a GPU."""

    def __init__(self, monkeypatch):
        self.events: list[str] = []
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: self.events.append("sync"))
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: self.events.append("reset"))
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 4 * 2**20)
        real_clock = time.perf_counter
        monkeypatch.setattr(timing.time, "perf_counter", lambda: self.events.append("clock") or real_clock())


class _FakeGenerator:
    """``generate`` that emits ``n`` tokens, calling the stopping criteria once per token."""

    def generate(self, input_ids, attention_mask=None, stopping_criteria=None, max_new_tokens=1, **kwargs):
        out = input_ids
        for _ in range(max_new_tokens):
            out = torch.cat([out, torch.zeros(out.shape[0], 1, dtype=out.dtype)], dim=1)
            assert not any(c(out, None).any() for c in stopping_criteria)
        return out


class _Tokenizer:
    pad_token_id = 0
    eos_token_id = 0


def test_cuda_branch_synchronizes_before_every_clock_reading(monkeypatch):
    rec = _CudaRecorder(monkeypatch)
    inputs = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    t = timing.timed_generate(_FakeGenerator(), inputs, _Tokenizer(), 4, device="cuda")
    assert t.new_tokens == 4 and t.batch == 2 and len(t.step_s) == 3
    clocks = [i for i, e in enumerate(rec.events) if e == "clock"]
    assert len(clocks) == 1 + 4 + 1  # start, one per token, end
    assert all(i > 0 and rec.events[i - 1] == "sync" for i in clocks)
    # on the CPU the same code reads the clock without synchronizing
    rec.events.clear()
    timing.timed_generate(_FakeGenerator(), inputs, _Tokenizer(), 4, device="cpu")
    assert "sync" not in rec.events and rec.events.count("clock") == 6


def test_cuda_branch_memory_counters_are_reset_synchronized_and_named(monkeypatch):
    rec = _CudaRecorder(monkeypatch)
    assert timing.reset_peak_memory("cuda:0") is True
    assert rec.events == ["sync", "reset"]
    assert timing.peak_memory("cuda:0") == {"max_memory_allocated_MiB": 3.0, "max_memory_reserved_MiB": 4.0}
    assert rec.events[-1] == "sync"
