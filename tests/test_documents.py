"""Per-document perplexity, the memorisation flag and the verdict check (helpers.documents) on
hand-computed block sums."""

import hashlib
import math

import pandas as pd
import pytest

from helpers import REPO_ROOT, documents


def _blocks(rows):
    """Nominal block sums at T = 1, top-k off, from ``(model, doc, method, block, n, logloss, ref_logloss)``."""
    cols = ["model", "doc", "method", "block", "n", "logloss", "ref_logloss"]
    return pd.DataFrame(rows, columns=cols).assign(view="nominal", top_k=0, temperature=1.0, window=0)


def test_perplexity_and_increase_are_ratios_of_sums():
    blocks = _blocks(
        [
            ("m", "a", "nf4", 0, 10, 12.0, 10.0),
            ("m", "a", "nf4", 1, 10, 33.0, 30.0),
            ("m", documents.UNSEEN, "nf4", 0, 20, 60.0, 60.0),
        ]
    )
    table = documents.perplexity_by_document(blocks, n_boot=200).set_index(["doc", "method"])
    assert table.loc[("a", "fp32"), "perplexity"] == pytest.approx(math.exp(40 / 20))
    assert table.loc[("a", "nf4"), "perplexity"] == pytest.approx(math.exp(45 / 20))
    assert table.loc[("a", "nf4"), "increase_pct"] == pytest.approx(100 * (45 / 40 - 1))
    assert table.loc[("a", "fp32"), "increase_pct"] == 0
    assert table.loc[(documents.UNSEEN, "nf4"), "increase_pct"] == pytest.approx(0)
    assert table.loc[("a", "nf4"), "tokens"] == 20


def _table(ppl):
    """A perplexity table with fp32 rows only: ``{(model, doc): perplexity}``."""
    return pd.DataFrame([{"model": m, "doc": d, "method": "fp32", "perplexity": p} for (m, d), p in ppl.items()])


def test_flag_compares_with_the_unseen_text_of_the_same_model():
    u = documents.UNSEEN
    table = documents.flag_memorized(
        _table({("big", "alice"): 6.0, ("big", u): 15.0, ("small", "alice"): 6.0, ("small", u): 10.0}), below=0.5
    ).set_index(["model", "doc"])
    assert table.loc[("big", "alice"), "ratio"] == pytest.approx(0.4)
    assert table.loc[("big", "alice"), "flagged"]
    assert not table.loc[("small", "alice"), "flagged"]  # 0.6: above the rule
    assert not table.loc[("big", u), "flagged"]  # the unseen text never is
    strict = documents.flag_memorized(_table({("big", "alice"): 6.0, ("big", u): 15.0}), below=0.3)
    assert not strict.flagged.any()


def test_flag_needs_the_unseen_text_and_a_valid_rule():
    with pytest.raises(ValueError, match="unseen document"):
        documents.flag_memorized(_table({("m", "alice"): 6.0}))
    with pytest.raises(ValueError, match="below"):
        documents.flag_memorized(_table({("m", documents.UNSEEN): 6.0}), below=0)


def test_a_verdict_carried_by_a_flagged_document_is_caught():
    # the claim "holds" exactly when the memorised document is among the blocks
    blocks = pd.DataFrame(
        {"model": "m", "doc": ["alice", "alice", "code", documents.UNSEEN], "window": 0, "block": [0, 1, 0, 0]}
    )

    def claims_of(g):
        verdict = "holds" if "alice" in set(g.doc) else "inconclusive"
        return pd.DataFrame([{"claim": "C3", "version": "first", "subject": "nf4", "verdict": verdict}])

    claims = documents.claims_by_document(blocks, {("m", "alice")}, claims_of)
    assert set(claims.documents) == {"all", "unflagged", "alice", "code", documents.UNSEEN}
    assert claims.set_index("documents").blocks.to_dict() == {
        "all": 4, "unflagged": 2, "alice": 2, "code": 1, documents.UNSEEN: 1
    }  # fmt: skip
    check = documents.document_check(claims)
    assert check.loc[0, "all"] == "holds" and check.loc[0, "unflagged"] == "inconclusive"
    assert bool(check.loc[0, "changes_without_flagged"])
    flagged = pd.DataFrame([{"model": "m", "doc": "alice", "flagged": True, "ratio": 0.4, "unseen_perplexity": 15.0}])
    lines = documents.summary_lines(flagged, check, 0.5)
    assert lines[0].endswith("m on alice (0.40x: perplexity 6.0 against 15.0).")
    assert "C3 (first) nf4 on m: holds -> inconclusive" in lines[1]
    assert documents.summary_lines(flagged.iloc[:0], check.assign(changes_without_flagged=False), 0.5)[1].startswith(
        "No verdict"
    )
    borderline = flagged.assign(ratio=0.52, flagged=False)  # 4% above the rule: named as borderline
    lines = documents.summary_lines(borderline, check, 0.5)
    assert lines[0].endswith("none.") and lines[1].endswith("m on alice (0.52x).") and len(lines) == 3


@pytest.mark.artifacts
def test_every_document_is_the_file_its_manifest_names():
    folder = REPO_ROOT / "data" / "texts"
    table = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
    for row in table.itertuples():
        assert hashlib.sha256((folder / row.file).read_bytes()).hexdigest() == row.sha256, row.id
    assert documents.UNSEEN in set(table.id)
    kind = documents.kinds(folder / "manifest.csv")
    assert kind["python_graphlib"] == "Python source code" and all(kind.values())
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in (folder / "python_graphlib.LICENSE.txt").read_text()
