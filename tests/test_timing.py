"""Timing and memory helpers (helpers.timing) on synthetic workloads; no timed assertions."""

import math
import mmap
import time

import pandas as pd
import pytest
import torch

from helpers import analysis, memory, timing
from helpers.provenance import save_table


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


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(batch_sizes=[], max_new_tokens=[16], repeats=5, warmup=1), "batch_sizes"),
        (dict(batch_sizes=[1], max_new_tokens=[0], repeats=5, warmup=1), "max_new_tokens"),
        (dict(batch_sizes=[1], max_new_tokens=[1], repeats=5, warmup=1), "prefill"),
        (dict(batch_sizes=[1], max_new_tokens=[16], repeats=0, warmup=1), "repeats"),
        (dict(batch_sizes=[1], max_new_tokens=[16], repeats=5, warmup=-1), "warmup"),
    ],
)
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
    if not memory.reset_peak_rss():  # kernels and sandboxes without a working clear_refs
        _allocate_and_free()
        assert math.isnan(memory.peak_memory("cpu")["peak_rss_MiB"])
        pytest.skip("this kernel cannot reset the peak RSS; the NaN path was checked instead")
    before = memory.rss_mib("VmHWM")
    # 64 MiB of fresh pages, each touched: a heap allocation could reuse pages freed by earlier tests
    # (a loaded 0.5B model) that are still resident, and then the RSS would not grow
    size = 64 * 2**20
    x = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        x[offset] = 1
    peak = memory.peak_memory("cpu")["peak_rss_MiB"]
    assert peak - before > 50
    x.close()
    assert memory.reset_peak_rss()  # the high-water mark falls back to the current RSS
    assert memory.rss_mib("VmHWM") < peak - 50


@pytest.mark.parametrize("refuses", [True, False])
def test_a_peak_rss_reset_that_does_not_take_gives_nan_not_the_lifetime_peak(tmp_path, monkeypatch, refuses):
    # a sandbox either refuses the write (no such file) or accepts it and does nothing (a plain file)
    fake = tmp_path / "missing" / "clear_refs" if refuses else tmp_path / "clear_refs"
    monkeypatch.setattr(memory, "_CLEAR_REFS", fake)
    _allocate_and_free()  # now VmHWM is at least 64 MiB above VmRSS
    if memory.rss_mib("VmHWM") - memory.rss_mib("VmRSS") <= memory.RESET_SLACK_MIB:
        pytest.skip("no /proc/self/status high-water mark on this system")
    assert memory.reset_peak_memory("cpu") is False
    assert math.isnan(memory.peak_memory("cpu")["peak_rss_MiB"])


def test_bandwidth_is_positive_and_bytes_per_token_by_hand():
    bw = memory.memory_bandwidth(size_mib=16, repeats=1)
    assert bw["read_GBps"] > 0 and bw["copy_GBps"] > 0
    # tied: the output head reads the whole table; untied: one embedding row is negligible
    assert memory.bytes_per_token(1000, 300, tied_embeddings=True, kv_bytes=10) == 1010
    assert memory.bytes_per_token(1000, 300, tied_embeddings=False, kv_bytes=10) == 710
    with pytest.raises(ValueError):
        memory.bytes_per_token(100, 300, tied_embeddings=False, kv_bytes=0)


class _Cfg:
    num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_size, head_dim = 2, 4, 2, 64, 16


def test_kv_cache_bytes_by_hand():
    # 2 (K and V) x 2 layers x 2 kv heads x 16 dims x 10 tokens x 2 bytes
    assert memory.kv_cache_bytes(_Cfg(), 10, 2) == 2 * 2 * 2 * 16 * 10 * 2


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
    assert memory.reset_peak_memory("cuda:0") is True
    assert rec.events == ["sync", "reset"]
    assert memory.peak_memory("cuda:0") == {"max_memory_allocated_MiB": 3.0, "max_memory_reserved_MiB": 4.0}
    assert rec.events[-1] == "sync"


# --------------------------------------------------------------------------- C4 / C5 verdicts, by hand
def _summary(speeds: dict[str, float], **keys) -> pd.DataFrame:
    return pd.DataFrame(
        [{"model": "m", "batch": 1, **keys, "method": k, "decode_tokens_per_s": v} for k, v in speeds.items()]
    )


