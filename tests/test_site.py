"""The static book: its layout, and the checks its browser run applies to every page."""

from __future__ import annotations

import json

from helpers import site


def test_page_problems_finds_a_missing_image_a_broken_link_and_an_empty_page(tmp_path):
    page = tmp_path / "notebooks" / "01.html"
    page.parent.mkdir()
    page.write_text("<html></html>")
    (tmp_path / "index.html").write_text("<html></html>")
    links = [(tmp_path / "index.html").as_uri(), (tmp_path / "notebooks" / "02.html").as_uri() + "#top",
             "https://arxiv.org/abs/2309.05210", (tmp_path.parent / "elsewhere.html").as_uri()]  # fmt: skip
    problems = site.page_problems(page, tmp_path, ["file:///x/_images/a.png"], links, "too short")
    assert problems == [
        "notebooks/01.html: image not loaded: file:///x/_images/a.png",
        "notebooks/01.html: broken link: notebooks/02.html",
        "notebooks/01.html: almost empty: 9 characters of text",
    ]
    assert site.page_problems(page, tmp_path, [], links[:1], "x" * site.MIN_TEXT) == []


def test_the_book_renders_the_executed_copies_under_the_source_names(tmp_path):
    source = site.lay_out(tmp_path / "src")
    names = site.notebook_names()
    assert names and all((source / "notebooks" / f"{n}.ipynb").is_file() for n in names)
    executed = json.loads((source / "notebooks" / f"{names[0]}.ipynb").read_text())
    assert "compendium" in executed["metadata"]  # the runner's stamp: an executed copy, not the source
    index = (source / "index.md").read_text()
    assert all(f"notebooks/{n}" in index.split("{toctree}")[1] for n in names)
    for page in site.PAGES:  # copied, not linked: Sphinx reads a linked page as outside the book
        assert (source / page).is_file() and not (source / page).is_symlink()
    assert (source / "figures").is_symlink()
