"""Flax NNX models for the examples: linear classifiers, MLPs, a small GAN and a transformer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
    """Logistic regression: one affine layer producing logits (``out=1`` squeezes to (n,))."""

    def __init__(self, features: int, out: int, *, rngs: nnx.Rngs):
        self.out = out
        self.dense = nnx.Linear(features, out, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        logits = self.dense(x)
        return logits[:, 0] if self.out == 1 else logits


class MLP(nnx.Module):
    """A multilayer perceptron: Dense → activation for each hidden width, then a Dense head."""

    def __init__(self, sizes: list[int], *, rngs: nnx.Rngs, activation=nnx.relu, dropout=0.0):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.activation = activation
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
            if self.dropout is not None:
                x = self.dropout(x)
        return self.layers[-1](x)


def leaky_relu(x: jax.Array) -> jax.Array:
    return nnx.leaky_relu(x, 0.2)


class Generator(nnx.Module):
    """Maps latent noise z ~ N(0, I) to images with pixels in (0, 1)."""

    def __init__(self, latent: int, hidden: int, pixels: int, *, rngs: nnx.Rngs):
        self.latent = latent
        self.net = MLP([latent, hidden, hidden, pixels], rngs=rngs, activation=leaky_relu)

    def __call__(self, z: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(self.net(z))


class Discriminator(nnx.Module):
    """Maps images to one real-vs-fake logit each, shape (n,)."""

    def __init__(self, pixels: int, hidden: int, *, rngs: nnx.Rngs, dropout: float = 0.0):
        self.net = MLP(
            [pixels, hidden, hidden, 1], rngs=rngs, activation=leaky_relu, dropout=dropout
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net(x)[:, 0]


# --------------------------------------------------------------------------------------------
# A small decoder-only transformer (GPT-2 layout: learned positions, pre-norm blocks).
# --------------------------------------------------------------------------------------------


class CausalSelfAttention(nnx.Module):
    """Multi-head self-attention in which token ``t`` only attends to tokens ``<= t``."""

    def __init__(self, d_model: int, heads: int, *, layers: int, rngs: nnx.Rngs):
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        self.heads = heads
        init = nnx.initializers.normal(0.02)
        # GPT-2's scaled init: each residual branch's output projection gets 0.02 / sqrt(2 L).
        out_init = nnx.initializers.normal(0.02 / (2 * layers) ** 0.5)
        self.qkv = nnx.Linear(d_model, 3 * d_model, kernel_init=init, rngs=rngs)
        self.out = nnx.Linear(d_model, d_model, kernel_init=out_init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * self.heads, d // self.heads), 3, axis=2)
        return self.out(jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d))


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, d_model: int, heads: int, *, layers: int, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        out_init = nnx.initializers.normal(0.02 / (2 * layers) ** 0.5)
        self.norm1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = CausalSelfAttention(d_model, heads, layers=layers, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.up = nnx.Linear(d_model, 4 * d_model, kernel_init=init, rngs=rngs)
        self.down = nnx.Linear(4 * d_model, d_model, kernel_init=out_init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class TransformerLM(nnx.Module):
    """A decoder-only language model whose head is a bias-free ``[d_model, vocab]`` kernel.

    ``hidden(tokens)`` gives the final (normed) hidden states ``[batch, time, d_model]``: the
    training loss multiplies them by ``head.kernel`` inside ``jbce.linear_softmax_cross_entropy``
    so the ``[batch * time, vocab]`` logits never exist. ``__call__`` returns those logits, for
    sampling a few positions.
    """

    def __init__(
        self, vocab: int, *, d_model: int, heads: int, layers: int, context: int, rngs: nnx.Rngs
    ):
        init = nnx.initializers.normal(0.02)
        self.context = context
        self.embed = nnx.Embed(vocab, d_model, embedding_init=init, rngs=rngs)
        self.positions = nnx.Param(init(rngs.params(), (context, d_model)))
        self.blocks = nnx.List(
            [Block(d_model, heads, layers=layers, rngs=rngs) for _ in range(layers)]
        )
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, vocab, use_bias=False, kernel_init=init, rngs=rngs)

    def hidden(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens) + self.positions[: tokens.shape[-1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.head(self.hidden(tokens))