def _verdict(v: pd.DataFrame, claim: str) -> pd.Series:
    rows = v[v.claim == claim]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_c4_and_c5_hold_when_int8_is_slow_and_16_bit_fastest():
    v = analysis.c4_c5_verdicts(_summary({"fp32": 10, "bf16": 20, "fp16": 25, "int8": 5, "nf4": 12}))
    c4, c5 = _verdict(v, "C4"), _verdict(v, "C5")
    assert c4.verdict == "holds" and c4.ratio == pytest.approx(5 / 25)  # compared with the faster 16-bit method
    assert "int8 5.0 tok/s = 0.20 x best 16-bit (fp16 25.0)" in c4.numbers and "slowest: int8 5.0" in c4.numbers
    assert c5.verdict == "holds" and c5.ratio == pytest.approx(12 / 25)  # the fastest other method: nf4
    assert c5.numbers == "fastest other than 16-bit: nf4 12.0 tok/s = 0.48 x best 16-bit (fp16 25.0)"


def test_c4_and_c5_fail_when_int8_is_close_and_fp32_fastest():
    v = analysis.c4_c5_verdicts(_summary({"fp32": 30, "bf16": 20, "int8": 12}))  # no fp16: bf16 is the 16-bit baseline
    c4, c5 = _verdict(v, "C4"), _verdict(v, "C5")
    assert c4.verdict == "does not hold" and c4.ratio == pytest.approx(0.6)
    assert c5.verdict == "does not hold" and c5.ratio == pytest.approx(1.5)
    assert c5.numbers == "fastest other than 16-bit: fp32 30.0 tok/s = 1.50 x best 16-bit (bf16 20.0)"


def test_verdict_boundaries():
    # int8 within 5% of half the 16-bit speed, and a method within 5% of the best 16-bit one, are ties
    v = analysis.c4_c5_verdicts(_summary({"fp16": 20, "int8": 10, "nf4": 20}))
    assert _verdict(v, "C4").verdict == "inconclusive" and _verdict(v, "C5").verdict == "inconclusive"
    for int8, verdict in ((9.4, "holds"), (9.5, "inconclusive"), (10.5, "inconclusive"), (10.6, "does not hold")):
        assert _verdict(analysis.c4_c5_verdicts(_summary({"fp16": 20, "int8": int8})), "C4").verdict == verdict, int8
    cases = (
        (18.9, "holds"),
        (19.0, "inconclusive"),
        (20.9, "inconclusive"),
        (21.0, "inconclusive"),
        (21.1, "does not hold"),
    )
    for nf4, verdict in cases:  # the bounds (0.95 and 1.05 x) are ties
        assert _verdict(analysis.c4_c5_verdicts(_summary({"fp16": 20, "nf4": nf4})), "C5").verdict == verdict, nf4


def test_groups_without_16_bit_or_int8():
    assert analysis.c4_c5_verdicts(_summary({"fp32": 10, "int8": 2})).empty  # nothing to compare with
    v = analysis.c4_c5_verdicts(_summary({"fp16": 10, "nf4": 4}))
    assert list(v.claim) == ["C5"]
    assert analysis.c4_c5_verdicts(_summary({"fp16": 10, "bf16": 8})).empty  # 16-bit only: nothing to compare


def test_verdicts_per_hardware_class_model_and_batch():
    s = pd.concat(
        [
            _summary({"fp16": 20, "int8": 4}, hardware_class="cpu-a"),
            _summary({"fp16": 20, "int8": 16}, hardware_class="cpu-b"),
            _summary({"fp16": 10, "fp32": 12}, hardware_class="cpu-b", batch=8),
        ]
    )
    v = analysis.c4_c5_verdicts(s)
    assert list(v.columns) == ["claim", "hardware_class", "model", "batch", "verdict", "ratio", "numbers"]
    got = {(r.hardware_class, r.batch, r.claim): r.verdict for r in v.itertuples()}
    assert got == {
        ("cpu-a", 1, "C4"): "holds",
        ("cpu-a", 1, "C5"): "holds",
        ("cpu-b", 1, "C4"): "does not hold",
        ("cpu-b", 1, "C5"): "holds",
        ("cpu-b", 8, "C5"): "does not hold",
    }


def test_speed_ratios_by_hand():
    r = analysis.speed_ratios(_summary({"fp32": 10, "bf16": 16, "fp16": 20, "int8": 5})).set_index("method")
    assert r.ratio_to_16bit.to_dict() == pytest.approx({"fp32": 0.5, "bf16": 0.8, "fp16": 1.0, "int8": 0.25})
    assert set(r.best_16bit) == {"fp16"}


