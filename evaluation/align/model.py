"""Load a SiT checkpoint (ours or official) and read per-block hidden states of noisy latents via forward hooks."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from common import UserError, check

OFFICIAL_MODEL = "SiT-XL/2"  # REPA generate.py / train.py --model default
OFFICIAL_ENCODER_DEPTH = 8  # REPA train.py --encoder-depth default
OFFICIAL_CLASS_DROPOUT = 0.1  # SiT/REPA class_dropout_prob: the label table holds one extra (null) row


@dataclass(kw_only=True)
class ModelSpec:
    """How to build the model when the checkpoint carries no config.json (official files); flags override."""
    model: str | None = None
    encoder_depth: int | None = None
    projector_embed_dims: list[int] | None = None
    path: str | None = None
    weights: str = "ema"  # "model": the raw weights of a training checkpoint instead of its EMA


@dataclass
class LoadedModel:
    """The model in eval mode plus what the report records about it."""
    model: torch.nn.Module
    name: str
    path: str  # interpolant: linear or cosine
    depth: int
    step: int | None
    config: dict[str, Any] = field(default_factory=dict)


def _infer_kwargs(sd: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, Any]:
    """Official kwargs from the state-dict shapes (what an official file cannot tell: encoder depth)."""
    try:
        tokens, hidden = sd["pos_embed"].shape[1:]
        _, in_ch, patch, _ = sd["x_embedder.proj.weight"].shape
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"checkpoint has no {e.args[0]!r}: not a SiT state dict") from e
    grid = int(round(tokens ** 0.5))
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    # The projectors' block only places zs, which this analysis ignores, so an unknown depth is harmless.
    enc_depth = spec.encoder_depth or min(OFFICIAL_ENCODER_DEPTH, max(depth, 1))
    projs = sorted({int(m.group(1)) for k in sd if (m := re.match(r"projectors\.(\d+)\.4\.weight$", k))})
    z_dims = spec.projector_embed_dims or [int(sd[f"projectors.{i}.4.weight"].shape[0]) for i in projs]
    kw: dict[str, Any] = dict(input_size=grid * patch, in_channels=in_ch, num_classes=rows - 1,
                              class_dropout_prob=OFFICIAL_CLASS_DROPOUT, z_dims=z_dims,
                              encoder_depth=enc_depth)
    if projs:
        kw["projector_dim"] = int(sd["projectors.0.0.weight"].shape[0])
    return kw


def _build(name: str, kwargs: dict[str, Any], ckpt: str, device: str) -> torch.nn.Module:
    from trainer.models.sit import SiT_models
    try:
        with torch.device(device):
            return SiT_models[name](**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build {name} for checkpoint {ckpt}: {e} (check --model/--encoder-depth)") from e


def _detect_model(sd: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> str:
    """The registry entry whose parameter shapes match a config-less state dict (SiT-XL/2 first), else SiT-XL/2."""
    from trainer.models.sit import SiT_models
    for name in [OFFICIAL_MODEL] + sorted(n for n in SiT_models if n != OFFICIAL_MODEL):
        try:
            with torch.device("meta"):
                want = SiT_models[name](**kwargs).state_dict()
        except (TypeError, ValueError):
            continue
        if want.keys() == sd.keys() and all(tuple(want[k].shape) == tuple(sd[k].shape) for k in want):
            return name
    return OFFICIAL_MODEL


def _raw_weights(meta: dict[str, Any], encoder_depth: int | None) -> dict[str, torch.Tensor]:
    """The non-EMA `model` state dict of a training checkpoint (ours or official)."""
    from trainer.models.checkpoints import rename_legacy, safe_torch_load
    path = meta["path"]
    check(meta.get("format") in ("ours-train", "official-train"),
          f"--weights model needs a training checkpoint with a 'model' entry; {path} is {meta.get('format')}")
    obj = safe_torch_load(path)
    sd = obj.get("model")
    check(isinstance(sd, dict) and bool(sd), f"checkpoint {path} has no 'model' state dict")
    if meta.get("args") and encoder_depth is None:
        encoder_depth = meta["args"].get("encoder_depth")
    return rename_legacy(dict(sd), encoder_depth, path)


def load_model(ckpt: str, spec: ModelSpec, device: torch.device) -> LoadedModel:
    """Load ours (training checkpoint or export + config.json) or an official REPA file, strictly, in eval mode."""
    from trainer.models.sit import SiT_models
    from trainer.models.checkpoints import check_state_dict, load_sit_weights
    sd, meta = load_sit_weights(ckpt, encoder_depth=spec.encoder_depth)
    if spec.weights == "model":
        sd = _raw_weights(meta, spec.encoder_depth)
    cfg = dict(meta.get("config") or {})
    args = dict(meta.get("args") or {})  # an official training dict's argparse options
    if cfg.get("model") and spec.model in (None, cfg["model"]):
        name, kwargs = cfg["model"], dict(cfg.get("model_kwargs", {}))
        if spec.encoder_depth is not None:
            kwargs["encoder_depth"] = spec.encoder_depth
        if spec.projector_embed_dims is not None:
            kwargs["z_dims"] = spec.projector_embed_dims
        path = spec.path or cfg.get("path") or "linear"
    else:
        if spec.encoder_depth is None and args.get("encoder_depth") is not None:
            spec = ModelSpec(**{**spec.__dict__, "encoder_depth": int(args["encoder_depth"])})
        kwargs = _infer_kwargs(sd, spec)
        name = spec.model or args.get("model") or _detect_model(sd, kwargs)
        path = spec.path or args.get("path_type") or "linear"
    check(name in SiT_models, f"--model {name!r} is unknown; choose one of {', '.join(sorted(SiT_models))}")
    check_state_dict(_build(name, kwargs, ckpt, "meta"), sd, path=ckpt, what=name)  # shapes first: no big init
    model = _build(name, kwargs, ckpt, "cpu")
    model.load_state_dict(sd, strict=True)
    model.eval().to(device)
    check(path in ("linear", "cosine"), f"checkpoint {ckpt} names an unknown path {path!r} (use --path)")
    return LoadedModel(model=model, name=name, path=path, depth=len(model.blocks), step=meta.get("step"),
                       config=cfg)


class _StopForward(Exception):
    """Raised by the last hook needed so the blocks after it and the final layer are not run."""


@torch.no_grad()
def hidden_states(lm: LoadedModel, moments: np.ndarray, labels: np.ndarray, *, layers: list[int], t: float,
                  scale: float, shift: float, batch_size: int, seed: int, device: torch.device,
                  null_label: bool = False, keep_tokens: int = 0,
                  ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Pooled (N, D) hidden states after each 1-based block in `layers`, and full tokens of the first images.

    Inputs: z = (mean + std·ε')·scale + shift from the stored moments, x_t = α(t)·z + σ(t)·ε on the model's
    path; image i draws ε' and ε from its own generator (seed, i), so results do not depend on batch size.
    """
    from trainer.objectives.interpolant import alpha_sigma
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
    alpha, sigma, _, _ = alpha_sigma(torch.tensor(float(t), dtype=torch.float64), lm.path)
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
            x_t = (float(alpha) * z + float(sigma) * torch.stack(eps)).to(device)  # (B, C, H, W)
            y = torch.from_numpy(labels[s:s + len(mom)]).to(device)
            if null_label:
                y = torch.full_like(y, model.num_classes)  # the unconditional (null) class
            tt = torch.full((len(mom),), float(t), device=device)
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
