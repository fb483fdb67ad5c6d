"""Checkpoint -> model + config, for every layout: ours (training .pt, export .safetensors + config.json, a run
folder) and released ones (REPA's training dict with `ema` and Namespace `args`, a bare state dict).

`read_checkpoint` reads a file into a `Checkpoint` (weights plus what the file records); `load_model` builds the
model that record (or, for a released file, its family's defaults) describes and loads it strictly;
`load_weights_into` fills a model the caller built (--init-from). Sampling, the alignment analysis, --init-from and
the training grids all read a config through `ModelRecord`, so the defaults are the same everywhere.
"""
from __future__ import annotations

import argparse
import contextlib
import pickle
import re
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from common import UserError
from manifests import SD_VAE_SCALE, SD_VAE_SHIFT, read_json, storage
from manifests.remote_inputs import localize
from manifests.runs import CKPT_DIR, CONFIG_NAME, EXPORT_DIR

from trainer.models.family import DEFAULT_VAE, LATENT_DOWNSAMPLE, Family, ModelSpec, StateDict
from trainer.models.registry import FAMILIES, build_model, family_for, recognise, released_file, released_names

# The only non-tensor class that official REPA train.py pickles into its checkpoints: `"args": args`, an
# argparse.Namespace. Everything else in them is tensors, dicts, lists, numbers and strings, which
# torch.load(weights_only=True) accepts on its own. Nothing else is ever unpickled.
OFFICIAL_SAFE_GLOBALS = [argparse.Namespace]
LEGACY_PREFIX = "decoder_blocks."  # early REPA releases split `blocks` into encoder/decoder lists
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile add these to state-dict keys
TRAINING_FORMATS = ("ours-train", "official-train")


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
        found = sorted((p / EXPORT_DIR).glob("ema-*.safetensors")) or sorted((p / CKPT_DIR).glob("*.pt"))
        if not found:
            raise UserError(f"checkpoint {p} is a folder without {CKPT_DIR}/*.pt or {EXPORT_DIR}/ema-*.safetensors")
        return found[-1]
    return p


# ---- released files by name ---------------------------------------------------------------------------------------

def released_dirs() -> list[Path]:
    """Where a released file given by name is looked for: torch hub's checkpoint cache ($TORCH_HOME/hub/checkpoints,
    where the Inception weights live too), then ./pretrained_models (where DiT's download.py puts them)."""
    return [Path(torch.hub.get_dir()) / "checkpoints", Path("pretrained_models")]


def locate(ckpt: str | Path) -> tuple[str | Path, str | None]:
    """`--ckpt` -> (the file or run folder to read, the released name it is known by, if any).

    `NAME=PATH` reads PATH as the released file NAME; a bare NAME that is not a path here is looked up in
    `released_dirs()`; a path whose file name is a released name is known by it. Nothing is downloaded.
    """
    text = str(ckpt)
    name, eq, where = text.partition("=")
    if eq and not storage.is_url(text) and "/" not in name and not Path(text).exists():
        if released_file(name) is None:
            raise UserError(f"--ckpt {text}: {name!r} is not a released checkpoint name (NAME=PATH takes one of: "
                            f"{', '.join(released_names())})")
        return where, name
    if storage.is_url(text) or Path(text).exists():
        base = text.rstrip("/").rsplit("/", 1)[-1]
        return ckpt, base if released_file(base) else None
    found = released_file(text)
    if found is None:
        return ckpt, None  # read_checkpoint reports the missing file
    for folder in released_dirs():
        if (folder / text).is_file():
            return folder / text, text
    raise UserError(f"released checkpoint {text} not found in {' or '.join(str(d) for d in released_dirs())}; "
                    f"download {found[1]['url']} into one of them, or pass --ckpt {text}=PATH")


# ---- reading a file ----------------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """What one checkpoint file holds, before any model is built."""
    weights: StateDict  # wrapper prefixes stripped, legacy keys renamed
    format: str  # ours-train | ours-export | official-train | state-dict
    path: Path  # the local file read
    url: str | None = None  # the s3:// location it was fetched from
    step: int | None = None
    config: dict[str, Any] | None = None  # ours: the run's config.json
    args: dict[str, Any] | None = None  # an official training dict's argparse options
    entry: str | None = None  # "ema" or "model": which weights of a training dict
    legacy: bool = False  # had the decoder_blocks layout
    released: str | None = None  # the released file name it is known by (e.g. DiT-XL-2-256x256.pt)


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is not a readable safetensors file: {e}") from e
    cfg_path = path.parent / CONFIG_NAME
    return Checkpoint(weights=sd, format="ours-export", path=path, step=_step_from_name(path),
                      config=read_json(cfg_path, "export config") if cfg_path.exists() else None)


