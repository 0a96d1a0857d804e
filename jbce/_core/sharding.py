"""Varying-mesh-axes bookkeeping for custom_vjp rules used inside ``shard_map``."""

from __future__ import annotations

import jax


def _varying_axes(x) -> frozenset:
    """Mesh axes over which ``x`` varies inside ``shard_map`` (empty elsewhere)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def psum_to_like(ct: jax.Array, like: jax.Array) -> jax.Array:
    """Sums a cotangent over the mesh axes it varies on but its primal ``like`` does not.

    A ``custom_vjp`` backward pass inside ``shard_map`` must return cotangents with the
    primal's varying-axes type. An input replicated over an axis (class weights under a
    batch-sharded "data" axis, say) collects gradient contributions from every shard of that
    axis; their sum is its cotangent (what the transpose of the implicit ``pvary`` does).
    A no-op outside ``shard_map`` and under ``pmap``/``vmap``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jbce._core.sharding import psum_to_like
      >>> psum_to_like(jnp.ones(3), jnp.zeros(3))
      Array([1., 1., 1.], dtype=float32)
    """
    extra = _varying_axes(ct) - _varying_axes(like)
    return jax.lax.psum(ct, tuple(extra)) if extra else ct


def pvary_like(x: jax.Array, like: jax.Array) -> jax.Array:
    """Marks ``x`` as varying over the mesh axes ``like`` varies on (a no-op outside
    ``shard_map``): e.g. the initial carry of a ``lax.scan`` over a sharded operand.

    Example:
      >>> import jax.numpy as jnp
      >>> from jbce._core.sharding import pvary_like
      >>> pvary_like(jnp.zeros(2), jnp.ones(3))
      Array([0., 0.], dtype=float32)
    """
    axes = _varying_axes(like) - _varying_axes(x)
    return jax.lax.pcast(x, tuple(axes), to="varying") if axes else x


def varying_like(*refs):
    """A function marking an array as varying over every mesh axis one of ``refs`` varies on
    (its ``axes`` attribute: those axes, empty outside ``shard_map``).

    A loop carry inside ``shard_map`` must keep its type: the zeros a loop starts from are
    replicated while the tiles of a sharded operand are not. A no-op elsewhere.
    """
    axes = frozenset().union(*(_varying_axes(r) for r in refs if r is not None))

    def vary(x):
        extra = tuple(sorted(axes - _varying_axes(x)))
        return jax.lax.pcast(x, extra, to="varying") if extra else x

    vary.axes = axes
    return vary


def local_labels(labels, num_local: int, axis_name):
    """Global class ids as indices into this shard's ``num_local`` classes (outside
    ``[0, num_local)`` where the class is on another shard): shard ``i`` of ``axis_name``
    owns classes ``[i * num_local, (i + 1) * num_local)``. Unchanged without ``axis_name``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jbce._core.sharding import local_labels
      >>> f = lambda _: local_labels(jnp.array([0, 5]), 4, "v")
      >>> jax.vmap(f, axis_name="v")(jnp.ones(2))
      Array([[ 0,  5],
             [-4,  1]], dtype=int32)
    """
    if labels is None or axis_name is None:
        return labels
    return labels - jax.lax.axis_index(axis_name).astype(labels.dtype) * num_local
