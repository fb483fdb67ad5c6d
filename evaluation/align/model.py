"""Load a checkpoint (ours or released) and read per-block hidden states of noisy latents via forward hooks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from common import check

import trainer.models as models
from trainer.models import ModelSpec, objective_paths  # noqa: F401 (the CLI's flags, re-exported)


@dataclass
class LoadedModel:
    """The model in eval mode plus what the report records about it."""
    model: torch.nn.Module
    name: str
    path: str  # the objective's path used to noise the inputs (SiT: linear or cosine; DiT: its linear schedule)
    depth: int
    step: int | None
    config: dict[str, Any] = field(default_factory=dict)


def load_model(ckpt: str, spec: ModelSpec, device: torch.device) -> LoadedModel:
    """Our checkpoint (training .pt or export + config.json) or a released file, through the trainer's one loader
    (the same defaults as sampling), strictly, in eval mode on `device`."""
    lm = models.load_model(ckpt, spec)
    return LoadedModel(model=lm.model.to(device), name=lm.name, path=lm.record.path, depth=len(lm.model.blocks),
                       step=lm.checkpoint.step, config=dict(lm.checkpoint.config or {}))


class _StopForward(Exception):
    """Raised by the last hook needed so the blocks after it and the final layer are not run."""


@torch.no_grad()
def hidden_states(lm: LoadedModel, moments: np.ndarray, labels: np.ndarray, *, layers: list[int], t: float,
                  scale: float, shift: float, batch_size: int, seed: int, device: torch.device,
                  null_label: bool = False, keep_tokens: int = 0,
                  ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Pooled (N, D) hidden states after each 1-based block in `layers`, and full tokens of the first images.

    Inputs: z = (mean + std·ε')·scale + shift from the stored moments, x_t = α(t)·z + σ(t)·ε by the family's
    objective on the model's path, and the model's time argument from t by the objective too (SiT: t itself;
    DiT: the DDPM timestep floor(t·1000), so t=0.5 is timestep 500); image i draws ε' and ε from its own generator
    (seed, i), so results do not depend on batch size.
    """
    objective = models.family_for(lm.name).objective
    noisy = objective.noisy
    model = lm.model
    n = len(moments)
    c = moments.shape[1] // 2
    check(c == model.in_channels, f"manifest field 'latent' holds {c}-channel moments, model expects "
                                  f"{model.in_channels} latent channels")
    check(moments.shape[2] == model.input_size,
          f"manifest field 'latent' is {moments.shape[2]}x{moments.shape[3]}, model expects input_size "
          f"{model.input_size} (a different resolution?)")
    if not null_label and len(labels):
        check(0 <= int(labels.min()) and int(labels.max()) < model.num_classes,
              f"manifest labels span [{int(labels.min())}, {int(labels.max())}] but the model has "
              f"{model.num_classes} classes (use --label null)")
    if null_label:
        check(model.y_embedder.embedding_table.num_embeddings > model.num_classes,
              "this checkpoint has no null class (trained without label dropout): pass --label real")
    pooled: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    tokens: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    last = max(layers)
    seen = [0]  # index of the current batch's first image: full tokens are kept for images < keep_tokens

    def hook_for(layer: int):
        def hook(_module, _inp, out):
            h = out.float()  # (B, T, D)
            pooled[layer].append(h.mean(dim=1).cpu())  # (B, D)
            take = max(0, min(keep_tokens - seen[0], h.shape[0]))
            if take:
                tokens[layer].append(h[:take].cpu())
            if layer == last:
                raise _StopForward
        return hook

    handles = [model.blocks[i - 1].register_forward_hook(hook_for(i)) for i in layers]
    try:
        for s in tqdm(range(0, n, batch_size), desc=f"hidden states t={t}", unit="batch"):
            mom = torch.from_numpy(moments[s:s + batch_size])  # (B, 2C, H, W)
            eps_post, eps = [], []
            for i in range(s, s + len(mom)):
                g = torch.Generator().manual_seed(seed * 1_000_003 + i)
                eps_post.append(torch.randn(mom.shape[1] // 2, *mom.shape[2:], generator=g))
                eps.append(torch.randn(mom.shape[1] // 2, *mom.shape[2:], generator=g))
            z = (mom[:, :c] + mom[:, c:] * torch.stack(eps_post)) * scale + shift  # (B, C, H, W)
            x_t = noisy(z, float(t), torch.stack(eps), lm.path).to(device)  # (B, C, H, W)
            y = torch.from_numpy(labels[s:s + len(mom)]).to(device)
            if null_label:
                y = torch.full_like(y, model.num_classes)  # the unconditional (null) class
            tt = objective.model_time(torch.full((len(mom),), float(t))).to(device)  # (B,)
            seen[0] = s
            try:
                model(x_t, tt, y)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    out_pooled = {i: torch.cat(v).numpy() for i, v in pooled.items()}
    out_tokens = {i: torch.cat(v).numpy() if v else np.zeros((0,), np.float32) for i, v in tokens.items()}
    return out_pooled, out_tokens
