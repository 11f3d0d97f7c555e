"""The temperature explorer (helpers/explorer.py) on hand-made logits, without a browser or a model."""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import explorer  # noqa: E402

LN = math.log


class FakeTokenizer:
    """Token i decodes to WORDS[i]; a prompt is one token per character (ids mod the vocabulary)."""

    WORDS = [" Paris", " Rome", "\n", "the", " <b>", "x"]
    pad_token_id = 0

    def decode(self, ids):
        return "".join(self.WORDS[i] for i in ids)

    def __call__(self, text):
        return {"input_ids": [ord(c) % len(self.WORDS) for c in text]}


class FakeModel(torch.nn.Module):
    """Logits depend on the last token and on a per-method offset, so methods differ."""

    def __init__(self, offset: float):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) + offset)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
        return SimpleNamespace(logits=self.table[input_ids])


def by_method(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {m: g.reset_index(drop=True) for m, g in table.groupby("method")}


# --------------------------------------------------------------------------- measures
def test_entropy_and_total_variation_by_hand():
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    assert explorer.entropy(p) == pytest.approx(1.75 * LN(2))
    assert explorer.entropy(torch.tensor([1.0, 0.0, 0.0])) == 0.0  # 0 log 0 = 0
    assert explorer.total_variation(p, torch.tensor([0.25, 0.5, 0.125, 0.125])) == pytest.approx(0.25)
    assert explorer.total_variation(p, p) == 0.0


def test_token_labels_show_spaces_and_newlines():
    assert explorer.label_tokens(FakeTokenizer(), [0, 2, 3]) == ["' Paris'", "'\\n'", "'the'"]
    assert explorer.label_tokens(None, [7]) == ["#7"]
    assert explorer.token_label("日本") == "'\\u65e5\\u672c'"  # escaped: fonts may lack the glyphs
    assert explorer.token_label(" café") == "' café'"


# --------------------------------------------------------------------------- view
def test_view_probabilities_entropy_and_tv_by_hand():
    # softmax([ln 3, 0, 0]) = [3, 1, 1] / 5; at T = 0.5 the logits double: [9, 1, 1] / 11
    logits = {"fp32": torch.tensor([LN(3), 0.0, 0.0, -30.0]), "nf4": torch.tensor([0.0, LN(3), 0.0, -30.0])}
    t1 = by_method(explorer.view(logits, None, temperature=1.0, n_top=3))
    assert t1["fp32"].probability.tolist() == pytest.approx([0.6, 0.2, 0.2], abs=1e-6)
    assert t1["fp32"].token_id.tolist() == [0, 1, 2]  # ties: lower token id first
    assert t1["nf4"].token_id.tolist() == [1, 0, 2]
    assert t1["nf4"].reference_probability.tolist() == pytest.approx([0.2, 0.6, 0.2], abs=1e-6)
    h = -(0.6 * LN(0.6) + 2 * 0.2 * LN(0.2))
    assert t1["fp32"].entropy.iloc[0] == pytest.approx(h, abs=1e-6)
    assert t1["fp32"].tv_from_reference.iloc[0] == 0.0
    assert t1["nf4"].tv_from_reference.iloc[0] == pytest.approx(0.4, abs=1e-6)  # 0.5 * (0.4 + 0.4)

    t05 = by_method(explorer.view(logits, None, temperature=0.5, n_top=3))
    assert t05["fp32"].probability.tolist() == pytest.approx([9 / 11, 1 / 11, 1 / 11], abs=1e-6)
    assert t05["nf4"].tv_from_reference.iloc[0] == pytest.approx(8 / 11, abs=1e-6)
    assert t05["fp32"].entropy.iloc[0] == pytest.approx(-(9 / 11 * LN(9 / 11) + 2 / 11 * LN(1 / 11)), abs=1e-6)


def test_greedy_at_zero_temperature():
    logits = {
        "fp32": torch.tensor([0.1, 2.0, 1.9]),
        "int8": torch.tensor([0.1, 1.9, 2.0]),
        "nf4": torch.tensor([0.0, 3.0, 1.0]),
    }
    t = by_method(explorer.view(logits, None, temperature=0.0, n_top=5))
    for method, top in (("fp32", 1), ("int8", 2), ("nf4", 1)):
        assert len(t[method]) == 1 and t[method].token_id[0] == top and t[method].probability[0] == 1.0
        assert t[method].entropy[0] == 0.0 and t[method].kept_tokens[0] == 1
    assert t["int8"].tv_from_reference[0] == 1.0  # different argmax: disjoint one-hots
    assert t["nf4"].tv_from_reference[0] == 0.0


def test_top_k_keeps_exactly_k_even_on_ties():
    logits = {"fp32": torch.tensor([1.0, 1.0, 1.0, 0.0])}
    t = explorer.view(logits, None, temperature=1.0, top_k=2, n_top=10)
    assert len(t) == 2 and (t.kept_tokens == 2).all()
    assert t.probability.tolist() == pytest.approx([0.5, 0.5])
    assert explorer.view(logits, None, 1.0, top_k=1, n_top=10).probability.tolist() == [1.0]
    # k = 2 of [ln 3, ln 2, 0, -5]: [3, 2] / 5 at T = 1
    t = explorer.view({"fp32": torch.tensor([LN(3), LN(2), 0.0, -5.0])}, None, 1.0, top_k=2, n_top=10)
    assert t.probability.tolist() == pytest.approx([0.6, 0.4], abs=1e-6)
    assert t.entropy.iloc[0] == pytest.approx(-(0.6 * LN(0.6) + 0.4 * LN(0.4)), abs=1e-6)


def test_top_k_off_and_larger_than_the_vocabulary_are_the_same():
    x = {"fp32": torch.tensor([2.0, 1.0, 0.5, 0.0])}
    pd.testing.assert_frame_equal(
        explorer.view(x, None, 0.8, top_k=0, n_top=4), explorer.view(x, None, 0.8, top_k=10, n_top=4)
    )


def test_n_top_limits_the_rows_and_labels_come_from_the_tokenizer():
    logits = {"fp32": torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])}
    t = explorer.view(logits, FakeTokenizer(), 1.0, n_top=2)
    assert t["rank"].tolist() == [1, 2] and t.token.tolist() == ["'x'", "' <b>'"]
    assert (t.kept_tokens == 6).all()
    # three tokens tie for the top: the two shown are the lowest ids, whatever topk's internal order
    t = explorer.view({"fp32": torch.tensor([0.0, 1.0, 1.0, 1.0, -1.0])}, None, 1.0, n_top=2)
    assert t.token_id.tolist() == [1, 2]


