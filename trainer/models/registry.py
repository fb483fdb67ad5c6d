"""The model families, and the one place a model name is looked up, resolved and built.

Adding a family: its file declares a `Family` (trainer/models/family.py); one line below registers it.
"""
from __future__ import annotations

from typing import Any

import torch

from common import UserError

from trainer.models.dit import DIT
from trainer.models.family import Family, StateDict
from trainer.models.mmdit import MMDIT
from trainer.models.sit import SIT

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family; its model names must be new (a name identifies one family everywhere)."""
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    taken = sorted(set(family.models) & set(model_names()))
    if taken:
        raise ValueError(f"model family {family.name!r} reuses the model names {taken}")
    FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove a family (tests register throwaway ones)."""
    FAMILIES.pop(name, None)


def model_names() -> list[str]:
    """Every registered model name, sorted (the --model choices)."""
    return sorted(n for f in FAMILIES.values() for n in f.models)


def objective_paths() -> list[str]:
    """Every family's `--path` values (the interpolant for SiT, the beta schedule for DiT), sorted."""
    return sorted({p for f in FAMILIES.values() for p in f.objective.paths})


def sampler_modes() -> list[str]:
    """Every family's sampler names (the `trainer sample --mode` choices), in registration order."""
    return list(dict.fromkeys(m for f in FAMILIES.values() for m in f.samplers))


def cfg_rules() -> list[str]:
    """Every family's `--cfg-channels` rules, "all" first."""
    return list(dict.fromkeys(r for f in FAMILIES.values() for r in f.cfg_channels))


def released_file(name: str) -> tuple[Family, dict[str, Any]] | None:
    """The family and record of a released checkpoint known by its file name (e.g. DiT-XL-2-256x256.pt)."""
    for family in FAMILIES.values():
        if name in family.released.files:
            return family, dict(family.released.files[name])
    return None


def released_names() -> list[str]:
    return sorted(n for f in FAMILIES.values() for n in f.released.files)


def family_for(name: str) -> Family:
    """The family of a model name; an unknown name is a user error listing the choices."""
    for family in FAMILIES.values():
        if name in family.models:
            return family
    raise UserError(f"unknown model '{name}' (--model); choose one of: {', '.join(model_names())}")


def recognise(sd: StateDict) -> Family | None:
    """The family whose released checkpoints look like this state dict, if exactly one claims it."""
    found = [f for f in FAMILIES.values() if f.released.recognises(sd)]
    return found[0] if len(found) == 1 else None


def resolve_kwargs(name: str, **kwargs: Any) -> dict[str, Any]:
    """Every constructor argument `name` builds with, given `kwargs` (ValueError as building would), no weights."""
    return family_for(name).models[name].resolve(**kwargs)


def build_model(name: str, device: torch.device | str = "cpu", **kwargs: Any) -> torch.nn.Module:
    """The registry entry `name` built with `kwargs` on `device` (ValueError/TypeError for impossible kwargs)."""
    entry = family_for(name).models[name]
    if torch.device(device).type == "cpu":  # a device context routes every init op through torch._refs, which
        return entry(**kwargs)  # imports torch._dynamo (~4 s of CPU per process)
    with torch.device(device):  # straight into accelerator memory (or meta: shapes only, no init cost)
        return entry(**kwargs)


register(SIT)  # one line per family
register(DIT)
register(MMDIT)
