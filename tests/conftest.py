"""Shared pytest configuration for jbce's tests.

* Every test under ``tests/`` runs with ``jax_enable_x64`` on (as a per-test context,
  so the doctests in ``jbce/`` keep jax's default float32 behaviour). Float64 checks
  need it; float32 tests must therefore create float32 arrays explicitly
  (``jnp.asarray(x, jnp.float32)``), never rely on the default dtype. A module can opt
  out with ``pytestmark = pytest.mark.no_x64``.
* Modules marked ``pytest.mark.jax_strict`` (the core loss tests) additionally run with
  ``jax_numpy_dtype_promotion="strict"`` and ``jax_numpy_rank_promotion="raise"``,
  which turn silent dtype drift and implicit broadcasting into errors.
  ``jax_strict(rank_promotion=False)`` keeps only the dtype part; ``JBCE_TEST_LENIENT=1``
  switches both off, to tell such failures from others.
* XLA compiles with LLVM's -O0 backend (``tests.FAST_COMPILE_FLAG``; ``JBCE_TEST_OPTIMIZED=1``
  keeps the default) on 8 host CPU devices (``tests.DEVICE_COUNT_FLAG``, for the matrix's
  ``shard_map`` rows and ``tests/test_eight_devices.py``; ``JBCE_TEST_ONE_DEVICE=1`` keeps
  one); example and benchmark
  subprocesses run with XLA's defaults.
* Scripts whose results several tests read (the deviceless GPU/TPU compiles) run once per
  session, in the background, however many xdist workers there are (``tests/_once.py``).
* Hypothesis uses a deterministic, small profile (``jbce``) so the suite stays fast;
  ``HYPOTHESIS_PROFILE=thorough`` runs more examples.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest
from hypothesis import HealthCheck, settings

from tests import DEVICE_COUNT_FLAG, FAST_COMPILE_FLAG, _once

ROOT = Path(__file__).resolve().parent.parent

# Before any backend starts (importing jax does not start one): LLVM -O0 cuts the suite's
# compile time by about a quarter (measured: tests/test_linear_distill.py's value and traced
# hyperparameter tests, 54 s -> 41 s); JBCE_TEST_OPTIMIZED=1 keeps XLA's default.
if os.environ.get("JBCE_TEST_OPTIMIZED") != "1" and FAST_COMPILE_FLAG not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()
# 8 host CPU devices, for the matrix's shard_map checks (JBCE_TEST_ONE_DEVICE=1: one).
if os.environ.get("JBCE_TEST_ONE_DEVICE") != "1" and "device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}".strip()

settings.register_profile(
    "jbce",
    max_examples=12,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "jbce"))


def _controls_the_session(config) -> bool:
    """The xdist controller, or the pytest process when there are no workers."""
    return not hasattr(config, "workerinput")


def pytest_configure(config):
    if _controls_the_session(config):  # workers are started later and inherit it
        os.environ[_once.RUN_DIR] = tempfile.mkdtemp(prefix="jbce-tests-")
    config.addinivalue_line("markers", "no_x64: run this test without jax_enable_x64")
    config.addinivalue_line(
        "markers",
        "jax_strict: strict dtype promotion and rank promotion 'raise' for this test",
    )


def pytest_unconfigure(config):
    if _controls_the_session(config) and _once.RUN_DIR in os.environ:
        _once.stop()
        shutil.rmtree(os.environ.pop(_once.RUN_DIR), ignore_errors=True)


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: only the tests that will run
def pytest_collection_modifyitems(config, items):
    if config.option.collectonly:
        return
    if any("optax_suite" in getattr(item, "fixturenames", ()) for item in items):
        from tests.test_optax_suite import MODES, start

        for mode in MODES:  # optax's own tests against jbce (tests/test_optax_suite.py)
            start(mode)


@pytest.fixture(autouse=True)
def _jax_config(request):
    """x64 on (unless ``no_x64``), strict promotion for ``jax_strict`` tests."""
    with contextlib.ExitStack() as stack:
        if request.node.get_closest_marker("no_x64") is None:
            stack.enter_context(jax.enable_x64(True))
        strict = request.node.get_closest_marker("jax_strict")
        if strict is not None and os.environ.get("JBCE_TEST_LENIENT") != "1":
            stack.enter_context(jax.numpy_dtype_promotion("strict"))
            if strict.kwargs.get("rank_promotion", True):
                stack.enter_context(jax.numpy_rank_promotion("raise"))
        yield
