r"""Forward- and reverse-mode derivatives of a jbce core from one linear tangent map.

Every jbce core is a :func:`lean_jvp`: a ``jax.custom_jvp`` whose rule returns the core's
value and a tangent map that is linear in the tangents,

.. math::
    \dot L = \sum_i \frac{\partial L}{\partial a_i}\, \dot a_i ,

with the partial derivatives written out by hand (the same careful formulas a backward pass
needs: the softmax as :math:`e^{x - m} e^{-\ell}`, coefficients masked so that excluded rows
and ``-inf`` classes contribute exactly 0). ``jax.jvp``, ``jax.jacfwd`` and ``jax.hessian``
evaluate the map; reverse mode (``jax.grad``, ``jax.vjp``) is JAX's transpose of it.

The map runs under ``jax.checkpoint`` with a policy that saves nothing: when JAX linearizes
the rule for reverse mode, the only residuals are the map's non-tangent inputs, i.e. the
core's inputs as given (a bf16 input stays bf16) and the few per-row values ``saved(out)``
picks from its output (the shift and log-sum-exp of a softmax). The partial derivatives (a
softmax, ``N x K``) are recomputed in the backward pass from them, as a hand-written
``custom_vjp`` would, and fuse into one elementwise pass there. The derivatives are plain
``jnp``, so a second derivative (``jax.hessian``, ``jax.jacfwd(jax.grad(f))``) differentiates
them in turn, going through the core's own rule for the per-row values.

A zero cotangent no longer switches a coefficient off (a linear map cannot test its
input), so a core takes the mask of the elements or rows its loss uses and applies it to
the coefficients: an excluded NaN or infinite input gets exactly zero gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jbce._core import sharding


def lean_jvp(fun: Callable, tangent_map: Callable, *, num_static: int = 0, saved=None):
    """``fun`` as a ``custom_jvp`` whose tangent is ``tangent_map`` (see the module docstring).

    Args:
      fun: the core, ``fun(*arrays, *static)``; its last ``num_static`` arguments are static
        (hashable) options.
      tangent_map: ``tangent_map(arrays, kept, tangents, *static)`` -> the output's tangent,
        linear in ``tangents`` (a tuple like ``arrays``, None for an input whose tangent is
        zero, an integer input, or a None input). ``kept = saved(out)``.
      num_static: how many trailing arguments of ``fun`` are static.
      saved: picks from ``fun``'s output the values the map needs (per-row statistics);
        None: nothing.
    """
    n = fun.__code__.co_argcount  # custom_jvp wants the static positions counted from 0
    core = jax.custom_jvp(fun, nondiff_argnums=tuple(range(n - num_static, n)))

    def rule(*args):
        static, (primals, tangents) = args[:-2], args[-2:]
        out = core(*primals, *static)
        tangents = tuple(_nonzero(t) for t in tangents)
        kept = None if saved is None else saved(out)
        tm = jax.checkpoint(
            functools.partial(_call, tangent_map, static),
            policy=jax.checkpoint_policies.nothing_saveable,
            prevent_cse=False,  # the recomputation is a backward-pass fusion, as a VJP's is
        )
        tan = tm(tuple(primals), kept, tangents)
        # A None in the map's output is a zero tangent (of a field such as the shift).
        tan = jax.tree.map(_zero_if_none, out, tan, is_leaf=lambda v: v is None)
        return out, tan

    core.defjvp(rule, symbolic_zeros=True)
    return core


def _call(tangent_map, static, primals, kept, tangents):
    return tangent_map(primals, kept, tangents, *static)


def _zero_if_none(o, t):
    if o is None:
        return None
    # zeros_like keeps the primal's varying mesh axes (a zero of float32[8]{V:data} inside
    # shard_map must be varying too). An empty output's tangent is its zeros as well: inside
    # shard_map JAX may fold an empty primal to a replicated constant while the tangent
    # computed from the sharded inputs varies, and the rule must return matching types.
    return jnp.zeros_like(o) if t is None or o.size == 0 else t


def _nonzero(t):
    """The tangent, or None where it is (symbolically) zero or of an integer input."""
    if t is None or isinstance(t, SymbolicZero):
        return None
    if jnp.result_type(t) == jax.dtypes.float0:
        return None
    return t


def contract(coef: jax.Array, tangent: jax.Array | None, ndim: int):
    """``sum(coef * tangent)`` over the axes of ``coef`` past the first ``ndim`` (the output's).

    ``tangent`` broadcasts against ``coef`` (a scalar parameter, ``[K]`` class weights, a
    per-logit array) and is cast to its dtype (its transpose casts back: a bf16 input gets a
    bf16 gradient). None (a zero tangent) contributes nothing (returns None).
    """
    if tangent is None:
        return None
    t = tangent.astype(coef.dtype)
    if 0 < t.ndim < coef.ndim:  # explicit, for jax_numpy_rank_promotion="raise"
        t = t.reshape((1,) * (coef.ndim - t.ndim) + t.shape)
    v = coef * t
    if v.ndim > ndim:
        v = jnp.sum(v, axis=tuple(range(ndim, v.ndim)))
    return v


def total(shape, dtype, *terms) -> jax.Array:
    """The sum of the non-None ``terms``, broadcast to ``shape`` (zeros if there are none)."""
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    if out is None:
        return jnp.zeros(shape, dtype)
    return jnp.broadcast_to(out.astype(dtype), shape)


def keep_rows(rows: jax.Array | None, v: jax.Array) -> jax.Array:
    """``v`` in the rows ``rows`` (``[...]``; ``v`` ``[...]`` or ``[..., K]``), 0 elsewhere."""
    if rows is None:
        return v
    m = rows.reshape(rows.shape + (1,) * (v.ndim - rows.ndim))
    return jnp.where(m, v, jnp.zeros((), v.dtype))


def keep_where(mask: jax.Array | None, v: jax.Array) -> jax.Array:
    """``v`` where ``mask`` (broadcastable to ``v``, numpy-style), exactly 0 elsewhere."""
    if mask is None:
        return v
    if 0 < mask.ndim < v.ndim:  # explicit, for jax_numpy_rank_promotion="raise"
        mask = mask.reshape((1,) * (v.ndim - mask.ndim) + mask.shape)
    return jnp.where(mask, v, jnp.zeros((), v.dtype))


def first_order_only(name: str, alternative: str):
    """A guard for a ``custom_vjp`` whose rules are not derived for second derivatives: it
    returns a pytree as it is, and its derivative raises a TypeError that names the loss.

    The rules apply it to what they compute from (the forward rule's inputs, the backward
    pass's residuals and cotangents), so that ``jax.hessian`` or
    ``jax.jacrev(jax.grad(f))`` raise this error before JAX differentiates the rules
    themselves, where it would fail on a Pallas call or inside a walk with an error that
    does not say why, or return wrong numbers. Only float leaves are guarded (an integer
    input has no tangent); a symbolic zero cotangent is left as it is. A value without a
    tangent passes through untouched, so first derivatives are unaffected.
    """

    @jax.custom_jvp
    def identity(x):
        return x

    @identity.defjvp
    def _raise(primals, tangents):
        raise TypeError(
            f"jbce.{name} has first-order derivatives only (jax.grad, jax.vjp); for second "
            f"derivatives use {alternative}."
        )

    def guard(tree):
        return jax.tree.map(lambda v: identity(v) if _inexact(v) else v, tree)

    return guard


def _inexact(v) -> bool:
    return not isinstance(v, SymbolicZero) and jnp.issubdtype(jnp.result_type(v), jnp.inexact)


def cotangents(*pairs):
    """The cotangents a ``custom_vjp`` backward pass returns, one per ``(primal, gradient)``:
    None for a None primal, float0 zeros for an integer or boolean one (gradient None), else
    the gradient in the primal's dtype.

    Inside ``shard_map`` an input replicated over a mesh axis its gradient varies on
    (weight under data parallelism, hidden under vocabulary parallelism) gets the sum over
    it (:func:`jbce._core.sharding.psum_to_like`).
    """
    out = []
    for x, g in pairs:
        if x is None:
            out.append(None)
        elif g is None:
            out.append(jnp.zeros(jnp.shape(x), jax.dtypes.float0))
        else:
            out.append(sharding.psum_to_like(g.astype(x.dtype), x))
    return tuple(out)
