"""Flax NNX models for the examples: linear classifiers, an MLP, and a small MLP GAN."""

from __future__ import annotations

import jax
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
