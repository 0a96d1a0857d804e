"""Sphinx configuration of the jbce docs.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

    python -m sphinx -W -b html docs docs/_build/html      # the site
    python -m sphinx -W -b doctest docs docs/_build/doctest  # runs every code block

The Performance page's tables are generated here, from ``docs/_data/*.json``
(``docs/bench_tables.py``); the Numerics plots are made ahead of time by
``docs/make_plots.py`` and committed.
"""

import os
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The device page's examples run on 4 simulated CPU devices; XLA reads this flag once, when
# jax first creates its CPU client, so it must be set before anything imports jax.
_flag = "--xla_force_host_platform_device_count=4"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

sys.path.insert(0, str(HERE))
import bench_tables  # noqa: E402

bench_tables.write()

project = "jbce"
author = "jbce maintainers"
copyright = "jbce maintainers; Apache-2.0"
# The version of this checkout: pyproject.toml is where the package metadata (and so
# jbce.__version__ of an installed copy) gets it from, and it does not go stale in an
# editable install the way the installed metadata does until the next `pip install -e .`.
release = tomllib.loads((HERE.parent / "pyproject.toml").read_text())["project"]["version"]
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",
    "sphinx-mathjax-offline",  # a MathJax 3 copy in _static: math renders without a network
    "sphinx_copybutton",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated", "_data", "README.md", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Docstrings: Google style ("Args:", "Returns:"), documented under the public names only.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_default_options = {"members": False}
# Types are in the docstrings; a signature would spell jax.typing.ArrayLike as its whole union.
autodoc_typehints = "none"
autosummary_generate = False
add_module_names = True
python_use_unqualified_type_names = True
# A signature longer than this is set one parameter per line, so every option shows at page
# width. (The autosummary tables shorten long signatures to "(...)", so they list names
# only, ":nosignatures:"; each name links to its full signature.)
python_maximum_signature_line_length = 80

# sphinx-copybutton: the copy button copies the code only, without ">>> " / "... " prompts
# and without the outputs of doctest blocks.
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = True

# sphinx.ext.doctest: the pages' ```{doctest}``` / ```{testcode}``` blocks. The docstrings'
# own ``>>>`` examples are run by pytest (--doctest-modules), not a second time here.
doctest_test_doctest_blocks = ""
doctest_global_setup = """
import jax
import jax.numpy as jnp
import numpy as np
import jbce
"""
import doctest  # noqa: E402

doctest_default_flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

html_theme = "sphinx_book_theme"
html_title = f"jbce {release}"
html_static_path = ["_static"]
# Tables wrap (long code in cells breaks) to the page's width, or scroll with a visible bar.
html_css_files = ["jbce.css"]
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": False,
    "use_fullscreen_button": False,
}
html_show_sourcelink = False
html_copy_source = False
