#!/usr/bin/env python3
"""Rebuild the excerpts in data/texts/ from the registry packages that carry them.

    python3 data/texts/extract.py            # download, cut, compare with manifest.csv
    python3 data/texts/extract.py --write    # download, cut, (over)write the .txt files

Needs only the Python standard library plus two ordinary clients:
``pip`` (PyPI source distribution of brotli) and ``apt-get download``
(Debian binary packages golang-1.19-src and libpython3.11-stdlib; run ``apt-get update`` first).
Each source file is checked against a pinned SHA-256 before it is cut, and
each excerpt against the ``sha256`` column of manifest.csv afterwards, so a
run that prints "OK" reproduces the committed files byte for byte.

Source code (``verbatim``) is copied whole, unchanged, with its licence file beside it.
Cutting rules for prose (the same for every prose text):
  * lines are split into paragraphs at blank lines;
  * the lines of a paragraph are stripped and joined with one space, except
    that a line ending in a single hyphen after a letter (a compound broken
    at the line end, e.g. "WAISTCOAT-" / "POCKET") is joined without one;
  * runs of spaces become one space;
  * paragraphs made only of asterisks (scene-break ornaments) are dropped;
  * per-text character replacements (listed in SOURCES) undo markup of the
    plain-text editions: the ASCII opening quote ` becomes ', and the
    _underscores_ that mark italics are removed;
  * the excerpt is ``count`` consecutive paragraphs from the first one that
    starts with ``start``; paragraphs are written separated by one blank
    line, and the file ends with a single newline.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

SOURCES = [
    {
        "id": "alice_ch1",
        "registry": "pypi",
        "package": "brotli",
        "version": "1.2.1",
        "archive": "brotli-1.2.1.tar.gz",
        "member": "brotli-1.2.1/tests/testdata/alice29.txt",
        "member_sha256": "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0",
        "encoding": "ascii",
        "replace": [("`", "'")],
        "start": "Alice was beginning to get very tired",
        "count": 24,
    },
    {
        "id": "opticks_query31",
        "registry": "debian",
        "package": "golang-1.19-src",
        "version": "1.19.8-2",
        "archive": "golang-1.19-src_1.19.8-2_all.deb",
        "member": "./usr/share/go-1.19/src/testdata/Isaac.Newton-Opticks.txt",
        "member_sha256": "d4a9ac22462b35e7821a4f2706c211093da678620a8f9997989ee7cf8d507bbd",
        "encoding": "utf-8",
        "replace": [("_", "")],
        "start": "_Quest._ 31. Have not the small Particles",
        "count": 5,
    },
    {
        # Python source code, copied whole (no cutting); the PSF licence it is released under is
        # copied beside it, as that licence asks
        "id": "python_graphlib",
        "registry": "debian",
        "package": "libpython3.11-stdlib",
        "version": "3.11.2-6+deb12u8",
        "archive": "libpython3.11-stdlib_3.11.2-6+deb12u8_amd64.deb",
        "member": "./usr/lib/python3.11/graphlib.py",
        "member_sha256": "7bd338c5a475d1101064603d3baa5507446d3c5e73f741f6d6e77c6204c1eb65",
        "encoding": "utf-8",
        "verbatim": True,
        "licence": ("./usr/lib/python3.11/LICENSE.txt", "python_graphlib.LICENSE.txt"),
    },
]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(src: dict, workdir: Path) -> Path:
    """Fetch the package archive with the registry's ordinary client."""
    if src["registry"] == "pypi":
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                str(workdir),
                f"{src['package']}=={src['version']}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    elif src["registry"] == "debian":
        pinned = subprocess.run(
            ["apt-get", "download", f"{src['package']}={src['version']}"], cwd=workdir, capture_output=True
        )
        if pinned.returncode != 0:
            # Debian keeps only the newest point release of a package; the member's pinned SHA-256,
            # not the package version, decides whether the file is the same
            print(f"{src['package']} {src['version']} is no longer served; trying the current version")
            subprocess.run(["apt-get", "download", src["package"]], check=True, cwd=workdir, stdout=subprocess.DEVNULL)
    else:
        raise ValueError(src["registry"])
    path = workdir / src["archive"]
    if src["registry"] == "debian" and not path.exists():
        path = next(iter(sorted(workdir.glob(f"{src['package']}_*.deb"))), path)
    if not path.exists():
        raise FileNotFoundError(f"{path} was not downloaded")
    return path


def deb_data_tar(deb: Path) -> tarfile.TarFile:
    """Open the data.tar.* member of a .deb (an ar archive) without dpkg."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not an ar archive")
    pos = 8
    while pos < len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        pos += 60 + size + (size % 2)
    raise ValueError(f"no data.tar in {deb}")


def read_member(src: dict, archive: Path, member: str | None = None) -> bytes:
    """One file of the archive (by default the source text, checked against its pinned SHA-256)."""
    tar = deb_data_tar(archive) if src["registry"] == "debian" else tarfile.open(archive)
    with tar:
        data = tar.extractfile(member or src["member"]).read()
    if member is None:
        got = sha256(data)
        if got != src["member_sha256"]:
            raise ValueError(f"{src['member']}: sha256 {got}, expected {src['member_sha256']}")
    return data


def paragraphs(text: str) -> list[str]:
    out, lines = [], []
    for line in text.replace("\r\n", "\n").split("\n") + [""]:
        if line.strip():
            lines.append(line.strip())
            continue
        if lines:
            para = lines[0]
            for nxt in lines[1:]:
                if re.search(r"[A-Za-z]-$", para) and not para.endswith("--"):
                    para += nxt
                else:
                    para += " " + nxt
            para = re.sub(r" {2,}", " ", para)
            if para.replace("*", "").strip():
                out.append(para)
            lines = []
    return out


def cut(src: dict, raw: bytes) -> str:
    if src.get("verbatim"):  # source code: the whole file, unchanged
        return raw.decode(src["encoding"])
    paras = paragraphs(raw.decode(src["encoding"]))
    first = next(i for i, p in enumerate(paras) if p.startswith(src["start"]))
    chosen = paras[first : first + src["count"]]
    if len(chosen) != src["count"]:
        raise ValueError(f"{src['id']}: only {len(chosen)} paragraphs after the start")
    cleaned = []
    for para in chosen:
        for old, new in src["replace"]:
            para = para.replace(old, new)
        cleaned.append(para)
    return "\n\n".join(cleaned) + "\n"


def manifest_sha() -> dict:
    path = HERE / "manifest.csv"
    if not path.exists():
        return {}
    with path.open(newline="", encoding="utf-8") as fh:
        return {row["id"]: row["sha256"] for row in csv.DictReader(fh)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="write the .txt files")
    args = ap.parse_args()
    expected = manifest_sha()
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for src in SOURCES:
            archive = download(src, Path(tmp))
            text = cut(src, read_member(src, archive))
            if "licence" in src and args.write:
                member, name = src["licence"]
                (HERE / name).write_bytes(read_member(src, archive, member))
            data = text.encode("utf-8")
            digest = sha256(data)
            out_path = HERE / f"{src['id']}.txt"  # .txt also for code: no tool should run or lint it
            if args.write:
                out_path.write_bytes(data)
            if not out_path.exists():
                status = "MISSING (run with --write)"
            elif out_path.read_bytes() != data:
                status = "DIFFERS from the saved file"
            elif expected.get(src["id"]) not in (None, digest):
                status = "DIFFERS from manifest.csv"
            else:
                status = "OK"
            failed |= status != "OK"
            print(f"{status} {src['id']}: {len(text.split())} words, sha256 {digest}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
