"""The API reference lists every public function, under its public name only.

The docs site (``docs/``, built by ``.ci/docs.sh``) documents functions with
``.. autofunction:: jbce.<name>`` on one page per family. A function added to
``jbce.__all__`` must be added there (and to the index's summary table), or this fails.
"""

import re
from pathlib import Path

import pytest

import jbce

DOCS = Path(__file__).resolve().parent.parent / "docs"
API = DOCS / "api"
FAMILY_PAGES = sorted(p for p in API.glob("*.md") if p.name != "index.md")


def documented(pattern: str, pages) -> list[str]:
    return [m for p in pages for m in re.findall(pattern, p.read_text())]


def test_every_public_function_has_an_api_entry():
    names = documented(r"(?m)^\.\. autofunction:: jbce\.(\w+)", FAMILY_PAGES)
    missing = sorted(set(jbce.__all__) - set(names))
    assert not missing, f"add to a page under docs/api/: {missing}"
    twice = sorted({n for n in names if names.count(n) > 1})
    assert not twice, f"documented on more than one API page: {twice}"
    stale = sorted(set(names) - set(jbce.__all__))
    assert not stale, f"documented but not in jbce.__all__: {stale}"


def test_api_index_summarises_every_public_function():
    names = documented(r"(?m)^\s+jbce\.(\w+)\s*$", [API / "index.md"])
    assert sorted(names) == sorted(jbce.__all__)


PAGES = sorted(DOCS.glob("*.md")) + FAMILY_PAGES + [API / "index.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_pages_name_no_private_module(page):
    private = re.findall(r"jbce\._(?!_)\w+", page.read_text())
    assert not private, f"document the public jbce.* names, not {private}"