def test_litgpt_a100_table_gives_its_own_ratios():
    lit = timing.litgpt_a100_summary()
    v = analysis.c4_c5_verdicts(lit)
    assert _verdict(v, "C4").verdict == "holds" and _verdict(v, "C4").ratio == pytest.approx(12.66 / 47.66)
    assert _verdict(v, "C5").verdict == "holds"
    r = analysis.speed_ratios(lit).set_index("method").ratio_to_16bit
    assert r["fp4-dq"] == pytest.approx(25.54 / 47.66)


def test_side_by_side_puts_each_class_in_a_column():
    s = pd.concat(
        [
            _summary({"fp16": 20, "int8": 4}, hardware_class="cpu-avx2"),
            _summary({"fp16": 20, "int8": 16}, hardware_class="cpu-avx512bf16"),
            _summary({"fp16": 10, "fp32": 12}, hardware_class="cpu-avx2", batch=8),
        ]
    )
    ref = analysis.c4_c5_verdicts(timing.litgpt_a100_summary())
    wide = analysis.side_by_side(analysis.c4_c5_verdicts(s), ref)
    assert list(wide.columns) == ["cpu-avx2", "cpu-avx512bf16", "lit-gpt A100 (falcon-7b, batch 1)"]
    assert wide.loc[("C4", 1, "m")].tolist() == ["holds (0.20)", "does not hold (0.80)", "holds (0.27)"]
    assert wide.loc[("C5", 8, "m")].tolist() == ["does not hold (1.20)", "", ""]  # lit-gpt's table is batch 1


# --------------------------------------------------------------------------- summaries and hardware classes
def _runs(speeds: list[float], **extra) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model": "m",
            "method": "fp32",
            "batch": 1,
            "run": range(len(speeds)),
            "decode_tokens_per_s": speeds,
            "ttft_s": [0.1 * (i + 1) for i in range(len(speeds))],
            "load_average": [1.0, 3.0, 2.0][: len(speeds)],
            "bytes_per_token": 2 * 10**9,
            "weights_MiB": 100.0,
            **extra,
        }
    )


def test_summarize_by_hand():
    s = timing.summarize(_runs([10.0, 14.0, 11.0]), read_GBps=30.0).iloc[0]
    assert (s.decode_tokens_per_s, s.decode_min, s.decode_max) == (11.0, 10.0, 14.0)
    assert s.ttft_s == pytest.approx(0.2) and s.max_load_average == 3.0 and s.weights_MiB == 100.0
    assert s.roofline_tokens_per_s == pytest.approx(15.0)  # 30 GB/s over 2 GB per token


def test_class_tables_and_summaries_read_every_class(tmp_path):
    nb = "03_speed_and_memory"
    new = timing.summarize(_runs([10.0], new_tokens=16, prompt_tokens=32), 30.0).assign(hardware_class="cpu-avx512bf16")
    save_table(new, tmp_path / f"{nb}_cpu-avx512bf16_summary.csv", notebook=nb, parameters={"repeats": 3})
    # a table written before the class and length columns existed: both come from its name and provenance
    old = timing.summarize(_runs([20.0]), 30.0)
    save_table(
        old,
        tmp_path / f"{nb}_cpu-avx2_summary.csv",
        notebook=nb,
        parameters={"repeats": 5, "max_new_tokens": [2, 4], "prompt_tokens": 16},
    )
    for other in ("summary", "c4_c5_by_class"):  # not a class's table
        save_table(old, tmp_path / f"{nb}_{other}.csv", notebook=nb, parameters={})
    assert list(timing.class_tables(tmp_path, nb, "summary")) == ["cpu-avx2", "cpu-avx512bf16"]
    both = timing.class_summaries(tmp_path, nb).set_index("hardware_class")
    assert both.new_tokens.to_dict() == {"cpu-avx2": 4, "cpu-avx512bf16": 16}
    assert both.prompt_tokens.to_dict() == {"cpu-avx2": 16, "cpu-avx512bf16": 32}
    assert both.repeats.to_dict() == {"cpu-avx2": 5, "cpu-avx512bf16": 3}
    save_table(new, tmp_path / f"{nb}_cuda-h100_summary.csv", notebook=nb, parameters={})
    with pytest.raises(ValueError, match="not cuda-h100"):  # rows of another class under this name
        timing.class_summaries(tmp_path, nb)


