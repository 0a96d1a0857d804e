#!/usr/bin/env bash
# Docs: install the docs extra into the CI venv, then build the site with warnings as errors
# and run every code block on its pages (sphinx.ext.doctest). Any warning or failed block
# fails the run. Called from .ci/run after the venv exists; runs on its own as well.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

echo "== docs: install (pip install -e \".[docs]\")"
.venv/bin/pip install -q -e ".[docs]"

echo "== docs: html (python -m sphinx -W -b html docs docs/_build/html)"
.venv/bin/python -m sphinx -W --keep-going -q -b html docs docs/_build/html

echo "== docs: code blocks (python -m sphinx -W -b doctest docs docs/_build/doctest)"
.venv/bin/python -m sphinx -W --keep-going -q -b doctest docs docs/_build/doctest
tail -n 4 docs/_build/doctest/output.txt
