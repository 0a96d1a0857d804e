"""Binary cross-entropy losses (from logits, from probabilities, focal) and the GAN losses."""
