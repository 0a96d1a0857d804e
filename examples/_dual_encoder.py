"""A small dual encoder (Flax NNX) and its pure contrastive training steps.

Both towers embed word pieces with one shared table and pool them with a learned weight per
word piece (a soft IDF); each tower then has its own MLP, and the output is a unit vector. The
logit scale ``exp(t)`` and SigLIP's bias ``b`` are parameters of the model, initialised as
open_clip (``t = log(1/0.07)``, the scale clamped at 100) and big_vision (``t = log 10``,
``b = -10``) do.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

import jbce
from examples._models import MLP


class Tower(nnx.Module):
    def __init__(self, embed: nnx.Embed, weight: nnx.Embed, dim: int, *, rngs: nnx.Rngs):
        self.embed, self.weight = embed, weight
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp = MLP([dim, 2 * dim, dim], rngs=rngs, activation=nnx.gelu)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        w = jax.nn.softplus(self.weight(tokens)[..., 0]) * (tokens != 0)  # padding weighs 0
        pooled = jnp.einsum("bl,bld->bd", w, self.embed(tokens)) / (jnp.sum(w, -1)[:, None] + 1e-6)
        h = self.norm(pooled)
        h = h + self.mlp(h)
        return h / jnp.linalg.norm(h, axis=-1, keepdims=True)


class DualEncoder(nnx.Module):
    """``(query tokens, document tokens) -> (unit query, unit document embeddings)``."""

    def __init__(self, vocab: int, dim: int, loss: str, *, rngs: nnx.Rngs):
        embed = nnx.Embed(vocab, dim, rngs=rngs)
        weight = nnx.Embed(vocab, 1, embedding_init=nnx.initializers.zeros, rngs=rngs)
        self.query = Tower(embed, weight, dim, rngs=rngs)
        self.document = Tower(embed, weight, dim, rngs=rngs)
        t0 = math.log(1 / 0.07) if loss == "clip" else math.log(10.0)
        self.t = nnx.Param(jnp.asarray(t0, jnp.float32))
        self.b = nnx.Param(jnp.asarray(-10.0, jnp.float32))

    def __call__(self, queries: jax.Array, documents: jax.Array):
        return self.query(queries), self.document(documents)

    def scale(self, loss: str) -> jax.Array:
        t = self.t[...]
        return jnp.exp(jnp.minimum(t, math.log(100.0)) if loss == "clip" else t)


def contrastive_loss(loss: str, *, mesh=None):
    """``loss_fn(model, batch)``: jbce's CLIP or SigLIP loss of a batch of pairs.

    With a ``mesh``, the embeddings are split over its ``"data"`` axis and the loss runs inside
    ``shard_map`` with ``batch_axis_name="data"``: each device holds its share of the batch,
    the other devices' document embeddings come around the ring, and the loss (and its
    gradient, taken through the ``shard_map``) is the whole batch's.
    """

    def of_embeddings(q, d, ids, scale, bias, axis=None):
        if loss == "clip":
            return jbce.clip_loss(q, d, scale=scale, ids=ids, batch_axis_name=axis)
        return jbce.siglip_loss(q, d, scale=scale, bias=bias, ids=ids, batch_axis_name=axis)

    if mesh is not None:
        rows = P("data")
        of_embeddings = jax.shard_map(
            functools.partial(of_embeddings, axis="data"),
            mesh=mesh, in_specs=(rows, rows, rows, P(), P()), out_specs=P(),
        )  # fmt: skip

    def loss_fn(model: DualEncoder, batch) -> jax.Array:
        q, d = model(batch["queries"], batch["documents"])
        return of_embeddings(q, d, batch["ids"], model.scale(loss), model.b[...])

    return loss_fn
