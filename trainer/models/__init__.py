"""Model families under the papers' names and the one checkpoint -> model loader: the public surface other stages
use (DESIGN §8 keeps `trainer.models.SiT_models`, `DiT_models` and `MMDiT_models` importable)."""
from trainer.models.checkpoints import (Checkpoint, Loaded, ModelRecord, check_state_dict, load_model,
                                        load_weights_into, read_checkpoint)
from trainer.models.family import Family, ModelSpec, Objective, Released, Sampler
from trainer.models.dit import DIT, DiT, DiT_models
from trainer.models.mmdit import MMDIT, MMDiT, MMDiT_models
from trainer.models.registry import (FAMILIES, build_model, cfg_rules, family_for, model_names, objective_paths,
                                     recognise, register, released_file, released_names, resolve_kwargs,
                                     sampler_modes, unregister)
from trainer.models.sit import SIT, SiT, SiT_models

__all__ = ["SiT", "SiT_models", "SIT", "DiT", "DiT_models", "DIT", "MMDiT", "MMDiT_models", "MMDIT", "FAMILIES",
           "objective_paths", "sampler_modes",
           "cfg_rules", "released_file", "released_names", "Family", "ModelSpec", "Objective", "Released", "Sampler",
           "register", "unregister", "family_for", "model_names", "recognise", "resolve_kwargs", "build_model",
           "Checkpoint", "Loaded", "ModelRecord", "read_checkpoint", "load_model", "load_weights_into",
           "check_state_dict"]
