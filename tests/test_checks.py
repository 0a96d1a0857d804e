"""Argument validation: wrong shapes/dtypes/options are refused with messages naming the
argument and both shapes; value errors are reported under checkify."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jbce

pytestmark = pytest.mark.jax_strict

F = jnp.float32
INT = jnp.int32


def z(shape, dtype=F):
    return jnp.zeros(shape, dtype)


# (id, function, args, kwargs, exception, substrings the message must contain)
BAD_CALLS = [
    (
        "bce_labels_shape",
        jbce.sigmoid_binary_cross_entropy,
        (z((4, 3)), z((4, 2))),
        {},
        ValueError,
        ["labels", "(4, 3)", "(4, 2)"],
    ),
    (
        "bce_weights_shape",
        jbce.sigmoid_binary_cross_entropy,
        (z((4, 3)), z((4, 3))),
        {"weights": z((2,))},
        ValueError,
        ["weights", "(4, 3)", "(2,)"],
    ),
    (
        "bce_pos_weight_shape",
        jbce.sigmoid_binary_cross_entropy,
        (z((4, 3)), z((4, 3))),
        {"pos_weight": z((5,))},
        ValueError,
        ["pos_weight", "(4, 3)", "(5,)"],
    ),
    (
        "bce_where_shape",
        jbce.sigmoid_binary_cross_entropy,
        (z((4, 3)), z((4, 3))),
        {"where": z((4, 2), bool)},
        ValueError,
        ["where", "(4, 3)", "(4, 2)"],
    ),
    (
        "bce_int_logits",
        jbce.sigmoid_binary_cross_entropy,
        (z((4, 3), INT), z((4, 3))),
        {},
        TypeError,
        ["logits", "int32"],
    ),
    (
        "bce_bad_reduction",
        jbce.sigmoid_binary_cross_entropy,
        (z((4, 3)), z((4, 3))),
        {"reduction": "avg"},
        ValueError,
        ["reduction", "avg"],
    ),
    (
        "probs_labels_shape",
        jbce.binary_cross_entropy,
        (z((4, 3)), z((3, 4))),
        {},
        ValueError,
        ["labels", "(4, 3)", "(3, 4)"],
    ),
    ("probs_int", jbce.binary_cross_entropy, (z((4,), INT), z((4,))), {}, TypeError, ["probs"]),
    (
        "focal_labels_shape",
        jbce.sigmoid_focal_loss,
        (z((4, 3)), z((5, 3))),
        {},
        ValueError,
        ["labels", "(4, 3)", "(5, 3)"],
    ),
    (
        "focal_negative_gamma",
        jbce.sigmoid_focal_loss,
        (z((4,)), z((4,))),
        {"gamma": -0.5},
        ValueError,
        ["gamma"],
    ),
    (
        "ce_int_labels_shape",
        jbce.softmax_cross_entropy_with_integer_labels,
        (z((32, 10)), z((32, 1), INT)),
        {},
        ValueError,
        ["labels", "(32,)", "(32, 10)", "(32, 1)"],
    ),
    (
        "ce_int_float_labels",
        jbce.softmax_cross_entropy_with_integer_labels,
        (z((32, 10)), z((32,))),
        {},
        TypeError,
        ["labels", "integer"],
    ),
    (
        "ce_int_class_weights",
        jbce.softmax_cross_entropy_with_integer_labels,
        (z((32, 10)), z((32,), INT)),
        {"class_weights": z((3,))},
        ValueError,
        ["class_weights", "(10,)", "(3,)"],
    ),
    (
        "ce_int_weights",
        jbce.softmax_cross_entropy_with_integer_labels,
        (z((32, 10)), z((32,), INT)),
        {"weights": z((5,))},
        ValueError,
        ["weights", "(32,)", "(5,)"],
    ),
    (
        "ce_int_where",
        jbce.softmax_cross_entropy_with_integer_labels,
        (z((32, 10)), z((32,), INT)),
        {"where": z((5,), bool)},
        ValueError,
        ["where", "(5,)"],
    ),
    (
        "ce_int_axis",
        jbce.softmax_cross_entropy_with_integer_labels,
        (z((32, 10)), z((32,), INT)),
        {"axis": 2},
        ValueError,
        ["axis", "2"],
    ),
    (
        "ce_int_int_logits",
        jbce.softmax_cross_entropy_with_integer_labels,
        (z((32, 10), INT), z((32,), INT)),
        {},
        TypeError,
        ["logits"],
    ),
    (
        "ce_soft_labels_shape",
        jbce.softmax_cross_entropy,
        (z((32, 10)), z((32, 9))),
        {},
        ValueError,
        ["labels", "(32, 10)", "(32, 9)"],
    ),
    (
        "ce_soft_bad_reduction",
        jbce.softmax_cross_entropy,
        (z((2, 3)), z((2, 3))),
        {"reduction": "mena"},
        ValueError,
        ["reduction"],
    ),
    (
        "kl_shape",
        jbce.kl_divergence,
        (z((4, 3)), z((4, 2))),
        {},
        ValueError,
        ["labels", "(4, 3)", "(4, 2)"],
    ),
    ("entropy_int", jbce.entropy, (z((4, 3), INT),), {}, TypeError, ["probs"]),
    ("disc_int", jbce.discriminator_loss, (z((4,), INT), z((4,))), {}, TypeError, ["logits"]),
    ("gen_int", jbce.generator_loss, (z((4,), INT),), {}, TypeError, ["logits"]),
    (
        "normalizer_needs_a_mean",
        jbce.sigmoid_binary_cross_entropy,
        (z((4, 3)), z((4, 3))),
        {"normalizer": 12, "reduction": "sum"},
        ValueError,
        ["normalizer", '"mean"', "'sum'"],
    ),
    (
        "normalizer_negative",
        jbce.softmax_cross_entropy_with_integer_labels,
        (z((4, 3)), z((4,), INT)),
        {"normalizer": -1.0},
        ValueError,
        ["normalizer", ">= 0", "-1.0"],
    ),
    (
        "normalizer_not_scalar",
        jbce.softmax_cross_entropy,
        (z((4, 3)), z((4, 3))),
        {"normalizer": jnp.ones(4)},
        ValueError,
        ["normalizer", "scalar", "(4,)"],
    ),
    (
        "batch_axis_name_not_a_name",
        jbce.kl_divergence,
        (z((4, 3)), z((4, 3))),
        {"batch_axis_name": 0},
        TypeError,
        ["batch_axis_name", "int"],
    ),
]


@pytest.mark.parametrize(
    "fn,args,kwargs,exc,parts", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
def test_bad_call_is_refused_with_a_message_naming_argument_and_shapes(
    fn, args, kwargs, exc, parts
):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    for part in parts:
        assert part in msg, (part, msg)


def test_checks_run_at_trace_time_under_jit():
    f = jax.jit(lambda a, b: jbce.softmax_cross_entropy_with_integer_labels(a, b))
    with pytest.raises(ValueError, match=re.escape("(32, 1)")):
        f(z((32, 10)), z((32, 1), INT))


def test_float_labels_to_integer_loss_are_refused_even_if_integral_valued():
    with pytest.raises(TypeError, match="integer"):
        jbce.softmax_cross_entropy_with_integer_labels(z((2, 3)), jnp.asarray([0.0, 2.0], F))


CHECKIFY_CASES = [
    (
        "ce_int_label_too_big",
        lambda: jbce.softmax_cross_entropy_with_integer_labels(
            z((3, 4)), jnp.asarray([0, 4, 1], INT)
        ),
        "labels",
    ),
    (
        "ce_int_label_negative",
        lambda: jbce.softmax_cross_entropy_with_integer_labels(
            z((3, 4)), jnp.asarray([0, -1, 1], INT)
        ),
        "labels",
    ),
    (
        "bce_soft_label",
        lambda: jbce.sigmoid_binary_cross_entropy(z((2,)), jnp.asarray([0.5, -0.1], F)),
        "labels",
    ),
    ("probs", lambda: jbce.binary_cross_entropy(jnp.asarray([1.2], F), z((1,))), "probs"),
    ("focal_label", lambda: jbce.sigmoid_focal_loss(z((1,)), jnp.asarray([3.0], F)), "labels"),
    (
        "ce_soft_label",
        lambda: jbce.softmax_cross_entropy(z((1, 2)), jnp.asarray([[1.5, -0.5]], F)),
        "labels",
    ),
    ("entropy", lambda: jbce.entropy(jnp.asarray([[2.0, -1.0]], F)), "probs"),
    ("kl_labels", lambda: jbce.kl_divergence(z((1, 2)), jnp.asarray([[2.0, -1.0]], F)), "labels"),
]


@pytest.mark.parametrize(
    "thunk,name", [c[1:] for c in CHECKIFY_CASES], ids=[c[0] for c in CHECKIFY_CASES]
)
def test_checkify_reports_out_of_range_values_under_jit(thunk, name):
    err, _ = checkify.checkify(jax.jit(thunk))()
    assert err.get() is not None and name in err.get(), err.get()


def test_checkify_is_silent_on_valid_inputs_and_ignore_index():
    def ok():
        return (
            jbce.softmax_cross_entropy_with_integer_labels(
                z((3, 4)), jnp.asarray([0, -100, 3], INT)
            )
            + jbce.sigmoid_binary_cross_entropy(z((2,)), jnp.asarray([0.0, 1.0], F))
            + jbce.binary_cross_entropy(jnp.asarray([0.0, 1.0], F), jnp.asarray([0.0, 1.0], F))
        )

    err, val = checkify.checkify(jax.jit(ok))()
    assert err.get() is None and np.isfinite(float(val))


def test_out_of_range_label_is_nan_not_a_silent_finite_value_without_checkify():
    val = jbce.softmax_cross_entropy_with_integer_labels(z((3, 4)), jnp.asarray([0, 7, 1], INT))
    assert np.isnan(float(val))


def test_forward_mode_works_and_the_reverse_only_fused_loss_refuses_it():
    # The materialised losses support jvp. A fused loss is a custom_vjp: JAX refuses forward
    # mode (its own TypeError); reverse-over-reverse works.
    x, v = jnp.array([0.5, -1.0, 2.0], F), jnp.array([1.0, 0.0, -1.0], F)
    f = lambda a: jbce.sigmoid_binary_cross_entropy(a, z((3,)))
    _, t = jax.jvp(f, (x,), (v,))
    np.testing.assert_allclose(t, jnp.vdot(jax.grad(f)(x), v), rtol=1e-6)
    g = lambda a: jbce.linear_softmax_cross_entropy(a, z((3, 4)), jnp.array([0, 1], INT))
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(g, (z((2, 3)),), (z((2, 3)),))
    assert jax.jacrev(jax.grad(g))(z((2, 3))).shape == (2, 3, 2, 3)