def _read_torch(path: Path, weights: str) -> Checkpoint:
    obj = safe_torch_load(path)
    if _is_state_dict(obj):
        c = Checkpoint(weights=obj, format="state-dict", path=path)
    elif isinstance(obj, dict) and ("ema" in obj or "model" in obj):
        key = "model" if weights == "model" else "ema" if "ema" in obj else "model"
        if key not in obj:
            raise UserError(f"checkpoint {path} has no {key!r} state dict")
        if not _is_state_dict(obj[key]):
            raise UserError(f"checkpoint {path}: '{key}' is not a state dict of tensors")
        if isinstance(obj.get("config"), dict):
            c = Checkpoint(weights=obj[key], format="ours-train", path=path, step=obj.get("step"),
                           config=obj["config"], entry=key)
        else:
            args = obj.get("args")
            c = Checkpoint(weights=obj[key], format="official-train", path=path, entry=key,
                           step=obj.get("steps", obj.get("step")),
                           args=dict(vars(args)) if isinstance(args, argparse.Namespace) else None)
    else:
        have = ", ".join(sorted(map(str, obj))[:8]) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"checkpoint {path} is not a model checkpoint (expected 'ema'/'model' or a state dict; "
                        f"found {have})")
    return c


def read_checkpoint(path: str | Path, *, weights: str = "ema", encoder_depth: int | None = None) -> Checkpoint:
    """Read any supported checkpoint (a file, a run folder or an s3:// location of either).

    `weights="model"` takes a training checkpoint's raw weights instead of its EMA. `encoder_depth` renames the
    legacy decoder_blocks layout; without it the file's own options or config say it.
    """
    path, released = locate(path)
    url = str(path) if storage.is_url(path) else None
    if url:  # s3://…/run or …/ema-0001000.safetensors: fetched once into a local cache
        path = localize(url, "checkpoint")
    path = resolve_checkpoint(path)
    c = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path, weights)
    if weights == "model" and c.format not in TRAINING_FORMATS:
        raise UserError(f"--weights model needs a training checkpoint with a 'model' entry; {path} is {c.format}")
    c.url, c.released = url, released
    sd = _strip_wrappers(dict(c.weights))
    if encoder_depth is None:
        for src in (c.args or {}, (c.config or {}).get("model_kwargs", {})):
            with contextlib.suppress(TypeError, ValueError):
                if src.get("encoder_depth") is not None:
                    encoder_depth = int(src["encoder_depth"])
                    break
    c.legacy = any(k.startswith(LEGACY_PREFIX) for k in sd)
    c.weights = rename_legacy(sd, encoder_depth, path)
    return c


def _resolution(model_kwargs: dict[str, Any]) -> int:
    """Image side of a model's latent input (configs older than the `resolution` key)."""
    return int(model_kwargs.get("input_size", 32)) * LATENT_DOWNSAMPLE


# ---- what a config says ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelRecord:
    """What a run's config.json says about its model and latents, with the released defaults for what it omits."""
    model: str
    model_kwargs: dict[str, Any]
    path: str  # the objective's path (SiT: linear or cosine)
    vae: str
    latent_scale: float
    latent_shift: float
    resolution: int
    classes: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, conf: dict[str, Any]) -> "ModelRecord":
        kw = dict(conf["model_kwargs"])
        family = family_for(conf["model"])
        return cls(model=conf["model"], model_kwargs=kw, path=conf.get("path") or family.objective.paths[0],
                   vae=conf.get("vae") or DEFAULT_VAE, latent_scale=float(conf.get("latent_scale", SD_VAE_SCALE)),
                   latent_shift=float(conf.get("latent_shift", SD_VAE_SHIFT)),
                   resolution=int(conf.get("resolution") or _resolution(kw)),
                   classes=list(conf.get("classes") or []))

    @property
    def family(self) -> Family:
        return family_for(self.model)


# ---- checkpoint -> model -----------------------------------------------------------------------------------------

@dataclass
class Loaded:
    """A model in eval mode with no gradients, its family, what it was built from, and the file it came from."""
    model: torch.nn.Module
    family: Family
    record: ModelRecord
    checkpoint: Checkpoint
    built_from: str  # "config.json" or "released defaults"

    @property
    def name(self) -> str:
        return self.record.model


