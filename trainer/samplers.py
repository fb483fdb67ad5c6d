"""Public sampler entry points (DESIGN §8); they live in `trainer/sampling/samplers.py` (SiT: SDE, ODE) and
`trainer/sampling/ddpm.py` (DiT: DDPM, DDIM)."""
from trainer.sampling.ddpm import sample_ddim, sample_ddpm
from trainer.sampling.samplers import sample_ode, sample_sde

__all__ = ["sample_ode", "sample_sde", "sample_ddpm", "sample_ddim"]
