"""entropy and kl_divergence against float64 references and PyTorch; CE = H + KL.

kl_divergence takes the logits first (see CHANGELOG.md).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.test_util import check_grads

import jbce
from tests import reference as ref

pytestmark = pytest.mark.jax_strict

LAYOUTS = {"last": ((5, 4), -1), "first": ((4, 5), 0), "tuple": ((3, 2, 4), (1, 2))}


def jitted(fn):
    """``fn`` compiled as one program when called: op by op, each primitive would compile
    on its own (a loss and its reference's gradients: 4.5 s of CPU eagerly, 0.9 s jitted)."""
    return lambda *args, **kwargs: jax.jit(lambda: fn(*args, **kwargs))()


def _data(layout="last", seed=0, zeros=True):
    shape, axis = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 2
    batch = tuple(s for i, s in enumerate(shape) if i not in ref.canonical_axes(axis, len(shape)))
    k = int(np.prod(shape) // max(1, int(np.prod(batch))))
    p = rng.dirichlet(np.ones(k), size=batch)
    if zeros:
        p.reshape(-1, k)[0, :2] = [0.0, 0.0]  # 0 log 0 = 0
        p.reshape(-1, k)[0] /= p.reshape(-1, k)[0].sum()
    return x, ref.move_classes_back(p, shape, axis), axis


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_entropy_and_kl_match_float64_reference(layout):
    x, p, axis = _data(layout)
    h = jitted(jbce.entropy)(jnp.asarray(p), axis=axis)
    kl = jitted(jbce.kl_divergence)(jnp.asarray(x), jnp.asarray(p), axis=axis, reduction="none")
    assert h.dtype == jnp.float64
    ref.assert_close(h, ref.ref_entropy(p, axis=axis), atol=1e-15)
    ref.assert_close(kl, ref.ref_kl_divergence(x, p, axis=axis, reduction="none"), atol=1e-15)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cross_entropy_equals_entropy_plus_kl(layout):
    x, p, axis = _data(layout, seed=1)
    ce = jitted(jbce.softmax_cross_entropy)(
        jnp.asarray(x), jnp.asarray(p), axis=axis, reduction="none"
    )
    h = jitted(jbce.entropy)(jnp.asarray(p), axis=axis)
    kl = jitted(jbce.kl_divergence)(jnp.asarray(x), jnp.asarray(p), axis=axis, reduction="none")
    ref.assert_close(np.asarray(h) + np.asarray(kl), np.asarray(ce), rtol=1e-12, atol=1e-14)


def test_kl_of_a_distribution_with_itself_is_zero_and_kl_is_nonnegative():
    x, p, _ = _data(zeros=False, seed=2)
    same = jitted(jbce.kl_divergence)(jnp.log(jnp.asarray(p)), jnp.asarray(p), reduction="none")
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-14)
    kl = jitted(jbce.kl_divergence)(jnp.asarray(x), jnp.asarray(p), reduction="none")
    assert np.all(np.asarray(kl) >= 0)


def test_kl_equals_torch_kl_div():
    x, p, _ = _data(seed=3)
    want, (tg,) = ref.torch_kl_divergence(p, x, grad_of=("logits",))
    got = jitted(jbce.kl_divergence)(jnp.asarray(x), jnp.asarray(p), reduction="none")
    g = jitted(jax.grad(lambda a: jbce.kl_divergence(a, jnp.asarray(p), reduction="sum")))(
        jnp.asarray(x)
    )
    ref.assert_close(got, want, rtol=1e-12, atol=1e-15)
    ref.assert_close(g, tg, rtol=1e-10, atol=1e-15)


def test_uniform_distribution_has_entropy_log_k():
    p = jnp.full((3, 7), 1 / 7)
    ref.assert_close(jitted(jbce.entropy)(p), np.full(3, np.log(7.0)))


def test_kl_gradients_check_numerically_to_second_order_in_the_labels_too():
    # (the entropy's and the logits' second derivatives against the float64 references:
    # the matrix's {entropy,kl_divergence}-materialised-hessian-float32-*-plain)
    x, p, _ = _data(zeros=False, seed=4)
    p = 0.5 * p + 0.5 / p.shape[-1]  # keep finite differences away from p = 0
    check_grads(jax.jit(jbce.kl_divergence), (jnp.asarray(x), jnp.asarray(p)), 2, ["rev"])


def test_gradients_equal_reference_gradients():
    # (the Hessians: the matrix's {entropy,kl_divergence}-materialised-hessian-float32-*-plain)
    x, p, _ = _data(zeros=False, seed=5)
    f = lambda a, b: jbce.kl_divergence(b, a, reduction="sum")
    r = lambda a, b: jnp.sum(ref.ref_kl_divergence(b, a, reduction="none", xp=jnp))
    g = jitted(jax.grad(f, (0, 1)))(jnp.asarray(p), jnp.asarray(x))
    gr = jitted(jax.grad(r, (0, 1)))(jnp.asarray(p), jnp.asarray(x))
    for a, b in zip(g, gr):
        ref.assert_close(a, np.asarray(b), rtol=1e-12, atol=1e-15)


# Zero probabilities (entropy) and labels, and -inf logits under zero labels (KL): finite
# values and gradients equal to the float64 references', the matrix's
# entropy-materialised-*-float32-zero-plain, kl_divergence-materialised-*-float32-random-plain
# (a one-hot row) and kl_divergence-materialised-*-float32-neg_inf_classes-plain.


def test_checkify_reports_probabilities_outside_unit_interval():
    f = checkify.checkify(lambda a: jbce.entropy(a))
    err, _ = f(jnp.asarray([[0.5, 1.5]]))
    assert err.get() is not None
    err, _ = f(jnp.asarray([[0.5, 0.5]]))
    assert err.get() is None


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_computes_in_float32(dtype):
    x, p, _ = _data(zeros=False, seed=7)
    pl, xl = jnp.asarray(p, dtype), jnp.asarray(x, dtype)
    h = jitted(jbce.entropy)(pl)
    kl, g = jitted(jax.value_and_grad(lambda b: jbce.kl_divergence(b, pl, reduction="sum")))(xl)
    assert h.dtype == jnp.float32 and kl.dtype == jnp.float32 and g.dtype == dtype
    p64, x64 = np.asarray(pl, np.float64), np.asarray(xl, np.float64)
    ref.assert_close(h, ref.ref_entropy(p64), rtol=1e-6)
    ref.assert_close(kl, ref.ref_kl_divergence(x64, p64, reduction="none").sum(), rtol=1e-5)


def test_vmap_equals_per_row_calls():
    x, p, _ = _data(layout="tuple", seed=8)
    got = jitted(jax.vmap(lambda a, b: jbce.kl_divergence(b, a, axis=(0, 1), reduction="none")))(
        jnp.asarray(p), jnp.asarray(x)
    )
    want = [
        ref.ref_kl_divergence(x[i], p[i], axis=(0, 1), reduction="none") for i in range(p.shape[0])
    ]
    ref.assert_close(got, np.asarray(want), atol=1e-15)


class JitVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_same_with_and_without_jit(self):
        x, p, axis = _data(layout="first", seed=9)
        ref.assert_close(
            self.variant(lambda a: jbce.entropy(a, axis=axis))(jnp.asarray(p)),
            ref.ref_entropy(p, axis=axis),
            atol=1e-15,
        )
        ref.assert_close(
            self.variant(lambda a, b: jbce.kl_divergence(b, a, axis=axis, reduction="none"))(
                jnp.asarray(p), jnp.asarray(x)
            ),
            ref.ref_kl_divergence(x, p, axis=axis, reduction="none"),
            atol=1e-15,
        )