def test_without_the_reference_the_reference_columns_are_missing():
    t = explorer.view({"nf4": torch.tensor([1.0, 0.0])}, None, 1.0, n_top=2)
    assert t.tv_from_reference.isna().all() and t.reference_probability.isna().all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=1.0, top_k=-1), "top_k"),
        (dict(temperature=1.0, n_top=0), "n_top"),
    ],
)
def test_view_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        explorer.view({"fp32": torch.zeros(3)}, None, **kwargs)


def test_view_rejects_mismatched_vocabularies():
    with pytest.raises(ValueError, match="same vocabulary"):
        explorer.view({"fp32": torch.zeros(3), "nf4": torch.zeros(4)}, None, 1.0)


def test_summary_has_one_row_per_method():
    logits = {"fp32": torch.tensor([LN(3), 0.0, 0.0]), "nf4": torch.tensor([0.0, LN(3), 0.0])}
    s = explorer.summary(explorer.view(logits, FakeTokenizer(), 1.0, n_top=3))
    assert s.method.tolist() == ["fp32", "nf4"]
    assert s.top_token.tolist() == ["' Paris'", "' Rome'"]
    assert s.top_probability.tolist() == pytest.approx([0.6, 0.6], abs=1e-6)


def test_over_prompts_agrees_with_view():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(5, 50, generator=g) * 3
    logits = {"fp32": ref, "nf4": ref + 2.0 * torch.randn(5, 50, generator=g)}  # some argmaxes differ
    table = explorer.over_prompts(logits, [0.3, 1.5], top_k=0)
    for T in (0.3, 1.5):
        views = [
            explorer.summary(explorer.view({m: x[i] for m, x in logits.items()}, None, T, n_top=1)).set_index("method")
            for i in range(5)
        ]
        row = table[(table.method == "nf4") & (table.temperature == T)].iloc[0]
        assert row.prompts == 5
        assert row.mean_tv == pytest.approx(sum(v.tv_from_reference["nf4"] for v in views) / 5, abs=1e-5)
        assert row.mean_entropy == pytest.approx(sum(v.entropy["nf4"] for v in views) / 5, abs=1e-4)
        same = [v.tv_from_reference["nf4"] for v in views if v.top_token["nf4"] == v.top_token["fp32"]]
        differs = [v.tv_from_reference["nf4"] for v in views if v.top_token["nf4"] != v.top_token["fp32"]]
        assert row.top1_agree == len(same) / 5
        assert row.mean_tv_top1_same == pytest.approx(sum(same) / len(same), abs=1e-5)
        assert row.mean_tv_top1_differs == pytest.approx(sum(differs) / len(differs), abs=1e-5)
    assert (table[table.method == "fp32"].mean_tv < 1e-6).all()
    assert table[table.method == "fp32"].mean_tv_top1_differs.isna().all()  # no prompt differs from itself
    with pytest.raises(ValueError, match="reference"):
        explorer.over_prompts({"nf4": ref}, [1.0])


# --------------------------------------------------------------------------- the cache
def counting_loader(calls: list):
    def load(model, method):
        calls.append((model, method))
        return FakeModel(offset={"fp32": 0.0, "nf4": 0.3}[method]), FakeTokenizer()

    return load


