r"""The sigmoid BCE core's value tuned for XLA:CPU: the numbers of the formula in
:mod:`jbce._binary.api`, without a compare or a select on the element path of the reduction.

XLA:CPU compiles an elementwise chain that ends in a reduction into one YNNPACK kernel only if
every operation in it is supported; a compare or a select (``jnp.where``, and so
:func:`jbce._core.math.xmul`) is not, and each costs an extra kernel and an ``N``-element
temporary (``bench/NOTES.md``). The formula's ``xmul(a, relu(-x)) + xmul(b, relu(x))``
(``a = pos_weight * y``, ``b = 1 - y``, ``0 * inf = 0``) is written here as

.. math::
    (c\, w)\, w\, z, \qquad c = h\, b + (1 - h)\, a, \quad h = \max(\mathrm{sign}(x), 0),
    \quad z = \min(|x|, F), \quad w = 1 + \min(|x| - z, F)

with :math:`F` the largest float. ``h`` is exactly 1 or 0, so ``c`` is exactly the
coefficient the formula keeps (at ``x = 0`` either, times ``z = 0``). For a finite logit
``w = 1`` and ``z = |x|``: the formula's product, bit for bit. For an infinite one ``z = w =
F``: ``c F F`` overflows to ``+inf`` for any ``c > 0`` (a label as small as the smallest
subnormal included, hence ``w`` twice) and is exactly 0 for ``c = 0``, the formula's ``0 * inf
= 0``. A NaN logit or label gives NaN through ``log1p(exp(-|x|))`` as in the formula. The
derivatives are not affected: they are the core's tangent map, on every platform.

The inputs are read as :mod:`jbce._core.xla_cpu` reads them: through an
``optimization_barrier`` with the constants (without it XLA merges the forward pass's
``1 - y``, or a broadcast 0 or 1, with the backward pass's and materialises the shared
``N``-element array for both kernels), and bfloat16 rounded with arithmetic the kernel fuses.

What it buys (2^24 float32 on the 2-core dev box; ``python -m bench --only bce_2^24 --dtypes
float32``, one interleaved run): the forward from 1.4x to about 3x optax's speed,
``value_and_grad`` from 1.5x to about 2.3x, temp 192 / 256 MiB -> 0 B (``bench/NOTES.md``,
section 24).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jbce._core import xla_cpu as cpu
from jbce._core.dtypes import to_compute


def bce_logits_value(x: jax.Array, y: jax.Array, pw: jax.Array | None, dtype) -> jax.Array:
    """The loss per element in ``dtype`` (float32 or float64) for inputs of one shape in any
    float dtypes, as given (``pw`` None: 1)."""
    zero, one = jnp.zeros((), dtype), jnp.ones((), dtype)
    x, y, pw, zero, one, k = cpu.apart(x, y, pw, zero, one, cpu.constants(dtype))
    x, y, pw = (None if v is None else to_compute(cpu.upcast(v, k), dtype) for v in (x, y, pw))
    big = jnp.finfo(dtype).max
    a = y if pw is None else pw * y
    b = one - y
    ax = jnp.abs(x)
    t = jnp.log1p(jnp.exp(-ax))
    h = jnp.maximum(jnp.sign(x), zero)
    c = h * b + (one - h) * a
    z = jnp.minimum(ax, big)
    w = one + jnp.minimum(ax - z, big)  # 1, or the largest float where |x| = inf
    # Without pos_weight the formula's a + b = y + (1 - y) is exactly 1 for y in [0, 1].
    return (c * w) * w * z + (t if pw is None else (a + b) * t)
