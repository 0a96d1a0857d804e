"""Softmax losses: the per-row statistics every one of them is built from, and the losses."""
