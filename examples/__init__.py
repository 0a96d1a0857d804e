"""Examples for jbce: logistic regression and a GAN, trained with Flax NNX and optax.

``python -m examples [--out DIR]`` runs both with their default settings.
"""