def test_cache_runs_each_method_once_and_typed_prompts_once_per_method(tmp_path):
    calls: list = []
    cache = explorer.LogitCache(["fp32", "nf4"], loader=counting_loader(calls), tokenizer=lambda m: FakeTokenizer())
    info = cache.fill("m", ["ab", "cd", "ab"])
    assert calls == [("m", "fp32"), ("m", "nf4")] and info["computed"] == ["fp32", "nf4"] and info["prompts"] == 2
    cache.fill("m", ["cd"])
    assert len(calls) == 2  # cached: nothing loaded again
    got = cache.logits("m", "ab")
    assert set(got) == {"fp32", "nf4"} and got["fp32"].shape == (6,)
    assert len(calls) == 2
    cache.logits("m", "a typed prompt")
    cache.logits("m", "another one")
    assert len(calls) == 4  # each method loaded once for typed prompts, then kept
    assert cache.stacked("m", ["ab", "cd"])["nf4"].shape == (2, 6)
    with pytest.raises(ValueError, match="empty"):
        cache.logits("m", "  ")


def test_cache_on_disk_is_read_back_without_loading(tmp_path):
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text("{}")
    calls: list = []
    first = explorer.LogitCache(["fp32", "nf4"], cache_dir=tmp_path / "cache", loader=counting_loader(calls))
    first.fill(str(model), ["ab", "cd"])
    assert len(calls) == 2 and len(list((tmp_path / "cache").glob("*.pt"))) == 2
    second = explorer.LogitCache(["fp32", "nf4"], cache_dir=tmp_path / "cache", loader=counting_loader(calls))
    info = second.fill(str(model), ["cd", "ab"])
    assert len(calls) == 2 and info["read"] == ["fp32", "nf4"]
    for m in ("fp32", "nf4"):
        assert torch.equal(first.stacked(str(model), ["ab", "cd"])[m], second.stacked(str(model), ["ab", "cd"])[m])
    second.fill(str(model), ["ab", "ef"])  # a new prompt: computed, the old ones kept
    assert len(calls) == 4
    third = explorer.LogitCache(["fp32"], cache_dir=tmp_path / "cache", loader=counting_loader(calls))
    assert third.fill(str(model), ["ab", "cd", "ef"])["read"] == ["fp32"]


def test_cache_rejects_unknown_methods():
    with pytest.raises(ValueError, match="unknown method"):
        explorer.LogitCache(["fp33"])


# --------------------------------------------------------------------------- figure, HTML, widget
def sample_table() -> pd.DataFrame:
    logits = {
        "fp32": torch.tensor([LN(3), 0.0, 0.0, 0.0, 0.0, -1.0]),
        "nf4": torch.tensor([0.0, LN(3), 0.0, 0.0, 0.0, -1.0]),
    }
    return explorer.view(logits, FakeTokenizer(), 1.0, n_top=5)


def test_plot_views_draws_every_method_and_names_them_in_the_legend():
    fig = explorer.plot_views([("T = 0.3", sample_table()), ("T = 1.5", sample_table())], title="a prompt")
    assert len(fig.axes) == 4
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(s.startswith("fp32") for s in labels) and any(s.startswith("nf4") for s in labels)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][:2] == ["' Paris'", "' Rome'"]
    assert "TV from fp32" in fig.axes[1].get_title()


def test_render_html_escapes_tokens():
    out = explorer.render_html(sample_table())
    assert "&lt;b&gt;" in out and "<b>'" not in out
    assert f"TV from fp32 {2 / (7 + math.exp(-1)):.3f}" in out  # 0.5 * (|3 - 1| + |1 - 3|) / (7 + 1/e)


def widget_cache():
    calls: list = []
    cache = explorer.LogitCache(["fp32", "nf4"], loader=counting_loader(calls), tokenizer=lambda m: FakeTokenizer())
    prompts = pd.DataFrame({"id": ["p1", "p2"], "prompt": ["ab", "cd"]})
    cache.fill("m", list(prompts.prompt))
    return cache, prompts, calls


def test_widget_responds_to_sliders_and_typed_prompts():
    w = pytest.importorskip("ipywidgets")
    cache, prompts, calls = widget_cache()
    box, reason = explorer.build_widget(cache, ["m"], prompts, temperature=1.0, top_k=0, n_top=3)
    assert reason == "" and isinstance(box, w.VBox)
    controls, display = box.children
    sliders = {c.description: c for c in controls.children[2].children}
    before = display.value
    assert "fp32" in before and "nf4" in before
    sliders["temperature"].value = 0.0
    assert display.value != before and "1 tokens kept" in display.value
    sliders["top-k (0 off)"].value = 2
    sliders["temperature"].value = 1.0
    assert "2 tokens kept" in display.value
    typed = controls.children[1]
    typed.value = "ba"
    prompt_box = controls.children[0].children[1]
    assert prompt_box.value == "ba" and len(prompt_box.options) == 3
    assert len(calls) == 4  # two methods for the list, then each once for the typed prompt


def test_widget_degrades_without_ipywidgets(monkeypatch):
    cache, prompts, _ = widget_cache()
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import fails
    box, reason = explorer.build_widget(cache, ["m"], prompts)
    assert box is None and "ipywidgets" in reason
