"""Caption contexts for text-conditioned families (MMDiT): the field's spec, one caption per sample, the decode.

A sample stores the contexts of its K captions as `KEY.context.npy` (K, L, D) (int8 codes by default, with
`KEY.context.scale.npy` (K, L) float16 per-token scales; manifests/codecs.py) and the empty caption's context
(L, D) float32 sits beside the manifest (`manifests.schema.empty_context`).

The caption rule: global sample position p = step * global batch + index in the global batch trains on caption
`caption_choice(seed, p, K)` = SplitMix64(seed stream, p) mod K (trainer/loop/steprng.py), the same kind of draw
as the flips. It depends on nothing else, so any rank count, micro-batch, worker count or resume picks the same
caption, and it is uniform over the sample's captions as REPA's dataset.py `random.randint` is. The loader reads
only that caption's rows (L x D codes and L scales) and ships them as stored; the step decodes them on the device
(`cond_to_device`), as it does the encoder tokens. Classifier-free dropout is the objective's: rows whose `drop`
draw is set see the empty context instead (trainer/objectives/interpolant.py `context_repa_loss`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from common import UserError, check
from manifests import Manifest
from manifests.codecs import CODECS, decode, field_codec, scale_field
from manifests.schema import CONTEXT_CODEC, empty_context
from manifests.shards import npy_ext, read_npy_header

from trainer.loop.steprng import caption_choice

CONTEXT = "context"  # the field name `pipeline extract --text-encoder` writes (pipeline/text.py)
HEAD_READ = 512  # bytes that hold any .npy header of a (K, L, D) context (numpy pads headers to 64 or 128 bytes)


@dataclass(frozen=True)
class ContextSpec:
    """The manifest's caption-context field as the loader reads it."""
    name: str  # manifest field ("context")
    length: int  # L tokens per caption (77 for CLIP)
    dim: int  # D, the text width (768 for CLIP ViT-L/14): the model's context_embedder input
    codec: str  # token codec (manifests/codecs.py)

    @property
    def scaled(self) -> bool:
        return CODECS[self.codec].scaled

    @property
    def storage(self) -> np.dtype:
        return np.dtype(CODECS[self.codec].storage)

    def exts(self) -> list[str]:
        """Members every sample must have (contexts are never flipped)."""
        return [npy_ext(self.name)] + ([npy_ext(scale_field(self.name))] if self.scaled else [])


def context_fields(m: Manifest) -> list[str]:
    return sorted(n for n, s in m.fields.items() if s.get("codec") == CONTEXT_CODEC)


def resolve_context(m: Manifest, conditioning: str, model: str) -> ContextSpec | None:
    """The context field a text family needs (None for a class family, which must not be given one)."""
    found = context_fields(m)
    if conditioning != "text":
        check(not found, f"manifest {m.path} has the caption-context field '{found[0] if found else ''}', but "
                         f"--model {model} is class-conditional; text-to-image trains an MMDiT model (--model MMDiT/2)")
        return None
    check(bool(found), f"manifest {m.path} has no caption-context field '{CONTEXT}' (codec {CONTEXT_CODEC}), which "
                       f"--model {model} trains on; extract with `pipeline extract --captions ... --text-encoder ...`")
    name = CONTEXT if CONTEXT in found else found[0]
    spec = m.fields[name]
    codec = field_codec(name, spec, f"manifest {m.path}")
    _, length, dim = spec["shape"]  # [null, L, D]: the schema checked it
    return ContextSpec(name=name, length=int(length), dim=int(dim), codec=codec.name)


def load_empty(m: Manifest, ctx: ContextSpec) -> np.ndarray:
    """The empty caption's context (L, D) float32, checked against the field."""
    empty = empty_context(m, ctx.name)
    check(empty.shape == (ctx.length, ctx.dim) and empty.dtype == np.float32,
          f"manifest {m.path}: the empty-caption context of field '{ctx.name}' has shape {list(empty.shape)} "
          f"{empty.dtype}, expected [{ctx.length}, {ctx.dim}] float32")
    return empty


def context_record(m: Manifest, ctx: ContextSpec) -> dict[str, Any]:
    """RUN/config.json's "context": the text side a sampler must reproduce, and where the empty context is."""
    spec = m.fields[ctx.name]
    empty = dict(spec["empty"])
    empty["file"] = str(m.root / empty["file"])
    return {"field": ctx.name, "length": ctx.length, "dim": ctx.dim, "codec": ctx.codec,
            "text_encoder": spec.get("text_encoder"), "tokenizer": spec.get("tokenizer"), "empty": empty}


def check_width(m: Manifest, ctx: ContextSpec, model: str, width: int) -> None:
    check(ctx.dim == width, f"manifest {m.path} field '{ctx.name}' holds {ctx.dim}-wide text contexts, but --model "
                            f"{model} embeds {width}-wide ones (its context_embedder input; the paper's CLIP "
                            f"ViT-L/14 text is 768); extract with a text encoder of that width or pick another model")


