"""What each benchmark case runs: jbce, its peers (optax, PyTorch) and the floor kernels.

Every JAX implementation is a function ``f(x, y)`` of the logits ``x`` and the labels ``y``;
``"fwd"`` jits ``f`` and ``"vag"`` jits ``jax.value_and_grad(f)`` (gradient w.r.t. the logits).
The floors are kernels that touch the same bytes as the loss (and, for softmax, do the same
number of ``exp``): a loss cannot beat them, so ``jbce / floor`` says how much is left.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jbce
from bench.shapes import BINARY, FOCAL_SOFT, INTEGER_LABELS, NLL, SOFTMAX_INT, SOFTMAX_SOFT, Shape

F32 = jnp.float32


def make_inputs(shape: Shape, dtype: str, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """Deterministic logits (in ``dtype``) and labels for ``shape``.

    Binary labels are 0/1 in ``dtype``; integer labels are int32; soft labels are softmax
    distributions in ``dtype``. For ``nll`` the "logits" are log-probabilities
    (``log_softmax`` of the logits, rounded to ``dtype``).
    """
    kx, ky = jax.random.split(jax.random.key(seed))
    dt = jnp.dtype(dtype)
    x = (3.0 * jax.random.normal(kx, shape.dims, F32)).astype(dt)
    if shape.kind == BINARY:
        y = jax.random.bernoulli(ky, 0.5, shape.dims).astype(dt)
    elif shape.kind in INTEGER_LABELS:
        y = jax.random.randint(ky, shape.dims[:1], 0, shape.dims[1], jnp.int32)
        if shape.kind == NLL:
            x = jax.nn.log_softmax(x.astype(F32), axis=-1).astype(dt)
    elif shape.kind in (SOFTMAX_SOFT, FOCAL_SOFT):
        y = jax.nn.softmax(jax.random.normal(ky, shape.dims, F32), axis=-1).astype(dt)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")
    return jax.block_until_ready((x, y))


def jax_losses(kind: str) -> dict[str, Callable[[jax.Array, jax.Array], jax.Array]]:
    """The mean losses compared: ``{"jbce": f, "optax": f}``.

    optax has neither an NLL nor a softmax focal loss. For ``nll`` its peer is what an optax
    user has for it: ``softmax_cross_entropy_with_integer_labels`` of the log-probabilities
    (the same numbers, as their log-sum-exp is 0). For ``focal_soft`` it is the formula of
    Keras 3's ``CategoricalFocalCrossentropy(from_logits=True)`` in ``jax.numpy`` (without
    Keras' clipping), written on optax's ``log_softmax``.
    """
    import optax

    if kind == BINARY:
        return {
            "jbce": lambda x, y: jbce.sigmoid_binary_cross_entropy(x, y),
            "optax": lambda x, y: optax.losses.sigmoid_binary_cross_entropy(x, y).mean(),
        }
    if kind == SOFTMAX_INT:
        return {
            "jbce": lambda x, y: jbce.softmax_cross_entropy_with_integer_labels(x, y),
            "optax": lambda x, y: optax.losses.softmax_cross_entropy_with_integer_labels(
                x, y
            ).mean(),
        }
    if kind == SOFTMAX_SOFT:
        return {
            "jbce": lambda x, y: jbce.softmax_cross_entropy(x, y),
            "optax": lambda x, y: optax.losses.softmax_cross_entropy(x, y).mean(),
        }
    if kind == NLL:
        return {
            "jbce": lambda x, y: jbce.nll_loss(x, y),
            "optax": lambda x, y: optax.losses.softmax_cross_entropy_with_integer_labels(
                x, y
            ).mean(),
        }
    if kind == FOCAL_SOFT:
        return {
            "jbce": lambda x, y: jbce.softmax_focal_loss(x, y, gamma=2.0),
            "optax": lambda x, y: focal_formula(x, y, gamma=2.0),
        }
    raise ValueError(f"unknown shape kind {kind!r}")


def focal_formula(x, y, *, gamma):
    """Keras 3's categorical focal loss from logits, per example, averaged: the peer."""
    logp = jax.nn.log_softmax(_f32(x), axis=-1)
    return jnp.mean(jnp.sum(-_f32(y) * (1 - jnp.exp(logp)) ** gamma * logp, axis=-1))


def _f32(a):
    return a.astype(F32)


