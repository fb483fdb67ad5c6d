"""Lean REPA trainer: model families, objectives, data, the training loop and sampling."""
