"""Lean SiT + REPA trainer: models, transport, data, training loop, checkpoints (and the sampler)."""
