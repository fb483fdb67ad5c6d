"""Text-to-image sampling: the captions each sample is drawn from, and their contexts (DESIGN §9).

Sources, in sample-index order:
- `--prompts FILE`: one prompt per non-empty line; sample i uses prompt i mod P.
- `--captions ANNOTATIONS.json` (COCO val, as `generate_t2i.py` samples it): one sample per image, in sorted id
  order, its caption drawn uniformly from the image's captions by (seed, image index);
- `--captions MANIFEST`: a features manifest with captions (KEY.json 'captions'), drawn the same way.

Contexts come from the text encoder the run was trained with (RUN/config.json "context", else U-ViT's
clip-vit-l-text), and CFG's unconditional context is the manifest's empty-caption file when it is readable (the
exact tensor training dropped to), else the encoding of "" on the CPU in fp32, as the pipeline makes that file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from common import UserError
from manifests import load_manifest, storage
from manifests.shards import iter_member
from manifests.captions import captions_by_image, read_coco

DEFAULT_TEXT_ENCODER = "clip-vit-l-text"  # U-ViT's FrozenCLIPEmbedder: what the official MMDiT was trained on
CAPTION_DRAW = 0xCA9  # tags the per-image caption draw apart from the per-sample noise seeds


@dataclass
class Prompts:
    """One caption per sample index (cycled when --num-samples exceeds them) and where they came from."""
    texts: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def at(self, i: int) -> str:
        return self.texts[i % len(self.texts)]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps([self.source, self.texts]).encode()).hexdigest()


def pick(seed: int, index: int, count: int) -> int:
    """Which of an image's `count` captions sample `index` draws: uniform, from (seed, index) alone."""
    return int(np.random.default_rng([seed, index, CAPTION_DRAW]).integers(count))


def read_prompts(prompts: str | None, captions: str | None, seed: int) -> Prompts | None:
    """The --prompts / --captions source (None when neither is given); a bad file is one line."""
    if prompts and captions:
        raise UserError("give --prompts FILE or --captions ANNOTATIONS.json, not both")
    if prompts:
        p = storage.path(prompts)
        try:
            text = p.read_bytes().decode("utf-8")
        except FileNotFoundError as e:
            raise UserError(f"prompt file not found: {p} (--prompts)") from e
        except UnicodeDecodeError as e:
            raise UserError(f"prompt file {p} is not UTF-8 text (--prompts)") from e
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise UserError(f"prompt file {p} has no prompts (one per line) (--prompts)")
        return Prompts(lines, f"prompts:{p}")
    if captions:
        path = storage.path(captions)
        if path.name.endswith(".json") and path.name != "manifest.json":
            images, anns = read_coco(captions)
            per_image = [caps for _, _, caps in captions_by_image(images, anns)]
            if not per_image:
                raise UserError(f"annotation file {path} has no image with a text caption (--captions)")
        else:
            per_image = _manifest_captions(captions)
        return Prompts([caps[pick(seed, i, len(caps))] for i, caps in enumerate(per_image)], f"captions:{path}")
    return None


def _manifest_captions(path: str) -> list[list[str]]:
    m = load_manifest(path, kind="features")
    out = []
    for _, key, data in iter_member(m.shard_paths(), "json"):  # the small json members only, not the features
        try:
            caps = json.loads(data.decode()).get("captions") if data is not None else None
        except (ValueError, AttributeError):
            caps = None
        if not (isinstance(caps, list) and caps and all(isinstance(c, str) for c in caps)):
            raise UserError(f"features manifest {m.path}: sample '{key}' has no captions in its json "
                            f"(--captions takes a text-to-image manifest or COCO annotations)")
        out.append(caps)
    return out


def encoder_spec(record: dict[str, Any] | None, override: str | None) -> str:
    """The --text-encoder value to load: the flag, else the run's record (NAME, or NAME=PATH for a folder)."""
    if override:
        return override
    rec = (record or {}).get("text_encoder") or {}
    name, weights = rec.get("name"), str(rec.get("weights") or "")
    if not name:
        return DEFAULT_TEXT_ENCODER
    return f"{name}={weights}" if weights and Path(weights).is_dir() else name


class TextConditioning:
    """Captions -> (N, L, D) float32 contexts on the device, and the empty context (L, D) for CFG."""

    def __init__(self, record: dict[str, Any] | None, override: str | None, width: int, device: torch.device):
        from pipeline.encoders import load_text_encoder
        self.spec = encoder_spec(record, override)
        self.encoder = load_text_encoder(self.spec, device=device)
        if self.encoder.dim != width:
            raise UserError(f"text encoder {self.spec} gives {self.encoder.dim}-wide contexts, but the model embeds "
                            f"{width}-wide ones (--text-encoder)")
        self.device = device
        self.empty = self._empty(record, override).to(device)  # (L, D)

    def _empty(self, record: dict[str, Any] | None, override: str | None) -> torch.Tensor:
        from manifests.shards import decode_npy
        empty = (record or {}).get("empty") or {}
        f = empty.get("file")
        if not override and f and Path(f).is_file():
            arr = decode_npy(Path(f).read_bytes(), f)
            if list(arr.shape) == [self.encoder.length, self.encoder.dim]:
                return torch.from_numpy(np.asarray(arr, np.float32))
        cpu = self.encoder.to("cpu")
        try:
            return torch.from_numpy(cpu.empty())
        finally:
            self.encoder.to(self.device)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encoder(list(texts)).to(self.device)  # (N, L, D)

    @property
    def meta(self) -> dict[str, Any]:
        return {"text_encoder": self.spec, "empty_sha256": hashlib.sha256(self.empty.cpu().numpy().tobytes())
                .hexdigest()}