def cond_to_device(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The batch's conditioning on `device`: class labels (n,) as they are, or caption contexts (n, L, D) float32
    (8-bit codes and their scales cross the bus, then decode, like `tokens_to_device`)."""
    y = batch["y"].to(device, non_blocking=True)
    codec = batch.get("ycodec")
    if codec is None:
        return y  # (n,)
    s = batch.get("yscale")
    return decode(y, None if s is None else s.to(device, non_blocking=True), CODECS[codec])  # (n, L, D)


def _parse_header(data: bytes, where: str, tail: tuple[int, ...], dtype: np.dtype, size: int) -> tuple[int, int]:
    """(K, header bytes) of a (K, *tail) member from its first bytes; any mismatch is a one-line UserError.

    Parsed headers are cached by their exact bytes: numpy's header reader (`literal_eval`) cost more than the int8
    payload saved (tests/benchmarks/bench_t2i.py), and a set has only a few distinct headers (one per K)."""
    hlen = _header_length(data)
    if hlen is not None:
        hit = _HEADERS.get((data[:hlen], tail, dtype.str, size))
        if hit is not None:
            return hit
    k, n = _parse_header_uncached(data, where, tail, dtype, size)
    if hlen == n and len(_HEADERS) < 4096:
        _HEADERS[(data[:n], tail, dtype.str, size)] = (k, n)
    return k, n


_HEADERS: dict[tuple, tuple[int, int]] = {}


def _header_length(data: bytes) -> int | None:
    """The .npy header's byte length from its magic and length field (v1: uint16 at 8, v2/3: uint32 at 8)."""
    if len(data) < 12 or data[:6] != b"\x93NUMPY":
        return None
    if data[6] == 1:
        return 10 + int.from_bytes(data[8:10], "little")
    return 12 + int.from_bytes(data[8:12], "little")


def _parse_header_uncached(data: bytes, where: str, tail: tuple[int, ...], dtype: np.dtype, size: int
                           ) -> tuple[int, int]:
    shape, got, fortran, hlen = read_npy_header(data, where)
    if len(shape) != len(tail) + 1 or tuple(shape[1:]) != tail or got != dtype or fortran or shape[0] < 1:
        raise UserError(f"{where} has shape {list(shape)} {got}, the manifest says [K>=1, "
                        f"{', '.join(map(str, tail))}] {dtype}")
    k = int(shape[0])
    if size != hlen + k * int(np.prod(tail)) * dtype.itemsize:
        raise UserError(f"{where} has {size} bytes, expected {hlen + k * int(np.prod(tail)) * dtype.itemsize}")
    return k, hlen


class ContextReads:
    """FeatureBatches' caption reads: per sample, the chosen caption's rows straight into the batch buffers.

    Needs the host's `index`, `seed`, `spec.context`, `_where(sid, ext)` and the two byte primitives below (the
    ranged reader overrides them to serve from the sample's fetched bytes).
    """
    index: Any
    seed: int
    spec: Any
    _fd: Callable[[int], int]
    _where: Callable[[int, str], str]

    def _member_bytes(self, sid: int, ext: str, rel: int, size: int) -> bytes:
        import os
        off = int(self.index.members[ext][sid][0])
        return os.pread(self._fd(sid), size, off + rel)

    def _member_into(self, sid: int, ext: str, rel: int, out: np.ndarray) -> None:
        import os
        off = int(self.index.members[ext][sid][0])
        if os.preadv(self._fd(sid), [memoryview(out).cast("B")], off + rel) != out.nbytes:
            raise UserError(f"{self._where(sid, ext)} is truncated")

    def ctx_buffers(self, n: int, alloc: Callable) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """A ring slot's context buffers: codes (n, L, D) as stored and (n, L) float16 scales; None for classes."""
        c = self.spec.context
        if c is None:
            return None
        codes = alloc((n, c.length, c.dim), getattr(torch, c.storage.name))
        return codes, alloc((n, c.length), torch.float16) if c.scaled else None

    def read_contexts(self, ids: np.ndarray, positions: np.ndarray, bufs: tuple) -> list[int]:
        """Read each sample's chosen caption into `bufs` (ctx_buffers' views); return the caption indices."""
        c, (codes, scales) = self.spec.context, bufs
        ext, sext = npy_ext(c.name), npy_ext(scale_field(c.name))
        heads = []
        for sid in map(int, ids):
            size = int(self.index.members[ext][sid][1])
            k, hlen = _parse_header(self._member_bytes(sid, ext, 0, min(size, HEAD_READ)), self._where(sid, ext),
                                    (c.length, c.dim), c.storage, size)
            heads.append((k, hlen))
        choice = caption_choice(self.seed, positions, np.array([k for k, _ in heads]))  # (n,)
        cn, sn = codes.numpy(), None if scales is None else scales.numpy()
        for j, (sid, (k, hlen)) in enumerate(zip(map(int, ids), heads)):
            row = int(choice[j])
            self._member_into(sid, ext, hlen + row * cn[j].nbytes, cn[j])  # (L, D) codes of caption `row`
            if sn is None:
                continue
            ssize = int(self.index.members[sext][sid][1])
            sk, shlen = _parse_header(self._member_bytes(sid, sext, 0, min(ssize, HEAD_READ)),
                                      self._where(sid, sext), (c.length,), np.dtype(np.float16), ssize)
            if sk != k:
                raise UserError(f"{self._where(sid, sext)} holds {sk} captions' scales for {k} contexts")
            self._member_into(sid, sext, shlen + row * sn[j].nbytes, sn[j])  # (L,) float16
            if not np.isfinite(sn[j]).all():  # a NaN/inf scale would poison every value of its token
                raise UserError(f"{self._where(sid, sext)} holds a non-finite scale (corrupt shard?)")
        return [int(v) for v in choice]


def pick_caption(codes: np.ndarray, scales: np.ndarray | None, seed: int, position: int
                 ) -> tuple[np.ndarray, np.ndarray | None, int]:
    """The --stream reader's choice: one sample's (K, L, D) codes and (K, L) scales -> caption rows and index."""
    row = int(caption_choice(seed, np.array([position]), np.array([codes.shape[0]]))[0])
    return codes[row], None if scales is None else scales[row], row


__all__ = ["CONTEXT", "ContextSpec", "ContextReads", "resolve_context", "load_empty", "check_width", "context_record",
           "cond_to_device", "pick_caption", "context_fields"]
