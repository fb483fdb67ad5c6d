"""CLIP score of text-to-image samples (DESIGN §9): 100 × the cosine between the CLIP ViT-L/14 embeddings of each
image and the caption it was sampled from, clipped at 0 and averaged (the usual definition, as torchmetrics'
CLIPScore computes it, with `openai/clip-vit-large-patch14`).

The captions are the `txt` members the sampler writes beside each `png`. The model is transformers' `CLIPModel` with
its own `CLIPProcessor`: resize of the shorter side to 224 (bicubic), centre crop 224, OpenAI's mean and std, and the
caption tokenized to 77 tokens with truncation. `NAME=PATH` reads a Hugging Face folder in that layout; `tiny-clip`
is a seeded random-weight CLIP for tests (with the pipeline's tiny CLIP tokenizer), and marks the score not
comparable.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from common import UserError
from manifests import load_manifest
from manifests.shards import iter_member

CLIP_MODELS = {"clip-vit-l": "openai/clip-vit-large-patch14", "tiny-clip": None}
DEFAULT_CLIP = "clip-vit-l"
TINY_SEED = 0
TINY_CONFIG = dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
                   vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                               image_size=224, patch_size=32), projection_dim=32)


def _parse(spec: str) -> tuple[str, str | None]:
    name, eq, path = spec.partition("=")
    if name not in CLIP_MODELS:
        raise UserError(f"--clip-model {spec}: unknown CLIP model '{name}'; choose one of: "
                        f"{', '.join(sorted(CLIP_MODELS))} (NAME=PATH reads a Hugging Face folder)")
    return name, (path or None) if eq else None


def _tiny():
    """The seeded random CLIP and its processor: every process builds the same ones."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from pipeline.encoders import tiny_tokenizer_files
    with tempfile.TemporaryDirectory(prefix="tiny-clip-") as d:
        tiny_tokenizer_files(d)
        tokenizer = CLIPTokenizer.from_pretrained(d, model_max_length=77)
    text = {**TINY_CONFIG["text"], "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(text_config=text, vision_config=TINY_CONFIG["vision"],
                        projection_dim=TINY_CONFIG["projection_dim"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = CLIPModel(config)
    return model, CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)


class ClipScorer:
    """Images (N, H, W, 3) uint8 and their captions -> per-image max(100 · cos, 0), in fp32."""

    def __init__(self, spec: str = DEFAULT_CLIP, device: str | torch.device = "cpu"):
        self.name, path = _parse(spec)
        self.comparable = self.name != "tiny-clip" or path is not None
        if self.name == "tiny-clip" and path is None:
            model, self.processor = _tiny()
            self.weights = f"random-init(seed={TINY_SEED})"
        else:
            where = path or CLIP_MODELS[self.name]
            if path is not None and not os.path.isdir(path):
                raise UserError(f"CLIP model folder not found: {path} (--clip-model {spec}); expected a Hugging "
                                f"Face folder like openai/clip-vit-large-patch14")
            try:
                from transformers import CLIPModel, CLIPProcessor
                model, self.processor = CLIPModel.from_pretrained(where), CLIPProcessor.from_pretrained(where)
            except Exception as e:  # noqa: BLE001 - hub/IO/format errors of many kinds: one line naming the source
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"cannot load CLIP model {self.name} from '{where}': {msg} (--clip-model)") from e
            self.weights = where
        self.device = torch.device(device)
        self.model = model.float().eval().requires_grad_(False).to(self.device)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        pix = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        tok = self.processor.tokenizer(list(captions), padding=True, truncation=True, max_length=77,
                                       return_tensors="pt").to(self.device)
        img = self.model.get_image_features(pixel_values=pix)  # (N, P)
        txt = self.model.get_text_features(**tok)  # (N, P)
        img = _tensor(img)
        txt = _tensor(txt)
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)  # (N,)
        return (100 * cos).clamp(min=0).cpu().numpy().astype(np.float64)


def _tensor(out) -> torch.Tensor:
    """transformers returns a tensor, or (newer releases) an output object holding the pooled embeddings."""
    return out if torch.is_tensor(out) else out.pooler_output


@dataclass
class Captioned:
    """A samples manifest's images in manifest order with the caption each was sampled from."""
    path: Path
    captions: list[str]


def read_captions(samples: str | Path) -> Captioned:
    """Every sample's `txt` member, in the order evaluation reads the `png`s; one line if any is missing."""
    root = Path(samples)
    if not (root.is_dir() or root.name == "manifest.json"):
        raise UserError(f"--clip-model needs a samples manifest with captions (txt members); {samples} is not one")
    m = load_manifest(root, kind="samples")
    caps = []
    for shard, key, data in iter_member(m.shard_paths(), "txt"):
        if data is None:
            raise UserError(f"shard {shard}: sample '{key}' has no caption ('.txt' member); CLIP score "
                            f"needs samples made with trainer sample --prompts or --captions")
        try:
            caps.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"shard {shard}: sample '{key}': caption is not UTF-8 text") from e
    return Captioned(m.root, caps)


def clip_score(images: Iterator[np.ndarray], captions: Sequence[str], scorer: ClipScorer, count: int,
               progress: bool = True) -> float:
    """Mean CLIP score over the first `count` images (batches in manifest order) and their captions."""
    from tqdm import tqdm
    scores, done = [], 0
    with tqdm(total=count, unit="img", desc="clip score", disable=not progress, dynamic_ncols=True) as bar:
        for batch in images:
            batch = batch[: count - done]
            scores.append(scorer(batch, captions[done:done + len(batch)]))
            done += len(batch)
            bar.update(len(batch))
            if done >= count:
                break
    if done < count or len(captions) < count:
        raise UserError(f"CLIP score: {count} images but {min(done, len(captions))} with captions")
    return float(np.concatenate(scores).mean())
