"""The shared mechanisms checked once, where every loss relies on them.

* The softmax statistics' tangent map (forward mode, and reverse mode by transposition) and
  their hand-written backward formula (the fused losses' and the vocabulary-parallel CE's
  custom VJPs) are adjoint: ``<stats_tangent(t), g> == <t, logits_grad(g)>`` for every kind
  of statistic (integer labels, class weights, label-smoothing sums, soft labels), with
  ``-inf`` and masked classes and excluded rows.
* Hyperparameters: NumPy scalars are static numbers like Python's; ranges come from one table.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jbce._core import checks
from jbce._softmax import stats

F64 = jnp.float64


def _inputs(seed, *, soft, weighted, masked):
    rng = np.random.default_rng(seed)
    n, k = 4, 6
    x = rng.normal(size=(n, k)) * 3
    x[0, 1] = -np.inf  # a class out of the softmax
    x[3, :] = -np.inf  # a row without classes
    labels = jnp.asarray([0, 2, 5, 1], jnp.int32)
    weights = None
    if soft:
        y = rng.random((n, k))
        y[0, 1] = 0.0  # no target on the -inf class (a positive one would cost +inf)
        weights = jnp.asarray(y / y.sum(-1, keepdims=True), F64)
    elif weighted:
        weights = jnp.asarray(rng.random(k) + 0.5, F64)
    mask = None
    if masked:
        m = np.ones((n, k), bool)
        m[1, 3] = m[2, 0] = False
        mask = jnp.asarray(m)
    rows = jnp.asarray([True, True, False, True])
    return jnp.asarray(x, F64), (None if soft else labels), weights, mask, rows


def _dot(a, b):
    if a is None or b is None:
        return 0.0
    both = jnp.isfinite(a) & jnp.isfinite(b)
    return float(jnp.sum(jnp.where(both, a * b, 0.0)))


@pytest.mark.parametrize("soft,weighted,sums", [(False, False, False), (False, True, False),
                                                (False, False, True), (False, True, True),
                                                (True, False, True)])  # fmt: skip
@pytest.mark.parametrize("masked", [False, True])
def test_stats_tangent_and_logits_grad_are_adjoint(soft, weighted, sums, masked):
    x, labels, w, mask, rows = _inputs(0, soft=soft, weighted=weighted, masked=masked)
    kw = dict(weights=w, mask=mask, sums=sums, soft=soft)
    saved = stats.block_stats(x, labels, **kw)
    rng = np.random.default_rng(1)
    dx = jnp.asarray(rng.normal(size=x.shape), F64)
    dw = None if w is None else jnp.asarray(rng.normal(size=w.shape), F64)
    col = lambda: jnp.asarray(rng.normal(size=x.shape[0]), F64)  # noqa: E731
    g = stats.Stats(
        None, col(), col(), col() if sums else None, col() if sums else None,
        col() if (weighted and not soft) else None,
    )  # fmt: skip
    tangent = stats.stats_tangent(
        x, labels, saved, (dx, dw), weights=w, masks=(mask, rows), sums=sums, soft=soft
    )
    lhs = sum(_dot(t, c) for t, c in zip(tangent[1:6], g[1:6]))
    gx, gw = stats.logits_grad(x, labels, saved, g, weights=w, mask=mask, rows=rows, soft=soft)
    rhs = _dot(gx, dx) + _dot(gw, dw)
    assert np.isfinite(lhs) and np.isfinite(rhs)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12, atol=1e-12)
    # An excluded row, and a -inf class that is not the label, get exactly zero.
    assert np.all(np.asarray(gx)[2] == 0)
    assert float(gx[0, 1]) == 0.0


@pytest.mark.parametrize("value", [np.float32(0), np.int64(0), np.float64(0.0), np.array(0.0)])
def test_numpy_zero_options_are_static_zeros(value):
    assert checks.is_zero(value) and checks.static_number(value) == 0
    assert checks.hyperparameter("label_smoothing", value) == 0


def test_hyperparameter_ranges_come_from_one_table():
    for key, interval in checks.HYPERPARAMETERS.items():
        name = key.rsplit(":", 1)[-1]
        below = float("nan") if interval.low is None else interval.low - 1.0
        with pytest.raises(ValueError, match=f"{name} must be"):
            checks.hyperparameter(key, below)
        assert not bool(interval.holds(jnp.asarray(below)))


def test_cpu_bfloat16_read_rounds_as_astype_bfloat16():
    # jbce._core.xla_cpu.upcast: what the XLA:CPU cores read a bf16 input as, in place of
    # reduce_precision. Every bf16 value (an argument) comes back exactly, and a float32 value
    # XLA kept unrounded (excess precision: bf16 made in the same jit) is rounded to nearest,
    # ties to even: random values, exact ties and the edges, against astype(bfloat16).
    import jax

    from jbce._core import xla_cpu

    bits = np.arange(1 << 16, dtype=np.uint32) << 16
    every_bf16 = bits.view(np.float32)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    ties = (raw & np.uint32(0xFFFF0000)) | np.uint32(0x8000)
    v = np.concatenate([every_bf16, raw.view(np.float32), ties.view(np.float32)])
    v = v[np.abs(v) <= xla_cpu.SPLIT_BOUND]  # finite ones above are split off unrounded
    v = np.concatenate([v, np.float32([np.inf, -np.inf, np.nan, 3.3e38, -3.3e38])])

    @jax.jit
    def read(a):  # bf16 made in the jit from float32: XLA may skip the rounding
        return xla_cpu.upcast(a.astype(jnp.bfloat16), xla_cpu.constants())

    got = np.asarray(read(jnp.asarray(v)))
    want = np.asarray(jnp.asarray(v).astype(jnp.bfloat16).astype(jnp.float32))
    tiny = np.abs(want) < np.finfo(np.float32).tiny  # subnormals: XLA:CPU flushes them to 0
    np.testing.assert_array_equal(got[~tiny], want[~tiny])
    assert np.all(got[tiny] == 0)
    # Arguments: every bf16 value itself, above the bound too.
    exact = np.asarray(jax.jit(lambda a: xla_cpu.upcast(a, xla_cpu.constants()))(
        jnp.asarray(every_bf16).astype(jnp.bfloat16)))  # fmt: skip
    normal = ~(np.abs(every_bf16) < np.finfo(np.float32).tiny)
    np.testing.assert_array_equal(exact[normal], every_bf16[normal])