def test_class_runs_names_the_classes_it_has(tmp_path):
    save_table(_runs([1.0]), tmp_path / "03_x_cpu-avx2_runs.csv", notebook="03_x", parameters={})
    runs, meta = timing.class_runs(tmp_path, "03_x", "cpu-avx2")
    assert set(runs.hardware_class) == {"cpu-avx2"} and meta["notebook"] == "03_x"
    with pytest.raises(FileNotFoundError, match="cpu-avx2"):
        timing.class_runs(tmp_path, "03_x", "cuda-h100")


# --------------------------------------------------------------------------- resumable timed units
class _CharTokenizer:
    """One token per character (ids 2..63); pad 0, EOS 1."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [2 + ord(c) % 62 for c in text]}


def _tiny_model(tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_memory_breakdown_parts_add_up(tied):
    model = _tiny_model(tied)
    parts = memory.memory_breakdown(model)
    mib = 2**20
    assert parts["tied_embeddings"] is tied
    assert parts["embedding_MiB"] * mib == 64 * 16 * 4 * (1 if tied else 2)  # the output head counts when untied
    linear = sum(p.numel() for n, p in model.model.layers.named_parameters() if "proj" in n) * 4
    assert parts["linear_MiB"] * mib == linear and parts["quant_state_MiB"] == 0 and parts["other_MiB"] > 0
    assert parts["embedding_MiB"] + parts["linear_MiB"] + parts["other_MiB"] == pytest.approx(parts["total_MiB"])
    assert parts["weights_MiB"] == pytest.approx(parts["total_MiB"])  # nothing quantized


def _bench(tmp_path, loads: list, **settings):
    cfg = timing.SpeedConfig(
        models=["tiny"],
        methods=["fp32"],
        batch_sizes=settings.pop("batch_sizes", [1]),
        max_new_tokens=[1, 2, 4],
        prompt_tokens=6,
        repeats=settings.pop("repeats", 2),
        warmup=1,
        threads=torch.get_num_threads(),
        **settings,
    )

    def load(model, method):
        loads.append((model, method))
        return _tiny_model(), _CharTokenizer()

    return timing.SpeedBenchmark(cfg, tmp_path, "The first words of a held-out text.", load=load)


def test_a_timed_unit_is_stored_once_and_not_recomputed(tmp_path):
    loads = []
    bench = _bench(tmp_path, loads)
    assert bench.store.folder == tmp_path / timing.hardware_class("cpu")  # one folder per hardware class
    assert bench.pending() == [("tiny", "fp32", 1)]
    assert bench.run(notebook="test") == 1 and loads == [("tiny", "fp32")]
    runs = bench.collect()
    assert len(runs) == 2 and (runs.decode_tokens_per_s > 0).all()
    assert {
        "e2e_tokens_per_s_1",
        "e2e_tokens_per_s_4",
        "embedding_MiB",
        "quant_state_MiB",
        "bytes_per_token",
        "hardware_class",
        "device_kind",
        "new_tokens",
    } <= set(runs.columns)
    assert (runs.new_tokens == 4).all() and (runs.hardware_class == timing.hardware_class("cpu")).all()

    again = _bench(tmp_path, loads)  # a rerun: nothing to time, the same rows
    assert again.pending() == [] and again.run() == 0 and loads == [("tiny", "fp32")]
    pd.testing.assert_frame_equal(again.collect(), runs)


def test_only_missing_or_changed_units_are_timed(tmp_path):
    loads = []
    _bench(tmp_path, loads).run()
    more = _bench(tmp_path, loads, batch_sizes=[1, 2])  # one new batch size: loaded once, one unit timed
    assert more.pending() == [("tiny", "fp32", 2)] and more.run() == 1 and len(loads) == 2
    assert sorted(more.collect().batch.unique()) == [1, 2]
    changed = _bench(tmp_path, loads, repeats=3)  # other settings: other keys, timed again
    assert changed.pending() == [("tiny", "fp32", 1)]
    assert len(changed.store.read()) == 2 + 2  # both stored units are kept


def test_the_bandwidth_is_the_one_stored_with_the_timings(tmp_path):
    """Measured while a unit is pending (and stored with the units timed then); once all are
    stored, the best reading stored with them, without measuring again."""
    readings = iter([{"read_GBps": 20.0, "copy_GBps": 30.0}, {"read_GBps": 25.0, "copy_GBps": 28.0}])
    calls = []

    def measure():
        calls.append(1)
        return next(readings)

    loads = []
    first = _bench(tmp_path, loads)
    bw = first.bandwidth(measure)
    assert bw == {"read_GBps": 20.0, "copy_GBps": 30.0} and len(calls) == 1
    first.run(bandwidth=bw)
    assert _bench(tmp_path, loads).bandwidth(measure) == bw and len(calls) == 1  # nothing timed: stored
    more = _bench(tmp_path, loads, batch_sizes=[1, 2])  # a pending unit: measured again, stored with it
    more.run(bandwidth=more.bandwidth(measure))
    assert len(calls) == 2
    both = _bench(tmp_path, loads, batch_sizes=[1, 2]).bandwidth(measure)
    assert both == {"read_GBps": 25.0, "copy_GBps": 30.0} and len(calls) == 2  # the best of each rate


def test_speed_config_fails_in_one_line_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        timing.SpeedConfig(models=["tiny"], methods=["fp33"]).validate()
    with pytest.raises(ValueError, match="prompt_tokens"):
        timing.SpeedConfig(models=["tiny"], methods=["fp32"], prompt_tokens=0).validate()
    with pytest.raises(ValueError, match="configure_threads"):
        timing.SpeedBenchmark(
            timing.SpeedConfig(models=["tiny"], methods=["fp32"], threads=torch.get_num_threads() + 1), tmp_path, "text"
        )


def test_prompt_inputs_and_harness_check():
    inputs = timing.prompt_inputs(_CharTokenizer(), "abcdefgh", 5, 3)
    assert inputs["input_ids"].shape == (3, 5) and inputs["attention_mask"].sum() == 15
    with pytest.raises(ValueError, match="fewer than prompt_tokens"):
        timing.prompt_inputs(_CharTokenizer(), "abc", 5, 1)
    h = timing.harness_check(
        _tiny_model(), timing.prompt_inputs(_CharTokenizer(), "abcdefgh", 5, 1), _CharTokenizer(), 4, 3
    )
    assert list(h.columns) == ["bare_s", "harness_s"] and len(h) == 3 and (h > 0).all().all()


def test_recounted_memory_must_match_the_stored_runs():
    runs = pd.DataFrame({"model": ["tiny"], "method": ["fp32"], "weights_MiB": [0.0], "quant_state_MiB": [0.0]})
    with pytest.raises(ValueError, match="weights_MiB counted"):
        memory.add_memory_breakdown(runs, lambda m, x: (_tiny_model(), None))
    runs["weights_MiB"] = memory.memory_breakdown(_tiny_model())["weights_MiB"]
    out = memory.add_memory_breakdown(runs, lambda m, x: (_tiny_model(), None))
    assert out.embedding_MiB.iloc[0] * 2**20 == 64 * 16 * 4


def test_count_words_counts_models():
    from helpers.analysis import count_words

    assert count_words(["holds", "holds"], of=" models") == "holds"
    assert (
        count_words(["holds", "holds", "does not hold", "holds"], of=" models") == "3 of 4 models hold, 1 does not hold"
    )


def test_a_method_with_non_finite_output_is_no_speed_reference():
    """fp16 overflows on Gemma-3: its fast decoding must not set the 16-bit reference."""
    import pandas as pd

    from helpers.analysis import c4_c5_verdicts, speed_ratios
    from helpers.timing import non_finite_methods

    summary = pd.DataFrame(
        {
            "model": ["g"] * 4,
            "batch": [1] * 4,
            "method": ["bf16", "fp16", "int8", "nf4"],
            "decode_tokens_per_s": [14.0, 21.0, 7.0, 10.5],
        }
    )
    methods = pd.DataFrame({"model": ["g", "g"], "method": ["bf16", "fp16"], "finite_logits": [True, False]})
    exclude = non_finite_methods(methods)
    assert exclude == {("g", "fp16")}
    plain = c4_c5_verdicts(summary).set_index("claim")
    assert plain.loc["C4", "ratio"] == pytest.approx(7 / 21) and plain.loc["C4", "verdict"] == "holds"
    fixed = c4_c5_verdicts(summary, exclude).set_index("claim")
    assert fixed.loc["C4", "ratio"] == pytest.approx(0.5) and fixed.loc["C4", "verdict"] == "inconclusive"  # a tie
    assert fixed.loc["C5", "ratio"] == pytest.approx(10.5 / 14) and "bf16 14.0" in fixed.loc["C5", "numbers"]
    assert set(speed_ratios(summary, exclude).method) == {"bf16", "int8", "nf4"}


def test_memory_bars_stack_the_parts_and_label_the_state():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame({"a": [1.0, 2.0], "b": [0.5, 0.0], "quant_state_MiB": [0.25, 0.0]}, index=["nf4", "fp32"])
    fig, (ax, low) = plt.subplots(1, 2)
    tops = memory.stacked_bars(ax, frame, [("a", "A", "k"), ("b", "B", "r")])
    assert list(tops) == [1.5, 2.0]
    bars = ax.patches
    assert [b.get_y() for b in bars] == [0.0, 0.0, 1.0, 2.0]  # B sits on A
    memory.state_bars(low, frame.quant_state_MiB)
    assert [t.get_text() for t in low.texts] == ["0.25", "0"]
    plt.close(fig)


def test_four_bit_embedding_note_only_where_4bit_holds_more():
    parts = pd.DataFrame({"total_MiB": [300.0, 280.0], "embedding_MiB": [100.0, 200.0]}, index=["bf16", "nf4"])
    assert memory.four_bit_embedding_note(parts) is None  # nf4 holds less
    parts.loc["nf4"] = [320.0, 200.0]  # the embedding in fp32: twice bf16's bytes
    note = memory.four_bit_embedding_note(parts)
    assert "unquantized in 32-bit floats, 200 MiB = 62% of nf4's bytes" in note
    assert memory.four_bit_embedding_note(parts.drop(index="bf16")) is None
    untied = parts.assign(tied_embeddings=False)
    assert "its embedding and head stay\nunquantized" in memory.four_bit_embedding_note(untied)


def test_crowded_markers_and_a_free_corner_by_hand():
    # a log-log panel of 1..100 on both axes: 10 sits at fraction 0.5
    xs, ys = [10, 10.5, 11, 50, 2], [10, 10.2, 9.8, 50, 90]
    assert memory.crowded(xs, ys, (1, 100), (1, 100)) == [0, 1, 2]  # chained within 0.045; 50 and 2 alone
    assert memory.crowded([2, 50], [2, 50], (1, 100), (1, 100)) == []
    # the point (0.5, 0.5) blocks no corner box of 0.4; one in each corner leaves none free
    assert memory.free_corner([0.5], [0.5]) == (0.58, 0.57)
    assert memory.free_corner([0.8], [0.8]) == (0.58, 0.08)  # upper right taken: lower right
    assert memory.free_corner([0.8, 0.8, 0.3, 0.3], [0.8, 0.3, 0.3, 0.8]) is None


def test_roofline_panel_zooms_into_crowded_markers_only():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = pd.DataFrame(
        {"MiB_per_token": [500.0, 160.0, 161.0, 162.0], "decode_tokens_per_s": [12.0, 16.0, 15.8, 16.3]},
        index=["fp32", "nf4", "nf4-dq", "fp4"],
    )
    d["roofline_tokens_per_s"] = 30e9 / (d.MiB_per_token * 2**20)
    d["share_of_limit"] = d.decode_tokens_per_s / d.roofline_tokens_per_s
    colors, markers = dict.fromkeys(d.index, "k"), dict.fromkeys(d.index, "o")
    fig, ax = plt.subplots()
    memory.roofline_panel(ax, d, 30.0, colors, markers, flagged={"fp4": "non-finite logits"})
    handles, labels = ax.get_legend_handles_labels()
    share = d.share_of_limit["fp32"]
    assert labels[:2] == ["bandwidth limit (30 GB/s read)", f"fp32: 12 tok/s, {share:.0%} of the limit"]
    assert labels[-1].endswith("of the limit (non-finite logits)")
    hollow, filled = handles[-1].get_facecolor(), handles[1].get_facecolor()
    assert (len(hollow) == 0 or hollow[0][3] == 0) and filled[0][3] == 1  # the flagged method is hollow
    (inset,) = ax.child_axes
    assert inset.get_title().endswith("nf4, nf4-dq, fp4") and len(inset.collections) == 3
    lo, hi = inset.get_xlim()
    assert lo < 160 and hi > 162 and hi < 200  # the zoom holds the three 4-bit markers, not fp32
    assert [t.get_text() for t in inset.get_xticklabels()] == ["160", "162"]  # ticks at data values only
    # the panel's markers stay outside the inset's corner
    fx = memory._fractions(d.MiB_per_token, ax.get_xlim())
    fy = memory._fractions(d.decode_tokens_per_s, ax.get_ylim())
    fig.canvas.draw()
    x0, y0, w, h = ax.transAxes.inverted().transform_bbox(inset.get_window_extent()).bounds
    assert not ((fx > x0) & (fx < x0 + w) & (fy > y0) & (fy < y0 + h)).any()
    plt.close(fig)

    fig, ax = plt.subplots()
    memory.roofline_panel(ax, d.loc[["fp32", "nf4"]], 30.0, colors, markers)
    assert ax.child_axes == []  # nothing crowded, no inset
    plt.close(fig)


def test_peak_below_held_names_the_untied_embedding():
    parts = pd.DataFrame(
        {
            "peak_growth_MiB": [1987.0, 3500.0, 600.0],
            "total_MiB": [2404.0, 1202.0, 700.0],
            "embedding_MiB": [1038.0, 519.0, 640.0],
            "tied_embeddings": [False, False, True],
        },
        index=["fp32", "bf16", "nf4"],
    )
    lines = memory.peak_below_held(parts)
    assert lines[0] == (
        "fp32: peak growth 1987 MiB, below the 2404 MiB it holds; a run reads all but the input embedding (519 MiB, "
        "a memory map read only in the looked-up rows): 1885 MiB, and the other 102 MiB of the peak are activations, "
        "the KV cache and other allocations"
    )
    assert lines[1] == "nf4: peak growth 600 MiB, below the 700 MiB it holds" and len(lines) == 2


@pytest.mark.models
def test_an_fp32_model_is_a_memory_map_of_its_checkpoint():
    """What notebook 03's memory section says of fp32 peaks: the weights stay file pages."""
    from helpers import methods as registry

    model, _ = registry.load("smollm2-135m", "fp32", "cpu")
    regions = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        start, end = (int(v, 16) for v in fields[0].split("-"))
        regions.append((start, end, fields[5] if len(fields) > 5 else ""))
    ptr = model.model.embed_tokens.weight.data_ptr()
    mapped = [name for start, end, name in regions if start <= ptr < end]
    assert mapped and mapped[0].endswith(".safetensors")


