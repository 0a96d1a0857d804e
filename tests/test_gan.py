"""discriminator_loss / generator_loss against float64 references and PyTorch."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbce
from tests import reference as ref

pytestmark = pytest.mark.jax_strict


def jitted(fn):
    """``fn`` compiled as one program when called: op by op, each primitive would compile
    on its own (a loss and its reference's gradients: 4.5 s of CPU eagerly, 0.9 s jitted)."""
    return lambda *args, **kwargs: jax.jit(lambda: fn(*args, **kwargs))()


def _logits(seed=0, n=(8,), m=(5,)):
    rng = np.random.default_rng(seed)
    return rng.normal(size=n) * 3, rng.normal(size=m) * 3


@pytest.mark.parametrize("shapes", [((8,), (8,)), ((4, 3), (4, 3)), ((6,), (2, 5)), ((), ())])
def test_gan_losses_match_float64_reference(shapes):
    r, f = _logits(n=shapes[0], m=shapes[1])
    d = jitted(jbce.discriminator_loss)(jnp.asarray(r), jnp.asarray(f))
    g = jitted(jbce.generator_loss)(jnp.asarray(f))
    assert d.shape == () and g.shape == () and d.dtype == jnp.float64
    ref.assert_close(d, ref.ref_discriminator_loss(r, f))
    ref.assert_close(g, ref.ref_generator_loss(f))


def test_gan_losses_equal_torch_bce_with_ones_and_zeros():
    r, f = _logits(seed=1)
    tr = ref.torch_sigmoid_binary_cross_entropy(r, np.ones_like(r))
    tf = ref.torch_sigmoid_binary_cross_entropy(f, np.zeros_like(f))
    tg = ref.torch_sigmoid_binary_cross_entropy(f, np.ones_like(f))
    ref.assert_close(
        jitted(jbce.discriminator_loss)(jnp.asarray(r), jnp.asarray(f)), tr + tf, rtol=1e-12
    )
    ref.assert_close(jitted(jbce.generator_loss)(jnp.asarray(f)), tg, rtol=1e-12)


def test_gan_losses_equal_sigmoid_bce_with_constant_labels():
    r, f = _logits(seed=2)
    bce = jbce.sigmoid_binary_cross_entropy
    d = bce(jnp.asarray(r), jnp.ones(r.shape)) + bce(jnp.asarray(f), jnp.zeros(f.shape))
    ref.assert_close(jitted(jbce.discriminator_loss)(jnp.asarray(r), jnp.asarray(f)), np.asarray(d))


def test_generator_loss_is_non_saturating():
    # a confident discriminator (fake logits very negative) still gives a gradient of -1/n
    f = jnp.asarray([-1e4, -50.0])
    g = jitted(jax.grad(jbce.generator_loss))(f)
    ref.assert_close(g, np.array([-0.5, -0.5]))


# The gradients and the reverse-over-reverse Hessian against the float64 references (and
# +-1e30, +-inf and NaN logits, no rows, 8 devices): the matrix's
# {discriminator,generator}_loss-materialised-{grad,hessian}-float32-*-plain.


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_and_infinite_logits(dtype):
    r = np.array([1e30, 1e4, np.inf], dtype)
    f = np.array([-1e30, -1e4, -np.inf], dtype)
    d, gd = jitted(jax.value_and_grad(jbce.discriminator_loss, (0, 1)))(
        jnp.asarray(r), jnp.asarray(f)
    )
    assert float(d) == 0.0
    assert all(np.all(np.isfinite(np.asarray(x))) for x in gd)
    # the generator is maximally wrong here: +inf loss, finite gradient -1/n
    g, gg = jitted(jax.value_and_grad(jbce.generator_loss))(jnp.asarray(f))
    assert float(g) == np.inf
    ref.assert_close(gg, np.full(3, -1 / 3), rtol=ref.rtol_for(dtype))
    f32 = np.array([30.0, -30.0, 1e4], dtype)
    ref.assert_close(jitted(jbce.generator_loss)(jnp.asarray(f32)), ref.ref_generator_loss(f32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_computes_in_float32_and_returns_input_dtype_grads(dtype):
    r, f = _logits(seed=5)
    rl, fl = jnp.asarray(r, dtype), jnp.asarray(f, dtype)
    d, (gr, gf) = jitted(jax.value_and_grad(jbce.discriminator_loss, (0, 1)))(rl, fl)
    assert d.dtype == jnp.float32 and gr.dtype == dtype and gf.dtype == dtype
    ref.assert_close(
        d,
        ref.ref_discriminator_loss(np.asarray(rl, np.float64), np.asarray(fl, np.float64)),
        rtol=1e-6,
    )


def test_vmap_over_a_batch_of_games():
    r, f = _logits(seed=6, n=(3, 4), m=(3, 5))
    got = jitted(jax.vmap(jbce.discriminator_loss))(jnp.asarray(r), jnp.asarray(f))
    ref.assert_close(got, np.array([ref.ref_discriminator_loss(r[i], f[i]) for i in range(3)]))


class JitVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_gan_losses_same_with_and_without_jit(self):
        r, f = _logits(seed=7)
        ref.assert_close(
            self.variant(jbce.discriminator_loss)(jnp.asarray(r), jnp.asarray(f)),
            ref.ref_discriminator_loss(r, f),
        )
        ref.assert_close(
            self.variant(jbce.generator_loss)(jnp.asarray(f)), ref.ref_generator_loss(f)
        )


@pytest.mark.parametrize("which", ["real_logits", "fake_logits"])
def test_integer_logits_are_refused_naming_the_argument(which):
    good = jnp.zeros(3, jnp.float32)
    bad = jnp.zeros(3, jnp.int32)
    args = {"real_logits": good, "fake_logits": good, which: bad}
    with pytest.raises(TypeError, match=f"^{which} must be a floating-point array"):
        jbce.discriminator_loss(**args)
    if which == "fake_logits":
        with pytest.raises(TypeError, match="^fake_logits must be a floating-point array"):
            jbce.generator_loss(bad)
