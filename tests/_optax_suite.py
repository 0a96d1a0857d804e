"""optax's own classification tests, run unchanged against jbce (``tests/test_optax_suite.py``).

``python tests/_optax_suite.py MODE`` runs the installed
``optax/losses/_classification_test.py`` in place with pytest, this module loaded as a
plugin: before the tests run, optax's losses that jbce also offers are replaced (in
``optax.losses._classification``, which the tests call through) by adapters over the jbce
losses (``reduction="none"``, optax's argument names and order). ``MODE``:

* ``reverse``: the adapters call jbce as is (gradients by jbce's reverse mode);
* ``forward``: the adapters' derivatives come from jbce's forward mode: a ``custom_jvp``
  whose tangent is the Jacobian by ``jax.jacfwd`` of the jbce loss times the tangents, so
  that reverse mode transposes a forward-mode Jacobian, and a Hessian is forward-over-forward.

The tests of optax functions jbce does not offer are deselected (:data:`NOT_OFFERED`). The
last stdout line is a JSON object: optax test id -> "passed", "skipped" or the failure.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

MODE_VAR = "JBCE_OPTAX_MODE"
# Test classes of optax functions that jbce does not offer (hinge, sparsemax, CTC,
# perceptron, generalized KL, safe_softmax_cross_entropy).
NOT_OFFERED = [
    "SafeSoftmaxCrossEntropyTest",
    "HingeTest",
    "SparsemaxTest",
    "GeneralizedKLDivergenceTest",
    "PerceptronTest",
    "CTCTest",
]


def optax_test_file() -> Path:
    import optax.losses

    return Path(optax.losses.__file__).parent / "_classification_test.py"


def optax_test_ids() -> list[str]:
    """``Class::test`` of every test the suite runs (absl's parameterised names included)."""
    import importlib
    import unittest

    module = importlib.import_module("optax.losses._classification_test")
    ids = []
    for name, cls in sorted(vars(module).items()):
        if isinstance(cls, type) and issubclass(cls, unittest.TestCase) and name.endswith("Test"):
            if name in NOT_OFFERED:
                continue
            ids += [f"{name}::{t}" for t in sorted(dir(cls)) if t.startswith("test")]
    return ids


def _forward_mode(fn, *args):
    """``fn(*args)`` whose derivatives come from jbce's forward mode (see the module doc).

    Every array is an argument of the ``custom_jvp`` (none is closed over: under an outer
    ``jit`` they are tracers); the integer and boolean ones are not differentiated.
    """
    import jax
    import jax.numpy as jnp

    floats = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))
    g = jax.custom_jvp(fn)

    @g.defjvp
    def _rule(primals, tangents):
        jac = jax.jacfwd(fn, argnums=floats)(*primals)
        tan = sum(jnp.tensordot(j, tangents[i], axes=jnp.ndim(primals[i]))
                  for j, i in zip(jac, floats))  # fmt: skip
        return fn(*primals), tan

    return g(*args)


def adapters(mode: str) -> dict:
    """optax's names -> jbce-backed functions with optax's signatures."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jbce

    def run(loss, **kwargs):
        """``loss(**kwargs, reduction="none")``; its array arguments pass through
        :func:`_forward_mode` in forward mode, the others (Python numbers, None, axis)
        are static."""
        is_array = lambda v: isinstance(v, (jax.Array, np.ndarray, np.generic))  # noqa: E731
        names = [k for k, v in kwargs.items() if is_array(v)]
        static = {k: v for k, v in kwargs.items() if k not in names}

        def call(*values):
            return loss(**dict(zip(names, values)), **static, reduction="none")

        values = [jnp.asarray(kwargs[k]) for k in names]
        return _forward_mode(call, *values) if mode == "forward" else call(*values)

    def lists_to_arrays(f):  # optax's tests pass lists and tuples too
        return lambda *a, **kw: f(*[np.asarray(x) if isinstance(x, list) else x for x in a],
                                  **kw)  # fmt: skip

    table = {
        "softmax_cross_entropy": lambda logits, labels, axis=-1, where=None: run(
            jbce.softmax_cross_entropy, logits=logits, labels=labels, axis=axis, where=where
        ),
        "softmax_cross_entropy_with_integer_labels": (
            lambda logits, labels, axis=-1, where=None: run(
                jbce.softmax_cross_entropy_with_integer_labels,
                logits=logits,
                labels=labels,
                axis=axis,
                where=where,
            )
        ),  # fmt: skip
        "sigmoid_binary_cross_entropy": lambda logits, labels: run(
            jbce.sigmoid_binary_cross_entropy, logits=logits, labels=labels
        ),
        "poly_loss_cross_entropy": lambda logits, labels, epsilon=2.0, axis=-1, where=None: run(
            jbce.poly_loss_cross_entropy,
            logits=logits,
            labels=labels,
            epsilon=epsilon,
            axis=axis,
            where=where,
        ),  # fmt: skip
        "kl_divergence": lambda log_predictions, targets, axis=-1, where=None: run(
            jbce.kl_divergence, logits=log_predictions, labels=targets, axis=axis, where=where
        ),
        "kl_divergence_with_log_targets": (
            lambda log_predictions, log_targets, axis=-1, where=None: run(
                jbce.kl_divergence,
                logits=log_predictions,
                labels=log_targets,
                axis=axis,
                where=where,
                log_labels=True,
            )
        ),  # fmt: skip
        "sigmoid_focal_loss": lambda logits, labels, alpha=None, gamma=2.0: run(
            jbce.sigmoid_focal_loss, logits=logits, labels=labels, alpha=alpha, gamma=gamma
        ),
    }
    return {name: lists_to_arrays(f) for name, f in table.items()}


# --- the pytest plugin (loaded with -p in the subprocess) ---------------------------------------
_RESULTS: dict[str, str] = {}


def pytest_configure(config):
    from optax.losses import _classification

    for name, fn in adapters(os.environ[MODE_VAR]).items():
        assert hasattr(_classification, name), name
        setattr(_classification, name, fn)


def pytest_runtest_setup(item):
    # optax's masked tests draw from NumPy's global generator, unseeded: seeded per test
    # here, so that a run is reproducible (the file itself is run unchanged).
    import zlib

    import numpy as np

    np.random.seed(zlib.crc32(item.nodeid.split("::", 1)[1].encode()))  # noqa: NPY002


def pytest_runtest_logreport(report):
    test_id = report.nodeid.split("::", 1)[1]
    if report.when == "call" or report.outcome != "passed":
        if report.outcome == "passed":
            _RESULTS.setdefault(test_id, "passed")
        elif report.outcome == "skipped":
            _RESULTS[test_id] = "skipped"
        else:
            text = str(report.longrepr).strip().splitlines()
            errors = [line for line in text if line.startswith("E ")]
            _RESULTS[test_id] = f"{report.when} failed: " + " | ".join(errors[:6] or text[-3:])


def main(mode: str) -> int:
    import pytest

    os.environ[MODE_VAR] = mode
    not_offered = " or ".join(NOT_OFFERED)
    args = [str(optax_test_file()), "-p", "tests._optax_suite", "-q", "-p", "no:cacheprovider",
            "-c", os.devnull, "--rootdir", str(optax_test_file().parent),
            "-k", f"not ({not_offered})"]  # fmt: skip
    pytest.main(args)
    import importlib  # the plugin instance of this module (not ``__main__``) saw the reports

    print(json.dumps(importlib.import_module("tests._optax_suite")._RESULTS))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main(sys.argv[1]))
