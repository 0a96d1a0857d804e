r"""Fused linear + Jensen-Shannon distillation in plain XLA: tiles of both models' logits only.

The implementation behind :func:`jbce.linear_distillation_loss` on every platform, on the walk
every fused op shares (:mod:`jbce._linear.walk`, with two models). With the student's tile
:math:`z = (h W + b) / T` (log-probabilities :math:`\log Q`) and the teacher's
:math:`y = (h_t W_t + b_t) / T` (:math:`\log P`), every quantity of the generalised JSD is
built from each token's two softmax normalisers and a few per-token sums of per-class terms
(:mod:`jbce._softmax.jsd`, the formulas of the materialised
:func:`jbce.jensen_shannon_divergence`):

- Forward: the first pass keeps an online log-sum-exp of both models
  (:func:`jbce._softmax.stats.merge`; under ``axis_name`` combined over the shards), the
  second sums the divergence terms given both normalisers. By default a tile holds whole
  vocabulary rows, so both passes read the same tile: each model's logits are computed once.
- Backward: each recomputed pair of tiles becomes ``d z`` and ``d y`` from the saved
  per-token statistics. Only the gradients of the inputs that are differentiated are
  computed (the custom VJP is declared with ``symbolic_zeros``): a frozen teacher costs no
  teacher matmul in the backward pass, only its tile's recomputation.

Residuals: the inputs and, per token, the shift and shifted log-sum-exp of each model and
one (``beta`` 0 or 1), two (inside (0, 1)) or four (a traced ``beta``) divergence sums.
Second derivatives raise (the backward pass is not derived for them).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal

from jbce._core import sharding
from jbce._core.autodiff import first_order_only
from jbce._core.math import xmul
from jbce._linear import walk as _walk
from jbce._softmax import jsd
from jbce._softmax import stats as _stats


@dataclasses.dataclass(frozen=True)
class Distill:
    """The static options of :func:`distillation_rows`: the divergence's form (one of
    :data:`jbce._softmax.jsd.MODES`) and the walk."""

    mode: str
    walk: _walk.Walk


def _log_probs(x, st: _stats.Stats):
    """``log softmax`` of a tile from its rows' full statistics (a row without classes: -inf)."""
    lse = jnp.where(st.lse == -jnp.inf, 0, st.lse)
    return (x - st.shift[:, None]) - lse[:, None]


def _scaled_tiles(t: _walk.Tile):
    """Both models' tiles at temperature T, the columns an earlier chunk had taken out."""
    _, temperature = t.params
    return tuple(t.masked(z / temperature) for z in t.z)


def _separate_sums(*terms):
    return tuple(jnp.sum(a, axis=-1) for a in terms)


def _one_reduction(terms):
    init = tuple(jnp.zeros((), a.dtype) for a in terms)
    add = lambda x, y: tuple(a + b for a, b in zip(x, y))
    return tuple(lax.reduce(tuple(terms), init, add, (terms[0].ndim - 1,)))


def _variadic_sums(*terms):
    return _one_reduction(terms)


def _complex_pair_sums(*terms):
    """The row sums of one reduction whose operands are the terms in pairs, ``(a, b)`` as the
    complex ``a + ib`` (a last odd term as it is): a complex sum adds the real and the
    imaginary parts separately, so these are the float sums of each term."""
    pairs = len(terms) // 2
    ops = [lax.complex(a, b) for a, b in zip(terms[0 : 2 * pairs : 2], terms[1 : 2 * pairs : 2])]
    sums = _one_reduction(ops + list(terms[2 * pairs :]))
    return tuple(x for s in sums[:pairs] for x in (jnp.real(s), jnp.imag(s))) + sums[pairs:]


def _row_sums(terms):
    """Row sums of each ``[tn, tv]`` term (in :data:`jbce._softmax.jsd.SUMS` order). Off CPU
    in one reduction, so that the terms' common producer (the transcendentals of both
    softmaxes) fuses into it rather than being written out; XLA:CPU runs separate sums faster.

    On CUDA the reduction's operands are the terms in complex pairs
    (:func:`_complex_pair_sums`): XLA:GPU does not fuse an expensive elementwise op
    (``expm1``, ``log1p``) that two operands of a reduction read, so the mixture's
    ``log1p(c expm1(.))`` that KL(P||M) and KL(Q||M) share (:data:`jbce._softmax.jsd.SUMS`
    keeps them adjacent, one pair) was written to HBM as a ``[tn, tv]`` array and read back:
    a third of the forward pass' tile traffic (the deviceless H100 compile of the bench case,
    ``python -m tests.deviceless --checks distill``). A complex operand reads it once. On TPU
    the plain variadic reduction fuses either way."""
    if len(terms) == 1:
        return _separate_sums(*terms)
    return lax.platform_dependent(
        *terms, cpu=_separate_sums, cuda=_complex_pair_sums, default=_variadic_sums
    )


def _empty(n, dtype):
    return _stats.Stats(jnp.zeros((n,), dtype), jnp.full((n,), -jnp.inf, dtype), None)


def _reduce(mode: str) -> _walk.Reduce:
    """Per token: both models' softmax statistics, then the divergence sums given them."""

    def tile_stats(t):
        return tuple(_stats.block_stats(x, None) for x in _scaled_tiles(t))

    def tile_sums(t, st):
        beta, _ = t.params
        z, y = _scaled_tiles(t)
        return _row_sums(jsd.class_terms(mode, _log_probs(z, st[0]), _log_probs(y, st[1]), beta))

    return _walk.Reduce(
        tile_stats,
        merge=lambda a, b: tuple(map(_stats.merge, a, b)),
        empty=lambda n, dtype: (_empty(n, dtype), _empty(n, dtype)),
        combine=lambda st, axis: tuple(_stats.combine_over_axis(s, axis) for s in st),
        sums=tile_sums,
    )


