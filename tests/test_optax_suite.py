"""optax's classification test suite, run unchanged against jbce in both derivative modes.

``tests/_optax_suite.py`` runs the installed ``optax/losses/_classification_test.py`` in a
subprocess (once per session and mode, in the background: ``tests/_once.py``) with optax's
losses replaced by adapters over jbce's; each optax test becomes one test here. ``reverse``:
jbce's gradients as they are; ``forward``: every derivative by jbce's forward mode. A
failure that is a known jbce defect is a strict xfail listed in ``matrix.KNOWN_DEFECTS`` as
``optax-<mode>-<Class>::<test>``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests import _once, matrix
from tests._optax_suite import optax_test_ids

ROOT = Path(__file__).resolve().parent.parent
MODES = ("reverse", "forward")


def start(mode: str) -> None:
    """Starts the suite in ``mode`` unless this session already has (any xdist worker)."""
    _once.start(
        f"optax_{mode}",
        [sys.executable, str(ROOT / "tests" / "_optax_suite.py"), mode],
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)),
        cwd=ROOT,
        limit=900,
    )


@pytest.fixture(scope="module")
def optax_suite():
    for mode in MODES:
        start(mode)
    return {mode: _once.result(f"optax_{mode}", limit=900) for mode in MODES}


def _param(mode, test_id):
    cid = f"optax-{mode}-{test_id}"
    reason = matrix.known_defect(cid)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(mode, test_id, id=cid, marks=marks)


@pytest.mark.parametrize(
    ("mode", "test_id"), [_param(m, t) for m in MODES for t in optax_test_ids()]
)
def test_optax_classification_test_passes_against_jbce(optax_suite, mode, test_id):
    outcome = optax_suite[mode].get(test_id, "not run")
    assert outcome in ("passed", "skipped"), outcome
