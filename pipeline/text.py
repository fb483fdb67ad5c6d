"""Caption contexts: CLIP's text transformer as U-ViT's FrozenCLIPEmbedder runs it (DESIGN §9, Text-to-image data).

U-ViT (baofff/U-ViT libs/clip.py) tokenizes with transformers' `CLIPTokenizer(padding="max_length", max_length=77,
truncation=True)` and keeps `CLIPTextModel(input_ids=tokens).last_hidden_state`, (77, 768) after the final
LayerNorm, with no attention mask. The pad id is `<|endoftext|>` (49407), not open_clip's 0, and the pad positions
are encoded like any other token (the causal mask does not hide them from later tokens, and MMDiT's joint attention
sees all 77), so the pad rule is part of the numbers and is recorded in the manifest.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from common import UserError
from manifests.codecs import TokenCodec, encode_fields
from manifests.schema import CONTEXT_CODEC

from .presets import TEXT_ENCODERS, TEXT_LENGTH, TINY_SEED, TextEncoderSpec, _check_name, parse_spec

CONTEXT = "context"  # the manifest field and member name: KEY.context.npy (K, 77, D)
EMPTY_FILE = "context_empty.npy"  # beside manifest.json: the empty caption's context, for classifier-free guidance
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CHUNK = 256  # captions per text-model forward pass


# ------------------------------------------------------------------------------------- the tiny tokenizer
def _byte_symbols() -> list[str]:
    """The 256 symbols CLIP's byte-level BPE uses for the bytes 0..255: printable Latin-1 bytes stand for themselves,
    the others are moved to code points from 256 up, in byte order (so every symbol is a visible character)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, moved = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + moved)
            moved += 1
    return [out[b] for b in range(256)]


def tiny_tokenizer_files(folder: str | os.PathLike) -> None:
    """Write vocab.json + merges.txt of a small CLIP BPE vocabulary: the 512 byte symbols (alone and word-final),
    merges that make each word of the demo's captions one token, then <|startoftext|>, <|endoftext|> last, as in
    CLIP's own vocabulary (so the pad id is the largest id there too). Any text still tokenizes: unknown words
    fall back to bytes."""
    from .synth import CAPTION_WORDS
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    known, merges = set(vocab), []
    for word in sorted(CAPTION_WORDS):
        left = word[0]
        for i, ch in enumerate(word[1:], start=2):
            right = ch + "</w>" if i == len(word) else ch
            merged = left + right
            if merged not in known:  # the merge that builds `merged` from its two halves
                merges.append(f"{left} {right}")
                vocab.append(merged)
                known.add(merged)
            left = merged
    vocab += [BOS, EOS]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))


# ------------------------------------------------------------------------------------------ loading
@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers reports the vision weights a CLIPTextModel leaves out of a whole CLIP folder; they are meant to
    be left out, so keep its log to errors while loading."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _load_error(name: str, where: str, e: Exception) -> UserError:
    offline = " (HF_HUB_OFFLINE is set: is it in the cache?)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"cannot load text encoder {name} from '{where}'{offline}: {msg} (--text-encoder)")


