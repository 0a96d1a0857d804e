"""Pure training steps and the training loop shared by the examples.

A training *state* is the NNX state of ``(model, optimizer)`` (or of several of them) and a step
is a pure function ``train_step(state, batch) -> (state, metrics)``: it merges the graph
definition with the state, updates, and splits again, so it can be ``jax.jit``-ed and
``jax.lax.scan``-ed. The loop runs ``chunk`` steps per compiled call and shows a tqdm progress
bar with the running losses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree
from tqdm.auto import tqdm

from examples._data import batches

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Step = Callable[[Any, Batch], tuple[Any, Metrics]]


def supervised_step(
    graphdef: nnx.GraphDef, loss_fn: Callable[[nnx.Module, Batch], jax.Array]
) -> Step:
    """A pure step of ``(model, optimizer)`` minimising ``loss_fn(model, batch)``."""

    def train_step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), {"loss": loss}

    return train_step


def distill_step(
    graphdef: nnx.GraphDef,
    loss_fn: Callable[[nnx.Module, nnx.Module, Batch], jax.Array],
) -> Step:
    """A pure step on the state of ``(student, optimizer, teacher)``; only the student learns.

    ``loss_fn(student, teacher, batch)`` is differentiated with respect to the student alone;
    the teacher rides along in the state unchanged (a jit argument, not a baked-in constant).
    """

    def train_step(state, batch):
        student, optimizer, teacher = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(student, teacher, batch)
        optimizer.update(student, grads)
        return nnx.state((student, optimizer, teacher)), {"loss": loss}

    return train_step


def newton_step(graphdef: nnx.GraphDef, loss_fn: Callable[[nnx.Module, Batch], jax.Array]):
    """A pure Newton step ``(params, batch) -> (params, metrics)`` on a model's parameters.

    The Hessian is reverse-over-reverse (``jax.jacrev`` of ``jax.grad``), so it differentiates
    through the loss's own gradient rule a second time; forward mode (``jax.hessian``'s default
    ``jacfwd``) is not used because a ``custom_vjp`` has no JVP.
    """

    def train_step(params, batch):
        flat, unravel = ravel_pytree(params)

        def flat_loss(w):
            return loss_fn(nnx.merge(graphdef, unravel(w)), batch)

        loss, grad = jax.value_and_grad(flat_loss)(flat)
        hess = jax.jacrev(jax.grad(flat_loss))(flat)
        new = flat - jnp.linalg.solve(hess, grad)
        return unravel(new), {"loss": loss, "grad_norm": jnp.linalg.norm(grad)}

    return train_step


def fit(
    train_step: Step,
    state,
    data: dict[str, np.ndarray],
    *,
    steps: int,
    batch_size: int,
    seed: int,
    desc: str,
    chunk: int = 50,
    progress: bool = True,
    on_chunk: Callable[[Any, int], dict[str, float] | None] | None = None,
) -> tuple[Any, dict[str, np.ndarray]]:
    """Runs ``steps`` minibatch steps of ``train_step`` and returns the state and per-step metrics.

    Each batch is ``{name: data[name][indices], "step": step_number}``; the indices come from
    :func:`examples._data.batches`, so a run is deterministic for a given ``seed``.
    ``on_chunk(state, steps_done)``, if given, runs after every ``chunk`` steps (an evaluation,
    say); the numbers it returns are shown on the progress bar.
    """
    arrays = {k: jnp.asarray(v) for k, v in data.items()}
    n = len(next(iter(data.values())))

    @jax.jit
    def run_chunk(state, arrays, idx, step_ids):
        def body(state, xs):
            idx, step = xs
            batch = {k: v[idx] for k, v in arrays.items()}
            batch["step"] = step
            return train_step(state, batch)

        return jax.lax.scan(body, state, (idx, step_ids))

    index_stream = batches(n, batch_size, steps, seed)
    history: dict[str, list[np.ndarray]] = {}
    with tqdm(total=steps, desc=desc, disable=not progress, leave=True) as bar:
        done = 0
        while done < steps:
            size = min(chunk, steps - done)
            idx = np.stack([next(index_stream) for _ in range(size)])
            step_ids = np.arange(done, done + size, dtype=np.int32)
            state, metrics = run_chunk(state, arrays, idx, step_ids)
            for k, v in metrics.items():
                history.setdefault(k, []).append(np.asarray(v))
            done += size
            bar.update(size)
            postfix = {k: f"{float(np.mean(v[-1])):.4f}" for k, v in history.items()}
            extra = on_chunk(state, done) if on_chunk is not None else None
            postfix.update({k: f"{v:.4f}" for k, v in (extra or {}).items()})
            bar.set_postfix(postfix)
    return state, {k: np.concatenate(v) for k, v in history.items()}


def predict(
    model_fn: Callable[[jax.Array], jax.Array], x: np.ndarray, batch: int = 4096
) -> np.ndarray:
    """Applies a jitted ``model_fn`` to ``x`` in batches and returns a NumPy array."""
    fn = jax.jit(model_fn)
    return np.concatenate(
        [np.asarray(fn(jnp.asarray(x[i : i + batch]))) for i in range(0, len(x), batch)]
    )


def ema(values: Iterable[float], decay: float = 0.98) -> np.ndarray:
    """Exponential moving average of a loss curve, for plotting noisy minibatch losses."""
    out, acc = [], None
    for v in values:
        acc = v if acc is None else decay * acc + (1 - decay) * v
        out.append(acc)
    return np.asarray(out)


def gan_step(
    graphdef: nnx.GraphDef,
    key: jax.Array,
    d_loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
    g_loss_fn: Callable[[jax.Array], jax.Array],
    ema_decay: float = 0.999,
) -> Step:
    """A pure GAN step on the state of ``(generator, discriminator, g_opt, d_opt, generator_ema)``.

    One discriminator update on a real batch and a fresh fake batch, then one generator update
    on another fresh fake batch against the updated discriminator. The latent noise is drawn
    from ``fold_in(key, batch["step"])``, so a run is a deterministic function of ``key``.
    ``d_loss_fn(real_logits, fake_logits)`` and ``g_loss_fn(fake_logits)`` give the losses.
    ``generator_ema`` tracks an exponential moving average of the generator's parameters
    (Polyak averaging), which gives cleaner samples than the last iterate of the game.
    """

    def train_step(state, batch):
        gen, disc, g_opt, d_opt, gen_ema = nnx.merge(graphdef, state)
        real = batch["x"]
        k_d, k_g = jax.random.split(jax.random.fold_in(key, batch["step"]))
        z_d = jax.random.normal(k_d, (real.shape[0], gen.latent))
        z_g = jax.random.normal(k_g, (real.shape[0], gen.latent))

        fake = jax.lax.stop_gradient(gen(z_d))
        d_loss, d_grads = nnx.value_and_grad(lambda d: d_loss_fn(d(real), d(fake)))(disc)
        d_opt.update(disc, d_grads)

        g_loss, g_grads = nnx.value_and_grad(lambda g, d: g_loss_fn(d(g(z_g))), argnums=0)(
            gen, disc
        )
        g_opt.update(gen, g_grads)

        averaged = jax.tree.map(
            lambda e, p: ema_decay * e + (1 - ema_decay) * p,
            nnx.state(gen_ema, nnx.Param),
            nnx.state(gen, nnx.Param),
        )
        nnx.update(gen_ema, averaged)
        state = nnx.state((gen, disc, g_opt, d_opt, gen_ema))
        return state, {"d_loss": d_loss, "g_loss": g_loss}

    return train_step
