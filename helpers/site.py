"""The compendium as a static HTML book, and a check of it in a real browser.

``python -m helpers.site build`` renders README (the book's first page), the *executed* notebooks
(nothing is re-executed), ``data/README.md`` and ``benchmarks/README.md`` with Sphinx, MyST-NB and
the Sphinx Book Theme into ``build/site``. The source tree it renders, ``build/site-src``, mirrors
the repository, so every relative link of README and the notebooks points where it does on GitHub;
only ``notebooks/`` holds the executed copies under the source notebooks' names.

``python -m helpers.site check`` opens every built page in headless Chromium (Debian's
``chromium``, driven by Playwright), saves a screenshot of each in ``build/site-shots``, and fails
on an image the browser could not load, a link to a page or file of the site that does not exist,
or a page with (almost) no text.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

from helpers import REPO_ROOT

SITE_DIR = REPO_ROOT / "build" / "site"
SOURCE_DIR = REPO_ROOT / "build" / "site-src"
SHOTS_DIR = REPO_ROOT / "build" / "site-shots"
PAGES = ["data/README.md", "data/texts/README.md", "benchmarks/README.md"]  # rendered besides README and notebooks
MIN_TEXT = 200  # characters of visible text below which a page counts as empty

CONF = """\
project = "Post-training quantization and next-word prediction"
author = "the compendium's authors"
extensions = ["myst_nb"]
root_doc = "index"
include_patterns = ["index.md", "notebooks/*.ipynb", {pages}]
nb_execution_mode = "off"  # the executed copies are rendered as they are
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header", "misc.highlighting_failure"]
html_theme = "sphinx_book_theme"
html_title = project
html_theme_options = {{"show_toc_level": 2, "home_page_in_toc": True,
                       "secondary_sidebar_items": {{"**": ["page-toc"], "notebooks/*": []}}}}  # notebooks: full width
html_static_path = ["_static"]
html_css_files = ["wide.css"]  # figures of several panels need the page's whole width
"""


def notebook_names() -> list[str]:
    """The numbered notebooks that have an executed copy, in order."""
    executed = REPO_ROOT / "notebooks" / "executed"
    return sorted(p.stem for p in (REPO_ROOT / "notebooks").glob("[0-9]*.ipynb") if (executed / p.name).exists())


def mirror(folder: Path, to: Path, skip: set[str] = frozenset()) -> None:
    """``to`` as a copy of ``folder`` made of links, except that the :data:`PAGES` are copied and
    the folders holding them are real: Sphinx reads a page behind a link as outside the book."""
    to.mkdir(parents=True)
    for entry in folder.iterdir():
        rel = entry.relative_to(REPO_ROOT).as_posix()
        if entry.name in skip or entry.name.startswith("."):
            continue
        if rel in PAGES:
            shutil.copy(entry, to / entry.name)
        elif entry.is_dir() and any(p.startswith(rel + "/") for p in PAGES):
            mirror(entry, to / entry.name)
        else:
            (to / entry.name).symlink_to(entry)


def lay_out(source: Path = SOURCE_DIR) -> Path:
    """Write the tree Sphinx renders: links to the repository's folders, README as ``index.md``
    with a table of contents, and the executed notebooks under ``notebooks/``."""
    if source.exists():
        shutil.rmtree(source)
    mirror(REPO_ROOT, source, skip={"notebooks", "build", "README.md"})
    (source / "notebooks").mkdir()
    for name in notebook_names():
        shutil.copy(REPO_ROOT / "notebooks" / "executed" / f"{name}.ipynb", source / "notebooks" / f"{name}.ipynb")
    toc = [f"notebooks/{n}" for n in notebook_names()] + [p.removesuffix(".md") for p in PAGES]
    readme = (REPO_ROOT / "README.md").read_text()
    (source / "index.md").write_text(readme + "\n```{toctree}\n:hidden:\n:maxdepth: 1\n\n" + "\n".join(toc) + "\n```\n")
    (source / "_static").mkdir()
    (source / "_static" / "wide.css").write_text(
        ".bd-page-width, .bd-main .bd-content .bd-article-container {max-width: 100%;}\n"
    )
    (source / "conf.py").write_text(CONF.format(pages=", ".join(repr(p) for p in PAGES)))
    return source


def build(out: Path = SITE_DIR) -> Path:
    """Render the book into ``out``; return the path of its first page."""
    source = lay_out()
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", str(source), str(out)]
    subprocess.run(cmd, check=True)
    return out / "index.html"


def page_problems(page: Path, site: Path, images: list[str], links: list[str], text: str) -> list[str]:
    """What is wrong with one rendered page: ``images`` the browser could not load, ``links``
    (absolute ``file:`` URLs of the page's anchors) to a page or file of ``site`` that does not
    exist, and too little visible ``text``."""
    problems = [f"image not loaded: {src}" for src in images]
    for href in links:
        url = urlparse(href)
        if url.scheme != "file":
            continue  # the web and in-page anchors are not checked
        target = Path(unquote(url.path))
        if target.is_relative_to(site) and not target.exists():
            problems.append(f"broken link: {target.relative_to(site)}")
    if len(text.strip()) < MIN_TEXT:
        problems.append(f"almost empty: {len(text.strip())} characters of text")
    return [f"{page.relative_to(site)}: {p}" for p in problems]


BROKEN_IMAGES = "[...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"
LINKS = "[...document.querySelectorAll('a[href]')].map(a => a.href)"


def check(site: Path = SITE_DIR, shots: Path = SHOTS_DIR, width: int = 1280) -> list[str]:
    """Open every page of the built ``site`` in headless Chromium, screenshot it into ``shots``,
    and return the problems found (empty: the site is sound)."""
    from playwright.sync_api import sync_playwright

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        raise SystemExit("no chromium on PATH: on Debian, apt-get install chromium")
    skip = {"genindex.html", "search.html"}  # Sphinx's own pages; "_*" folders hold its assets and sources
    pages = sorted(
        p for p in site.rglob("*.html") if not p.relative_to(site).parts[0].startswith("_") and p.name not in skip
    )
    shots.mkdir(parents=True, exist_ok=True)
    problems = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": width, "height": 900})
        for page in pages:
            tab.goto(page.as_uri(), wait_until="load")
            name = "_".join(page.relative_to(site).with_suffix(".png").parts)
            tab.screenshot(path=str(shots / name), full_page=True)
            problems += page_problems(
                page, site, tab.evaluate(BROKEN_IMAGES), tab.evaluate(LINKS), tab.inner_text("main")
            )
        browser.close()
    print(f"{len(pages)} pages opened in {browser_path}; screenshots in {shots}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "check"])
    args = parser.parse_args(argv)
    if args.command == "build":
        print(f"built: {build()}")
        return 0
    problems = check()
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