def forward_rows(student, teacher, params, opts: Distill):
    """Per token: (student shift, lse, teacher shift, lse, *sums), each ``[N]``."""
    ops = _walk.Operands((student, teacher), (), (), params)
    (sz, sy), sums = _walk.forward(ops, _reduce(opts.mode), opts.walk)
    return (sz.shift, sz.lse, sy.shift, sy.lse, *sums)


def _loss(mode, rows, beta):
    mz, lz, my, ly, *sums = rows
    value = jsd.divergence(mode, sums, beta)
    return jnp.where(jnp.isnan(lz) | jnp.isnan(ly), jnp.nan, value)


# Neither rule is derived for second derivatives: they raise this error, applied to what the
# rules compute from (the forward rule's inputs, the backward pass's residuals and cotangent),
# before JAX would differentiate the walk.
_SECOND_ORDER = first_order_only(
    "linear_distillation_loss",
    "jbce.jensen_shannon_divergence on the materialised logits (jax.hessian works there)",
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def distillation_rows(student, teacher, beta, temperature, opts: Distill):
    r"""Per-token generalised JSD between ``softmax((h w + b) / T)`` (``student``, a
    :class:`jbce._linear.walk.Model`: Q) and ``softmax((h_t w_t + b_t) / T)`` (``teacher``:
    P); ``h`` ``[N, D]``, ``w`` ``[D, V]``, ``h_t`` ``[N, D_t]``, ``w_t`` ``[D_t, V]``, biases
    ``[V]`` or None, ``beta`` and ``temperature`` scalars in ``opts.walk.dtype``. With
    ``opts.walk.axis_name`` the weights and biases hold this shard's vocabulary columns and
    the result is global (replicated)."""
    rows = forward_rows(student, teacher, (beta, temperature), opts)
    return _loss(opts.mode, rows, beta)


def _values(tree):
    return jax.tree.map(lambda p: p.value, tree, is_leaf=lambda x: isinstance(x, CustomVJPPrimal))


def _perturbed(tree):
    """Which inputs are differentiated, as pytree structure (static residuals): () yes, None
    no (a None input too)."""
    return jax.tree.map(
        lambda p: () if p.perturbed else None, tree,
        is_leaf=lambda x: isinstance(x, CustomVJPPrimal),
    )  # fmt: skip


def _wanted(tree) -> bool:
    return tree is not None


def _distillation_rows_fwd(student, teacher, beta, temperature, opts: Distill):
    primals = (student, teacher, beta, temperature)
    args = _SECOND_ORDER(_values(primals))  # a second derivative raises here, not in the walk
    wanted = _perturbed(primals)
    rows = forward_rows(args[0], args[1], args[2:], opts)
    # Residuals: the inputs and a few floats per token (two per model and the sums).
    return _loss(opts.mode, rows, args[2]), (args, rows, wanted)


def _tile_grad(mode: str, want_temperature: bool):
    def tile_grad(t: _walk.Tile):
        beta, temperature = t.params
        mz, lz, my, ly, g, sums = t.rows
        z, y = _scaled_tiles(t)
        lq = _log_probs(z, _stats.Stats(mz, lz, None))
        lp = _log_probs(y, _stats.Stats(my, ly, None))
        gz, gy = jsd.class_grads(mode, lq, lp, beta, tuple(s[:, None] for s in sums))
        gcol = g[:, None]
        if t.keep is not None:  # rows an overlapping last token chunk shares count once
            gcol = jnp.where(t.keep[:, None], gcol, jnp.zeros((), gcol.dtype))
        dz, dy = xmul(gcol, gz), xmul(gcol, gy)
        dtemp = None
        if want_temperature:  # z = x / T: d/dT = -sum(d/dz z) / T, z read as log Q
            dtemp = jnp.sum(xmul(dz, lq)) + jnp.sum(xmul(dy, lp))
        return (dz / temperature, dy / temperature), (), (None, dtemp)

    return tile_grad


def _distillation_rows_bwd(opts: Distill, res, g):
    (args, rows, wanted), g = _SECOND_ORDER((res, g))
    student, teacher, beta, temperature = args
    models = tuple(tuple(map(_wanted, m)) for m in wanted[:2])
    want_beta, want_temp = map(_wanted, wanted[2:])
    mz, lz, my, ly, *sums = rows
    grad = _walk.Grad(_tile_grad(opts.mode, want_temp), models, params=(False, want_temp))
    per_row = (mz, lz, my, ly, g, tuple(sums))
    ops = _walk.Operands((student, teacher), per_row, (), (beta, temperature))
    out = _walk.backward(ops, grad, opts.walk)
    (ds, dt_), (_, dtemp) = out.models, out.params
    dbeta = jnp.sum(xmul(g, jsd.beta_grad(opts.mode, sums, beta))) if want_beta else None
    if dtemp is not None:
        dtemp = -dtemp / temperature
    grads = (ds, dt_, dbeta, dtemp)
    # Inside shard_map an input replicated over an axis its cotangent varies on gets the sum.
    return jax.tree.map(
        lambda ct, a: None if ct is None else sharding.psum_to_like(ct.astype(a.dtype), a),
        grads, args, is_leaf=lambda x: x is None,
    )  # fmt: skip


distillation_rows.defvjp(_distillation_rows_fwd, _distillation_rows_bwd, symbolic_zeros=True)
