"""Fused linear losses: the logits of ``hidden @ weight + bias`` only ever exist as tiles."""