def test_c4_c5_panel_draws_each_model_on_its_method_rows():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = pd.DataFrame(
        {
            "model": ["a", "a", "b", "b", "falcon"],
            "method": ["int8", "nf4", "int8", "nf4", "int8"],
            "ratio_to_16bit": [0.3, 0.9, 0.6, 1.1, 0.27],
        }  # fmt: skip
    )
    verdicts = pd.DataFrame(
        {"claim": ["C4", "C4", "C5", "C5"], "verdict": ["holds", "does not hold", "holds", "holds"]}
    )
    fig, ax = plt.subplots()
    rows = {"bf16": 0, "int8": 1, "nf4": 2}
    timing.c4_c5_panel(ax, ratios, verdicts, rows, {"a": "o", "b": "s"}, {"int8": "g", "nf4": "b"}, "class x")
    points = [c.get_offsets().tolist() for c in ax.collections if len(c.get_offsets())]
    points = [[[round(v, 6) for v in xy] for xy in p] for p in points]
    assert [[0.3, 0.93], [0.9, 1.93]] in points  # model a a little to one side of its methods' rows
    assert [[0.6, 1.07], [1.1, 2.07]] in points and [[0.27, 1]] in points  # b to the other, the star on the row
    assert ax.get_title() == "class x\nC4 1 of 2 models holds, 1 does not hold\nC5 holds"
    c4 = analysis.C4_MAX_RATIO
    spans = [p.get_paths()[0].vertices for p in ax.collections if type(p).__name__ == "FillBetweenPolyCollection"]
    assert any(  # C4's tie band, on the int8 row only
        v[:, 0].min() == pytest.approx(c4 * (1 - analysis.C4_TIE))
        and v[:, 0].max() == pytest.approx(c4 * (1 + analysis.C4_TIE))
        and v[:, 1].min() == pytest.approx(0.55)
        and v[:, 1].max() == pytest.approx(1.45)
        for v in spans
    )
    plt.close(fig)
