"""Public sampler entry points (DESIGN §8); they live in `trainer/sampling/samplers.py`."""
from trainer.sampling.samplers import sample_ode, sample_sde

__all__ = ["sample_ode", "sample_sde"]
