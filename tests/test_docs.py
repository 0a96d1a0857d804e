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


def test_every_image_a_page_shows_exists():
    pages = sorted(DOCS.glob("*.md")) + FAMILY_PAGES
    missing = [
        f"{page.name}: {src}"
        for page in pages
        for src in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text())
        if not (page.parent / src).exists()
    ]
    assert not missing, f"images not found: {missing}"


@pytest.mark.parametrize("page", ["getting_started.md", "coming_from.md"])
def test_migration_traps_are_called_out_where_porting_users_look(page):
    # The "mean" default against optax's per-element values (the masked-mean idiom) and
    # padding labels other than -100, each with the call that fixes it.
    text = (DOCS / page).read_text()
    assert ":::{important}" in text
    for fix in ["(loss(x, y) * m).sum() / m.sum()", "where=m", "ignore_index=-1"]:
        assert fix in text, f"{page} lacks {fix!r}"


def test_docs_have_copy_buttons_and_the_wrapping_stylesheet():
    conf = (DOCS / "conf.py").read_text()
    assert '"sphinx_copybutton"' in conf and 'html_css_files = ["jbce.css"]' in conf
    assert (DOCS / "_static" / "jbce.css").exists()


def test_ratio_chart_is_redrawn_when_the_bench_json_changes(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(DOCS))
    try:
        import bench_tables
    finally:
        sys.path.remove(str(DOCS))

    def case(name, mode, vs_optax, vs_torch):
        return {"case": name, "dtype": "float32", "mode": mode, "vs_optax": vs_optax,
                "vs_torch": vs_torch}  # fmt: skip

    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    cases = [case("bce_2^10", "fwd", 2.0, 0.5), case("bce_2^10", "vag", 1.5, None)]
    (data / "bench.json").write_text(json.dumps({"env": {"date": "2026-12-01"}, "cases": cases}))
    assert bench_tables.chart_rows(cases) == {
        "fwd": [("bce_2^10 f32", 2.0, 0.5)],
        "vag": [("bce_2^10 f32", 1.5, None)],
    }
    png = bench_tables.write_chart(out, data)
    first = png.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    stamp = (out / "bench_ratios.png.sha256").read_text()
    bench_tables.write_chart(out, data)  # same JSON: kept
    assert (out / "bench_ratios.png.sha256").read_text() == stamp
    cases[0]["vs_optax"] = 0.25
    (data / "bench.json").write_text(json.dumps({"cases": cases}))
    bench_tables.write_chart(out, data)  # changed JSON: redrawn
    assert (out / "bench_ratios.png.sha256").read_text() != stamp
    assert png.read_bytes() != first
