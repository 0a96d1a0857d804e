"""Benchmarks of jbce against optax and PyTorch (``python -m bench --help``)."""