def floors(kind: str, mode: str) -> dict[str, Callable[[jax.Array, jax.Array], object]]:
    """Floor kernels for a case; the case's floor is the slowest of them.

    ``traffic`` reads what the loss must read (and for ``vag`` writes a fresh logits-sized
    gradient); ``exp`` (softmax) does the same and one ``exp`` per logit, ``softplus``
    (sigmoid BCE) one ``log1p(exp(-|x|))`` per element, accumulating in float32 as the
    losses do.
    """
    if kind == BINARY:
        # softplus: the one exp/log1p pair per element that any exact BCE evaluates
        # (log(1 + e^x) cannot be had with fewer transcendentals), over the same bytes.
        def softplus(x, y):
            return jnp.sum(jnp.log1p(jnp.exp(-jnp.abs(_f32(x)))) * _f32(y))

        if mode == "fwd":
            return {"traffic": lambda x, y: jnp.sum(_f32(x) * _f32(y)), "softplus": softplus}
        return {
            "traffic": lambda x, y: (jnp.sum(_f32(x) * _f32(y)), (x * y).astype(x.dtype)),
            "softplus": lambda x, y: (softplus(x, y), (x * y).astype(x.dtype)),
        }
    if kind == SOFTMAX_INT:
        if mode == "fwd":
            return {
                "traffic": lambda x, y: jnp.sum(_f32(x)),
                "exp": lambda x, y: jnp.sum(jnp.exp(_f32(x))),
            }
        return {
            "traffic": lambda x, y: (x * 2).astype(x.dtype),
            "exp": lambda x, y: jnp.exp(_f32(x)).astype(x.dtype),
        }
    if kind == SOFTMAX_SOFT:
        if mode == "fwd":
            return {
                "traffic": lambda x, y: jnp.sum(_f32(x) * _f32(y)),
                "exp": lambda x, y: jnp.sum(jnp.exp(_f32(x)) * _f32(y)),
            }
        return {
            "traffic": lambda x, y: (x - y).astype(x.dtype),
            "exp": lambda x, y: (jnp.exp(_f32(x)) - _f32(y)).astype(x.dtype),
        }
    if kind == NLL:  # reads one entry per row; its gradient is a fresh one-hot-sized array
        rows = lambda x, y: jnp.take_along_axis(_f32(x), y[:, None], axis=-1)
        if mode == "fwd":
            return {"traffic": lambda x, y: jnp.sum(rows(x, y))}
        return {"traffic": lambda x, y: (jnp.sum(rows(x, y)), jnp.zeros_like(x))}
    if kind == FOCAL_SOFT:
        return floors(SOFTMAX_SOFT, mode)
    raise ValueError(f"unknown shape kind {kind!r}")


def jitted(f: Callable, mode: str, donate: bool = False) -> Callable:
    """``jax.jit`` of ``f`` (``"fwd"``) or of its value_and_grad w.r.t. the logits."""
    g = f if mode == "fwd" else jax.value_and_grad(f)
    return jax.jit(g, donate_argnums=(0,) if donate else ())


def memory_stats(fn: Callable, *args) -> dict[str, int]:
    """XLA's ``compiled.memory_analysis()`` for ``fn(*args)`` (bytes)."""
    ma = fn.lower(*args).compile().memory_analysis()
    if ma is None:  # some backends do not report
        return {}
    return {
        "temp": int(ma.temp_size_in_bytes),
        "output": int(ma.output_size_in_bytes),
        "alias": int(ma.alias_size_in_bytes),
        "argument": int(ma.argument_size_in_bytes),
    }


# --- PyTorch peers ----------------------------------------------------------------------------


def torch_device() -> str | None:
    """The PyTorch device comparable to JAX's default device, or None (no torch / no match)."""
    try:
        import torch
    except ImportError:
        return None
    platform = jax.default_backend()
    if platform == "cpu":
        return "cpu"
    if platform == "gpu" and torch.cuda.is_available():
        return "cuda"
    return None


def cpu_threads() -> int:
    """Cores this process may use: XLA's CPU thread pool has one thread per core."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def torch_case(
    kind: str, mode: str, x: jax.Array, y: jax.Array, device: str
) -> tuple[Callable[[], object], Callable[[object], object]] | None:
    """``(fn, sync)`` running the PyTorch loss (``mean`` reduction) on copies of ``x, y``.

    ``BCEWithLogitsLoss`` / ``CrossEntropyLoss`` (integer or probability targets) /
    ``NLLLoss``; for ``"vag"`` the loss and ``torch.autograd.grad`` w.r.t. the logits. PyTorch
    has no softmax focal loss: ``None`` for ``focal_soft``.
    """
    if kind == FOCAL_SOFT:
        return None
    import torch
    import torch.nn.functional as F

    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[str(x.dtype)]

    def to_torch(a, dt):
        t = torch.from_numpy(np.array(a.astype(F32) if a.dtype != jnp.int32 else a))
        return t.to(device=device, dtype=dt)

    xt = to_torch(x, tdt)
    yt = to_torch(y, torch.long if kind in INTEGER_LABELS else tdt)
    loss = {BINARY: F.binary_cross_entropy_with_logits, NLL: F.nll_loss}.get(kind, F.cross_entropy)
    if mode == "fwd":

        def fn():
            with torch.no_grad():
                return loss(xt, yt)
    else:
        xt.requires_grad_(True)

        def fn():
            out = loss(xt, yt)
            (g,) = torch.autograd.grad(out, xt)
            return out.detach(), g

    if device == "cuda":
        return fn, lambda out: (torch.cuda.synchronize(), out)[1]
    return fn, lambda out: out
