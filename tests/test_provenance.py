from __future__ import annotations

import json

import pandas as pd
import pytest

from helpers import provenance


def test_save_and_load_roundtrip(tmp_path):
    df = pd.DataFrame({"model": ["m"], "method": ["nf4"], "ppl": [12.5]})
    path = provenance.save_table(df, tmp_path / "sub" / "t.csv", notebook="01_x", parameters={"a": 1})
    back, meta = provenance.load_table(path)
    pd.testing.assert_frame_equal(back, df)
    assert meta["notebook"] == "01_x" and meta["parameters"] == {"a": 1} and meta["rows"] == 1
    for key in ("date", "git_commit", "packages", "device", "cpu", "cpu_flags", "threads", "load_average_1min"):
        assert key in meta
    assert meta["packages"]["bitsandbytes"] == "0.50.2"
    assert meta["threads"]["torch_num_threads"] >= 1
    assert not list((tmp_path / "sub").glob("*.tmp"))  # written atomically


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


def test_git_commit_is_reported():
    assert provenance.git_commit() != ""
    json.dumps(provenance.provenance())  # serialisable
