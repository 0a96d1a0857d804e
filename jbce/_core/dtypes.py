"""The dtype policy shared by every jbce loss: what a loss computes in, and how it reads inputs.

- A loss computes in float32, or in float64 when an input is float64 (x64 mode); bf16 and
  fp16 inputs are computed in float32 and gradients come back in each input's own dtype.
- A narrow float input is read through :func:`to_compute`: cast up and rounded to its own
  precision. Under ``jit`` XLA may skip the rounding of a value produced in bf16 in the same
  program (``h @ w`` in bf16 is computed in float32 and, with excess precision allowed, kept
  so). Different readers of one array could then see different numbers: a forward kernel
  fused with the producer the unrounded ones, the backward pass the stored bf16 ones. The
  explicit ``reduce_precision`` gives every reader the rounded value, so the parts of one loss
  (log-sum-exp, target logit, softmax in the backward pass) always agree; it fuses into the
  reading kernel and costs no memory traffic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def compute_dtype(*xs: ArrayLike | None) -> jnp.dtype:
    """float32, or float64 if an input array is float64 (Python scalars and lists don't count)."""
    dt = jnp.float32
    for x in xs:
        # Python scalars are weakly typed: a label of 1.0 must not make a float32 loss float64.
        if x is None or isinstance(x, (bool, int, float, list, tuple)):
            continue
        if jnp.result_type(x) == jnp.float64:
            dt = jnp.float64
    return jnp.dtype(dt)


def to_compute(x: jax.Array, dtype) -> jax.Array:
    """``x`` in the compute ``dtype``; a narrower float input keeps exactly its own values."""
    x = jnp.asarray(x)
    dtype = jnp.dtype(dtype)
    if x.dtype == dtype or not jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(dtype)
    fi = jnp.finfo(x.dtype)
    if fi.bits >= jnp.finfo(dtype).bits:
        return x.astype(dtype)
    return jax.lax.reduce_precision(x.astype(dtype), exponent_bits=fi.nexp, mantissa_bits=fi.nmant)
