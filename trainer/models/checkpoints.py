"""Load SiT weights from any checkpoint layout we meet: ours (training .pt or export), official REPA, bare."""
from __future__ import annotations

import argparse
import contextlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from common import UserError
from manifests import read_json, storage
from manifests.remote_inputs import localize

# The only non-tensor class that official REPA train.py pickles into its checkpoints: `"args": args`, an
# argparse.Namespace. Everything else in them is tensors, dicts, lists, numbers and strings, which
# torch.load(weights_only=True) accepts on its own. Nothing else is ever unpickled.
OFFICIAL_SAFE_GLOBALS = [argparse.Namespace]
LEGACY_PREFIX = "decoder_blocks."  # early REPA releases split `blocks` into encoder/decoder lists
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile add these to state-dict keys


def safe_torch_load(path: str | Path) -> Any:
    """torch.load(weights_only=True) with the official allowlist; any other pickled class is refused."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(OFFICIAL_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise UserError(f"checkpoint {path} is not a readable torch file (truncated or not a checkpoint?)") from e
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = m.group(1) if m else "object"
        raise UserError(f"checkpoint {path} contains a pickled {what} that is not allowed (only tensors, "
                        f"plain containers and argparse.Namespace are unpickled); refusing to load it") from e
    except FileNotFoundError as e:
        raise UserError(f"checkpoint not found: {path}") from e
    except IsADirectoryError as e:
        raise UserError(f"checkpoint {path} is a folder without checkpoints/ or export/ in it") from e
    except PermissionError as e:
        raise UserError(f"cannot read checkpoint {path}: permission denied") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"checkpoint {path} is not a readable torch file (truncated or not a checkpoint?): "
                        f"{first[:200]}") from e


def _strip_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def rename_legacy(sd: dict[str, torch.Tensor], encoder_depth: int | None, path: Path) -> dict[str, torch.Tensor]:
    """Legacy `decoder_blocks.N.*` -> `blocks.(N + encoder_depth).*` (REPA utils.load_legacy_checkpoints)."""
    if not any(k.startswith(LEGACY_PREFIX) for k in sd):
        return sd
    if encoder_depth is None:
        raise UserError(f"checkpoint {path} uses the legacy decoder_blocks layout: pass --encoder-depth")
    out = {}
    for k, v in sd.items():
        if k.startswith(LEGACY_PREFIX):
            idx, rest = k[len(LEGACY_PREFIX):].split(".", 1)
            k = f"blocks.{int(idx) + encoder_depth}.{rest}"
        out[k] = v
    return out


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _step_from_name(path: Path) -> int | None:
    m = re.search(r"(\d+)$", path.stem)
    return int(m.group(1)) if m else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A file as is; a run folder -> its newest export, else its newest training checkpoint."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    if p.is_dir():
        found = sorted((p / "export").glob("ema-*.safetensors")) or sorted((p / "checkpoints").glob("*.pt"))
        if not found:
            raise UserError(f"checkpoint {p} is a folder without checkpoints/*.pt or export/ema-*.safetensors")
        return found[-1]
    return p


def load_sit_weights(path: str | Path, *, encoder_depth: int | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                     dict[str, Any]]:
    """Return (SiT state dict, meta) from any supported checkpoint; meta has format, config, args, step, path.

    Formats: our training checkpoint (its `ema`), our export `ema-*.safetensors` (+ `config.json` beside it),
    an official REPA training dict (`ema`; `args` is an argparse.Namespace), or a bare state dict.
    """
    url = str(path) if storage.is_url(path) else None
    if url:  # s3://…/run or …/ema-0001000.safetensors: fetched once into a local cache
        path = localize(url, "checkpoint")
    path = resolve_checkpoint(path)
    meta: dict[str, Any] = {"path": str(path), "config": None, "args": None, "step": None, "url": url}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"checkpoint {path} is not a readable safetensors file: {e}") from e
        cfg_path = path.parent / "config.json"
        meta.update(format="ours-export", step=_step_from_name(path),
                    config=read_json(cfg_path, "export config") if cfg_path.exists() else None)
    else:
        obj = safe_torch_load(path)
        if _is_state_dict(obj):
            sd, meta["format"] = obj, "state-dict"
        elif isinstance(obj, dict) and ("ema" in obj or "model" in obj):
            key = "ema" if "ema" in obj else "model"
            sd = obj[key]
            if not _is_state_dict(sd):
                raise UserError(f"checkpoint {path}: '{key}' is not a state dict of tensors")
            if isinstance(obj.get("config"), dict):
                meta.update(format="ours-train", config=obj["config"], step=obj.get("step"))
            else:
                args = obj.get("args")
                meta.update(format="official-train", step=obj.get("steps", obj.get("step")),
                            args=dict(vars(args)) if isinstance(args, argparse.Namespace) else None)
            meta["weights"] = key
        else:
            have = ", ".join(sorted(map(str, obj))[:8]) if isinstance(obj, dict) else type(obj).__name__
            raise UserError(f"checkpoint {path} is not a SiT checkpoint (expected 'ema'/'model' or a state dict; "
                            f"found {have})")
    sd = _strip_wrappers(dict(sd))
    if encoder_depth is None:
        for src in (meta["args"] or {}, (meta["config"] or {}).get("model_kwargs", {})):
            with contextlib.suppress(TypeError, ValueError):
                if src.get("encoder_depth") is not None:
                    encoder_depth = int(src["encoder_depth"])
                    break
    meta["legacy"] = any(k.startswith(LEGACY_PREFIX) for k in sd)
    sd = rename_legacy(sd, encoder_depth, path)
    return sd, meta


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], *, path: str | Path,
                     what: str) -> None:
    """Strict key-and-shape comparison with a one-line error naming the first mismatch and the flag to fix."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    shapes = [k for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    if not (missing or extra or shapes):
        return
    if shapes:
        k = shapes[0]
        detail = (f"'{k}' has shape {list(sd[k].shape)} in the checkpoint but {list(want[k].shape)} in the model"
                  + (f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else ""))
        key = k
    elif missing:
        key = missing[0]
        detail = f"{len(missing)} key(s) missing from the checkpoint, e.g. '{key}'"
    else:
        key = extra[0]
        detail = f"{len(extra)} unexpected key(s) in the checkpoint, e.g. '{key}'"
    raise UserError(f"checkpoint {path} does not fit {what}: {detail} ({_hint(key)})")


def _hint(key: str) -> str:
    """Which flag most likely fixes a mismatch at this key."""
    if key.startswith("projectors."):
        return "check --projector-embed-dims"
    if key.startswith("y_embedder."):
        return "check --num-classes"
    if key.startswith("pos_embed") or key.startswith("x_embedder."):
        return "check --resolution and --model"
    if key.startswith("blocks."):
        return "check --model and --encoder-depth"
    return "check --model"
