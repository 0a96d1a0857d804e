"""One version everywhere a user looks, a licence file, and metadata that names its authors.

``pyproject.toml`` holds the version; the changelog's newest heading must be that version as
a dated release (not "Unreleased"), so that the docs and ``pip show jbce`` never disagree
with it. ``jbce.__version__`` and the docs read the installed package metadata.
"""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_changelog_newest_heading_is_the_dated_release_of_the_package_version():
    headings = re.findall(r"(?m)^## (.+)$", (ROOT / "CHANGELOG.md").read_text())
    assert headings, "CHANGELOG.md has no release heading"
    m = re.fullmatch(r"(\d+\.\d+\.\d+) — (\d{4}-\d{2}-\d{2})", headings[0])
    assert m, f"newest heading must read '<version> — <YYYY-MM-DD>'; got {headings[0]!r}"
    assert m.group(1) == PROJECT["version"]


def test_license_file_is_the_apache_2_text_and_is_packaged():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a one-line pointer
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]


def test_metadata_names_authors_classifiers_and_keywords():
    assert PROJECT["authors"] and PROJECT["maintainers"]
    assert all(a.get("name") for a in PROJECT["authors"] + PROJECT["maintainers"])
    assert any(c.startswith("Programming Language :: Python :: 3") for c in PROJECT["classifiers"])
    assert "jax" in PROJECT["keywords"]


def test_readme_is_short_and_quotes_no_ci_logs_or_commit_hashes():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 120
    hashes = re.findall(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", readme)
    assert not hashes, f"commit hashes in the README: {hashes}"
    assert "passed" not in readme and "xfailed" not in readme, "a CI log line in the README"
