"""Examples for jbce: logistic regression, a GAN and a small language model (Flax NNX, optax).

``python -m examples [--out DIR]`` runs them all with their default settings.
"""
