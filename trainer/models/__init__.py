"""Model families under the papers' names and the one checkpoint -> model loader: the public surface other stages
use (DESIGN §8 keeps `trainer.models.SiT_models` importable)."""
from trainer.models.checkpoints import (Checkpoint, Loaded, ModelRecord, check_state_dict, load_model,
                                        load_weights_into, read_checkpoint)
from trainer.models.family import Family, ModelSpec, Objective, Released, Sampler
from trainer.models.registry import (FAMILIES, build_model, family_for, model_names, recognise, register,
                                     resolve_kwargs, unregister)
from trainer.models.sit import SIT, SiT, SiT_models

__all__ = ["SiT", "SiT_models", "SIT", "FAMILIES", "Family", "ModelSpec", "Objective", "Released", "Sampler",
           "register", "unregister", "family_for", "model_names", "recognise", "resolve_kwargs", "build_model",
           "Checkpoint", "Loaded", "ModelRecord", "read_checkpoint", "load_model", "load_weights_into",
           "check_state_dict"]