def _build_tiny(spec: TextEncoderSpec):
    """The seeded random text transformer and its generated tokenizer: every process builds the same ones."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    with tempfile.TemporaryDirectory(prefix="tiny-clip-text-") as d:
        tiny_tokenizer_files(d)
        tokenizer = CLIPTokenizer.from_pretrained(d, model_max_length=TEXT_LENGTH)
    config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=TEXT_LENGTH,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu", **spec.tiny_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = CLIPTextModel(config)
    return tokenizer, model


class TextEncoder:
    """Captions -> float32 contexts (N, 77, D): U-ViT's FrozenCLIPEmbedder, in fp32 on any device."""

    def __init__(self, spec: TextEncoderSpec, tokenizer, model, weights: str):
        self.spec, self.name, self.tokenizer, self.weights = spec, spec.name, tokenizer, weights
        self.model = model.float().eval().requires_grad_(False)
        self.dim = int(model.config.hidden_size)
        self.length = TEXT_LENGTH
        pad = tokenizer.pad_token
        if pad != EOS:  # U-ViT's numbers need end-of-text padding; a folder that pads otherwise is another model
            raise UserError(f"text encoder {spec.name} from '{weights}': its tokenizer pads with {pad!r}, expected "
                            f"{EOS!r} (CLIP's tokenizer, as U-ViT uses it) (--text-encoder)")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "TextEncoder":
        self.model.to(device)
        return self

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """(N,) captions -> (N, 77) int64 ids: <|startoftext|> ... <|endoftext|>, then <|endoftext|> up to 77."""
        enc = self.tokenizer(list(captions), truncation=True, max_length=self.length, padding="max_length",
                             return_tensors="pt")
        return enc["input_ids"]  # (N, 77)

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """(N,) captions -> last_hidden_state (N, 77, D) float32 on the model's device; no attention mask, as U-ViT."""
        ids = self.tokenize(captions).to(self.device)
        return self.model(input_ids=ids).last_hidden_state.float()  # (N, 77, D)

    def members(self, captions: Sequence[Sequence[str]], codec: TokenCodec) -> list[dict[str, np.ndarray]]:
        """Per sample (its K captions): {'context': (K, 77, D) codes, 'context.scale': (K, 77) float16 scales}."""
        flat = [c for caps in captions for c in caps]
        parts: dict[str, list[np.ndarray]] = {}
        for i in range(0, len(flat), CHUNK):
            coded = encode_fields(CONTEXT, self(flat[i:i + CHUNK]), codec)  # encoded on the device: 8-bit copies
            for k, v in coded.items():
                parts.setdefault(k, []).append(v.cpu().numpy())
        whole = {k: np.concatenate(v) for k, v in parts.items()}  # (sum K, 77, D), (sum K, 77)
        out, start = [], 0
        for caps in captions:
            out.append({k: v[start:start + len(caps)] for k, v in whole.items()})
            start += len(caps)
        return out

    def empty(self) -> np.ndarray:
        """The empty caption's context (77, D) float32, U-ViT's unconditional context for classifier-free guidance."""
        return self([""])[0].cpu().numpy()

    @property
    def meta(self) -> dict[str, Any]:
        """The manifest's record of the text encoder and its tokenizer (the pad rule included)."""
        tok, cfg = self.tokenizer, self.model.config
        return {
            "text_encoder": {"name": self.name, "weights": self.weights, "pretrained": not self.spec.tiny,
                             "architecture": "transformers CLIPTextModel", "width": self.dim,
                             "layers": int(cfg.num_hidden_layers), "heads": int(cfg.num_attention_heads),
                             "output": "last_hidden_state: every position after the final LayerNorm, float32",
                             "attention_mask": "none: causal only; pad positions are encoded (U-ViT "
                                               "FrozenCLIPEmbedder)"},
            "tokenizer": {"class": "transformers CLIPTokenizer", "max_length": self.length, "padding": "max_length",
                          "truncation": True, "pad_token": tok.pad_token, "pad_token_id": int(tok.pad_token_id),
                          "bos_token_id": int(tok.bos_token_id), "eos_token_id": int(tok.eos_token_id),
                          "vocab_size": len(tok)},
        }

    def field(self, codec: TokenCodec) -> dict[str, Any]:
        """The manifest's `context` field record (its `empty` entry is added once the file is written)."""
        from manifests.codecs import token_field
        rec = token_field(codec.name, self.length, self.dim, CONTEXT)
        rec["shape"] = [None, self.length, self.dim]  # K captions per sample, K >= 1 varying
        rec["token_codec"] = codec.record([None, self.length], CONTEXT)
        return {**rec, "codec": CONTEXT_CODEC, **self.meta,
                "layout": f"KEY.{CONTEXT}.npy (K, {self.length}, {self.dim}): one row per caption, in the order of "
                          f"KEY.json's 'captions'"}


def load_text_encoder(spec_str: str, device: str | torch.device = "cpu") -> TextEncoder:
    """A text encoder by name ('clip-vit-l-text' from the Hugging Face cache or hub, 'tiny-clip-text' built here) or
    'NAME=PATH': a Hugging Face folder in the `openai/clip-vit-large-patch14` layout, read as is."""
    name, path = parse_spec(spec_str)
    _check_name(name, TEXT_ENCODERS, "text encoder", "--text-encoder")
    spec = TEXT_ENCODERS[name]
    if spec.tiny and path is None:
        with _quiet_transformers():
            tokenizer, model = _build_tiny(spec)
        return TextEncoder(spec, tokenizer, model, f"random-init(seed={TINY_SEED})").to(device)
    where = path or spec.hub_id
    if path is not None and not os.path.isdir(path):
        raise UserError(f"text encoder folder not found: {path} (--text-encoder {spec_str}); expected a Hugging "
                        f"Face folder like openai/clip-vit-large-patch14 (config.json, weights, vocab.json, "
                        f"merges.txt)")
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
        with _quiet_transformers():
            tokenizer = CLIPTokenizer.from_pretrained(where)
            model = CLIPTextModel.from_pretrained(where)
    except Exception as e:  # noqa: BLE001 - hub/IO/format errors of many kinds: one line naming the source
        raise _load_error(name, where, e) from e
    return TextEncoder(spec, tokenizer, model, where).to(device)


def text_encoder_name(spec_str: str) -> str:
    """Validate a --text-encoder value without loading anything; returns its name."""
    name, _ = parse_spec(spec_str)
    _check_name(name, TEXT_ENCODERS, "text encoder", "--text-encoder")
    return name


def write_empty_context(spec_str: str, out) -> dict[str, Any]:
    """Encode the empty caption (on the driver's CPU, fp32), write it whole as OUT/context_empty.npy (77, D) float32,
    and return the `context` field's `empty` entry; a re-run with the same bytes leaves the file alone."""
    from manifests import atomic_write_bytes, encode_npy, storage
    from manifests.io import sha256_bytes
    arr = load_text_encoder(spec_str, "cpu").empty()  # (77, D)
    data = encode_npy(arr.astype(np.float32))
    digest = sha256_bytes(data)
    p = storage.path(out) / EMPTY_FILE
    if not (p.is_file() and p.stat().st_size == len(data) and sha256_bytes(p.read_bytes()) == digest):
        atomic_write_bytes(p, data)
    return {"empty": {"file": EMPTY_FILE, "caption": "", "dtype": "float32", "shape": list(arr.shape),
                      "sha256": digest, "bytes": len(data)}}
