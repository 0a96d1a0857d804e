"""Contrastive losses over the similarity matrix of two embedding batches (CLIP, SigLIP)."""
