from __future__ import annotations

import csv
import gzip
import json
import subprocess

import pandas as pd
import pytest

from helpers import provenance
from helpers.provenance import load_table, save_table


def test_save_and_load_roundtrip(tmp_path):
    df = pd.DataFrame({"model": ["m"], "method": ["nf4"], "ppl": [12.5]})
    path = provenance.save_table(df, tmp_path / "sub" / "t.csv", notebook="01_x", parameters={"a": 1})
    back, meta = provenance.load_table(path)
    pd.testing.assert_frame_equal(back, df)
    assert meta["notebook"] == "01_x" and meta["parameters"] == {"a": 1} and meta["rows"] == 1
    assert provenance.read_provenance(path) == meta  # the record alone, without the table
    for key in (
        "date",
        "git_commit",
        "sources_modified",
        "packages",
        "device",
        "hardware_class",
        "cpu",
        "cpu_flags",
        "threads",
        "load_average_1min",
    ):
        assert key in meta
    assert meta["packages"]["bitsandbytes"] == "0.50.2"
    assert meta["threads"]["torch_num_threads"] >= 1
    assert not list((tmp_path / "sub").glob("*.tmp"))  # written atomically


@pytest.mark.parametrize("name", ["t.csv", "t.csv.gz"])
def test_text_with_line_breaks_and_quotes_reads_back_with_plain_readers(tmp_path, name):
    """Generated text can hold a bare carriage return, CRLF or a lone quote: plain pandas and
    Python's csv module must read the table back unchanged (no split rows, no shifted columns)."""
    df = pd.DataFrame(
        {
            "text": ["bare\rreturn", "crlf\r\nline", 'lone " quote', "new\nline", "plain"],
            "n": [1, 2, 3, 4, 5],
            "x": [0.5, float("nan"), 1e-9, -2.0, 3.25],
            "ok": [True, False, True, True, False],
        }
    )
    path = save_table(df, tmp_path / name)
    assert pd.read_csv(path).equals(df)
    assert load_table(path)[0].equals(df)
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(df.columns) and len(rows) == len(df) + 1
    assert [r[0] for r in rows[1:]] == df.text.tolist()
    assert [float(r[2]) if r[2] else None for r in rows[1:]][2] == 1e-9


def test_missing_sidecar_is_an_error(tmp_path):
    (tmp_path / "t.csv").write_text("a\n1\n")
    with pytest.raises(FileNotFoundError, match="no provenance"):
        provenance.load_table(tmp_path / "t.csv")


def test_sidecar_name():
    assert provenance.sidecar("data/01_x.csv").name == "01_x.provenance.json"
    assert provenance.sidecar("data/02_y.csv.gz").name == "02_y.provenance.json"


def test_compressed_tables(tmp_path):
    df = pd.DataFrame({"a": range(1000)})
    path = provenance.save_table(df, tmp_path / "t.csv.gz", notebook="02_x")
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip magic
    pd.testing.assert_frame_equal(provenance.load_table(path)[0], df)


def _git(repo, *args):
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A git repository laid out like this one, with one commit."""
    for rel in (
        "helpers/a.py",
        "notebooks/01_x.ipynb",
        "notebooks/executed/01_x.ipynb",
        "params/p.yaml",
        "pyproject.toml",
        "data/t.csv",
        "figures/f.png",
        "README.md",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("v1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path


def test_git_commit_is_the_checked_out_commit(repo):
    assert provenance.git_commit(repo) == _git(repo, "rev-parse", "HEAD")[:12]
    assert provenance.sources_modified(repo) is False


@pytest.mark.parametrize(
    "rel",
    [
        "data/t.csv",
        "data/new.csv",
        "figures/f.png",
        "notebooks/executed/01_x.ipynb",
        "notebooks/executed/02_y.ipynb",
        "README.md",
    ],
)
def test_outputs_do_not_make_the_sources_modified(repo, rel):
    (repo / rel).write_text("written by a run\n")
    assert provenance.sources_modified(repo) is False
    assert provenance.git_commit(repo) == _git(repo, "rev-parse", "HEAD")[:12]  # no "-dirty"


@pytest.mark.parametrize(
    "rel", ["helpers/a.py", "helpers/new.py", "notebooks/01_x.ipynb", "params/p.yaml", "pyproject.toml"]
)
def test_edited_or_added_sources_are_modified(repo, rel):
    (repo / rel).write_text("edited\n")
    assert provenance.sources_modified(repo) is True


def test_deleted_source_is_modified(repo):
    (repo / "params" / "p.yaml").unlink()
    assert provenance.sources_modified(repo) is True


def test_outside_git(tmp_path):
    assert provenance.git_commit(tmp_path) == "unknown"
    assert provenance.sources_modified(tmp_path) is None


def test_record_is_serialisable():
    record = provenance.provenance()
    json.dumps(record)
    assert not record["git_commit"].endswith("-dirty")


def test_a_bare_carriage_return_in_text_survives_the_round_trip(tmp_path):
    # generated text can hold "\r"; pandas writes it unquoted, and a default reader splits the row there
    df = pd.DataFrame({"text": ["one\rtwo", "plain", "line\nbreak"], "n": [1, 2, 3]})
    for name in ("t.csv", "t.csv.gz"):
        back, _ = load_table(save_table(df, tmp_path / name))
        pd.testing.assert_frame_equal(back, df)
