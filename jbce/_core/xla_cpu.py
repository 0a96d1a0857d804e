r"""Reading inputs inside XLA:CPU's fused reductions: bfloat16 rounded without
``reduce_precision``, and arrays kept apart from the backward pass's.

XLA:CPU compiles an elementwise chain that ends in a reduction into one YNNPACK kernel only if
every operation in it is supported (``bench/NOTES.md``). ``reduce_precision``, with which
:func:`jbce._core.dtypes.to_compute` rounds a narrow input to its own precision (XLA may keep a
bf16 value made in the same program in float32, excess precision), is not: each bf16 reader
of a reduction gets a float32 copy of the input in its own kernel, a logits-sized temporary.
:func:`upcast` rounds with arithmetic instead, Veltkamp's splitting

.. math::
    c = (2^{16} + 1)\, z, \qquad \mathrm{RN}_8(z) = c - (c - z),

which rounds a float32 ``z`` to 8 significant bits, to nearest with ties to even: checked
against ``astype(bfloat16)`` on all 2^32 float32 bit patterns, equal for every normal value
below :data:`SPLIT_BOUND` in magnitude (XLA:CPU flushes subnormals to zero in arithmetic, as
it does for the rounded copy). Larger and infinite values are split off first, ``z = sign(v)
min(|v|, B)`` and ``v = RN_8(z) + (v - z)``: a bf16 value (an argument) comes back exactly, as
do ``+-inf`` and NaN; only a float32 value above ``B = 2^111 ~ 2.6e33`` in magnitude that XLA
kept unrounded passes unrounded. The derivatives never see this: the CPU cores use it in their
value functions only, whose derivatives are the shared tangent maps.

A second trap: XLA merges an ``N``-element subexpression two kernels compute from the same
input (``1 - y``, a broadcast constant such as the splitting's) and materialises it for both.
Each pass of a CPU core therefore reads its inputs and constants through its own
``optimization_barrier`` (:func:`apart`); the barrier copies nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SPLIT_BOUND = 2.0**111  # the largest power of 2 whose split (2^16 + 1) z is finite in float32
_SPLIT = 2.0**16 + 1  # float32 has 24 significant bits, bfloat16 8: split off 16


def constants(dtype=jnp.float32) -> tuple[jax.Array, ...]:
    """The constants :func:`upcast` needs, to pass through a pass's :func:`apart`."""
    return jnp.asarray(SPLIT_BOUND, dtype), jnp.asarray(_SPLIT, dtype)


def apart(*arrays):
    """``arrays`` (a pytree of them) as one pass of a kernel reads them: the same values, but
    nothing computed from them is merged with what another pass computes from the originals."""
    return jax.lax.optimization_barrier(arrays)


def upcast(v: jax.Array, k: tuple[jax.Array, ...], *, probabilities: bool = False) -> jax.Array:
    """``v`` as :func:`jbce._core.dtypes.to_compute` reads it into float32, in operations
    XLA:CPU fuses: bfloat16 rounded by Veltkamp's splitting (see the module docstring) with the
    constants ``k`` (:func:`constants`); any other dtype unchanged (the caller's cast then
    handles it: float32 is already there, float16 still goes through ``reduce_precision``).

    ``probabilities``: ``v`` holds values in [0, 1] (labels), which need no split: 3
    operations instead of 9 (an infinite or huge value, outside the documented range, reads
    as NaN).
    """
    if v.dtype != jnp.bfloat16:
        return v
    bound, split = k
    f = v.astype(bound.dtype)
    if probabilities:
        c = split * f
        return c - (c - f)
    z = jnp.sign(f) * jnp.minimum(jnp.abs(f), bound)  # f, with |f| > B (and inf) split off
    c = split * z
    return (c - (c - z)) + (f - z)