def _ours(c: Checkpoint, spec: ModelSpec) -> dict[str, Any]:
    """Our config.json decides; a flag that contradicts it is a mistake, not an override."""
    conf = dict(c.config or {})
    if "model" not in conf or not isinstance(conf.get("model_kwargs"), dict):
        raise UserError(f"checkpoint {c.path}: its config has no 'model'/'model_kwargs' (not one of our runs?)")
    kw = conf["model_kwargs"]
    res = conf.get("resolution", _resolution(kw))
    for flag, given, have in (("model", spec.model, conf["model"]), ("encoder_depth", spec.encoder_depth,
                              kw.get("encoder_depth")), ("num_classes", spec.num_classes, kw.get("num_classes")),
                              ("path", spec.path, conf.get("path")), ("resolution", spec.resolution, res),
                              ("projector_embed_dims", spec.projector_embed_dims, kw.get("z_dims"))):
        if given is not None and given != have:
            show = (lambda v: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
            raise UserError(f"--{flag.replace('_', '-')} {show(given)} contradicts the checkpoint's config "
                            f"({show(have)}); drop the flag for our checkpoints")
    return conf


def _released(c: Checkpoint, spec: ModelSpec) -> dict[str, Any]:
    """A file without our config: its family (named, or recognised from the weights) fills in the rest."""
    args = c.args or {}
    known = released_file(c.released) if c.released else None
    if known is not None:  # a released file by name: its size and resolution, unless flags say otherwise
        spec = replace(spec, model=spec.model or known[1]["model"],
                       resolution=spec.resolution or known[1]["resolution"])
    named = spec.model or args.get("model")
    family = family_for(named) if named else recognise(c.weights)
    if family is None:
        names = ", ".join(FAMILIES)
        raise UserError(f"checkpoint {c.path} is not recognisably one of the model families ({names}); "
                        f"name its model with --model")
    conf = family.released.config(c.weights, spec, args)
    if conf.get("model") is None:
        conf["model"] = _detect_size(family, c.weights, conf["model_kwargs"])
    return conf


def _detect_size(family: Family, sd: StateDict, kwargs: dict[str, Any]) -> str:
    """The family's entry whose parameter shapes match (its released default first), else that default."""
    first = family.released.model
    for name in [first] + sorted(n for n in family.models if n != first):
        try:
            want = build_model(name, "meta", **kwargs).state_dict()
        except (TypeError, ValueError):
            continue
        if want.keys() == sd.keys() and all(tuple(want[k].shape) == tuple(sd[k].shape) for k in want):
            return name
    return first


def _describe(conf: dict[str, Any]) -> str:
    kw = conf["model_kwargs"]
    flags = [f"--model {conf['model']}"]
    flags += [f"--encoder-depth {kw['encoder_depth']}"] if "encoder_depth" in kw else []
    flags += [f"--projector-embed-dims {','.join(map(str, kw['z_dims'])) or 'none'}"] if "z_dims" in kw else []
    flags += [f"--resolution {conf['resolution']}"]
    flags += [f"--num-classes {kw['num_classes']}"] if "num_classes" in kw else []
    return f"{conf['model']} built from the flags and released defaults ({' '.join(flags)})"


def load_model(ckpt: str | Path, spec: ModelSpec | None = None, device: torch.device | str = "cpu") -> Loaded:
    """Build the model a checkpoint describes (ours: its config; released: flags, the file, then the family's
    defaults) and load its weights strictly; shapes are compared on the meta device first (no big init)."""
    spec = spec or ModelSpec()
    c = read_checkpoint(ckpt, weights=spec.weights, encoder_depth=spec.encoder_depth)
    ours = c.config is not None
    conf = _ours(c, spec) if ours else _released(c, spec)
    record = ModelRecord.from_config(conf)
    family = record.family
    if record.path not in family.objective.paths:
        raise UserError(f"checkpoint {c.path} names an unknown path {record.path!r} (use --path; "
                        f"{family.name} knows {', '.join(family.objective.paths)})")
    what = f"{record.model} from its config.json" if ours else _describe(conf)
    try:
        check_state_dict(build_model(record.model, "meta", **record.model_kwargs), c.weights, path=c.path,
                         what=what, hint=family.hint)
        model = build_model(record.model, device, **record.model_kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build {record.model} for checkpoint {c.path}: {e} "
                        f"(check --model and --encoder-depth)") from e
    model.load_state_dict(c.weights, strict=True)
    return Loaded(model=model.eval().requires_grad_(False), family=family, record=record, checkpoint=c,
                  built_from=CONFIG_NAME if ours else "released defaults")


def load_weights_into(model: torch.nn.Module, ckpt: str | Path, *, name: str, what: str | None = None,
                      encoder_depth: int | None = None) -> Checkpoint:
    """Fill a model the caller built as registry entry `name` (--init-from) from any checkpoint layout, checked key
    by key and shape by shape; `what` names the model in the error (default: `name`)."""
    c = read_checkpoint(ckpt, encoder_depth=encoder_depth)
    check_state_dict(model, c.weights, path=c.path, what=what or name, hint=family_for(name).hint)
    model.load_state_dict(c.weights, strict=True)
    return c


def _check_model(key: str) -> str:
    return "check --model"


def check_state_dict(model: torch.nn.Module, sd: StateDict, *, path: str | Path, what: str,
                     hint: Callable[[str], str] = _check_model) -> None:
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
    raise UserError(f"checkpoint {path} does not fit {what}: {detail} ({hint(key)})")


