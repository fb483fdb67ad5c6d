"""Patch-token codecs (DESIGN §3): float16/float32 as is, or 8-bit codes with one float16 scale per token.

A token field's manifest record carries `token_codec`, e.g. for int8

    {"dtype": "int8", "shape": [256, 768], "codec": "patch-tokens",
     "token_codec": {"name": "int8", "storage": "int8", "qmax": 127,
                     "scale": {"member": "<field>.scale.npy", "dtype": "float16", "shape": [256], "per": "token"}}}

Values are `KEY.<field>.npy` (T, D) in `storage` dtype; scales are `KEY.<field>.scale.npy` (T,) float16 (flipped
twins: `<field>.flip.npy` and `<field>.scale.flip.npy`). Decoding is x = code * scale[:, None]. float8_e4m3 codes
are stored as their uint8 bit patterns because numpy has no float8 (view them as torch.float8_e4m3fn).
A record without `token_codec` (every manifest before codecs existed) is float16 or float32 as its `dtype` says.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from common.errors import UserError, check

if TYPE_CHECKING:
    import torch

CODEC_KEY = "token_codec"
SCALE_DTYPE = "float16"


@dataclass(frozen=True)
class TokenCodec:
    """How one token field is stored: `dtype` names the numbers, `storage` the .npy dtype holding them."""
    name: str
    dtype: str
    storage: str
    qmax: float | None = None  # largest code magnitude; None: stored as is, no scale member

    @property
    def scaled(self) -> bool:
        return self.qmax is not None

    @property
    def storage_torch(self) -> torch.dtype:
        import torch
        return getattr(torch, self.storage)

    def record(self, tokens: int | list, field: str) -> dict[str, Any]:
        """The manifest's `token_codec` entry for a field of `tokens` tokens (or of a scale shape, e.g. [None, 77]
        for text contexts: K captions of 77 tokens)."""
        rec: dict[str, Any] = {"name": self.name, "storage": self.storage}
        if self.scaled:
            rec["qmax"] = self.qmax
            shape = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens]
            rec["scale"] = {"member": f"{scale_field(field)}.npy", "dtype": SCALE_DTYPE, "shape": shape,
                            "per": "token"}
            rec["decode"] = "x = code * scale[:, None]"
        if self.storage != self.dtype:
            rec["note"] = f"{self.dtype} bit patterns stored as {self.storage} (numpy has no {self.dtype})"
        return rec


# float8_e4m3fn: 4 exponent bits, 3 mantissa bits, no inf; its largest finite value is 448.
CODECS = {
    "float16": TokenCodec("float16", "float16", "float16"),
    "float32": TokenCodec("float32", "float32", "float32"),
    "int8": TokenCodec("int8", "int8", "int8", qmax=127.0),  # symmetric: -128 is never used
    "float8_e4m3": TokenCodec("float8_e4m3", "float8_e4m3fn", "uint8", qmax=448.0),
}
DEFAULT_CODEC = "int8"


def get_codec(name: str, what: str = "--feature-dtype") -> TokenCodec:
    check(name in CODECS, f"{what}: unknown token codec {name!r}; known: {', '.join(CODECS)}")
    return CODECS[name]


def scale_field(field: str) -> str:
    """Pseudo-field holding a scaled field's scales: members '<field>.scale.npy' and '<field>.scale.flip.npy'."""
    return f"{field}.scale"


def token_field(codec: str, tokens: int, dim: int, field: str) -> dict[str, Any]:
    """The dtype/shape/token_codec part of a manifest field record for new extractions."""
    c = get_codec(codec)
    return {"dtype": c.dtype, "shape": [tokens, dim], CODEC_KEY: c.record(tokens, field)}


def field_codec(name: str, spec: dict[str, Any], where: str = "manifest") -> TokenCodec:
    """The codec of a patch-token field record, validated; any inconsistency is a one-line UserError."""
    rec = spec.get(CODEC_KEY)
    if rec is None:  # written before codecs existed: the dtype says it all
        dt = spec.get("dtype")
        check(dt in ("float16", "float32"), f"{where}: field '{name}' has dtype {dt!r} and no '{CODEC_KEY}'; "
                                            f"expected float16 or float32")
        return CODECS[dt]
    check(isinstance(rec, dict), f"{where}: field '{name}' has a malformed '{CODEC_KEY}' (expected an object)")
    cname = rec.get("name")
    check(cname in CODECS, f"{where}: field '{name}' uses token codec {cname!r}, which this reader does not know "
                           f"(known: {', '.join(CODECS)}); update the code or convert the set with "
                           f"`pipeline convert`")
    c = CODECS[cname]
    check(spec.get("dtype") == c.dtype and rec.get("storage") == c.storage,
          f"{where}: field '{name}' with token codec {cname} must have dtype {c.dtype} stored as {c.storage}, "
          f"found dtype {spec.get('dtype')!r} stored as {rec.get('storage')!r}")
    if c.scaled:
        sc = rec.get("scale")
        tokens = list(spec.get("shape", [None, None]))[:-1]  # one scale per token: every axis but the width
        ok = isinstance(sc, dict) and sc.get("dtype") == SCALE_DTYPE and list(sc.get("shape", [])) == tokens \
            and sc.get("per") == "token" and float(rec.get("qmax", -1)) == c.qmax
        check(ok, f"{where}: field '{name}' ({cname}) needs a per-token {SCALE_DTYPE} scale of shape {tokens} and "
                  f"qmax {c.qmax:g}; found scale {sc!r}, qmax {rec.get('qmax')!r}")
    return c


def encode(x: torch.Tensor, codec: TokenCodec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens (..., T, D) -> (codes in the storage dtype, (..., T) float16 scales or None), on x's device.

    The scale is rounded to float16 first and the codes are computed against that rounded scale, so decoding
    with the stored scale is exactly what was quantized. A non-finite token gives a non-finite scale, which
    readers reject naming the sample.
    """
    import torch
    if not codec.scaled:
        return x.to(codec.storage_torch), None
    x = x.float()
    scale = (x.abs().amax(-1) / codec.qmax).to(torch.float16)  # (..., T)
    s = scale.float().unsqueeze(-1)  # (..., T, 1)
    y = x / torch.where(s > 0, s, torch.ones_like(s))  # (..., T, D); all-zero tokens stay zero
    y = y.clamp(-codec.qmax, codec.qmax)  # fp16 rounding of the scale may push |y| a hair past qmax
    if codec.name == "int8":
        return y.round().to(torch.int8), scale
    return y.to(torch.float8_e4m3fn).view(torch.uint8), scale


def decode(q: torch.Tensor, scale: torch.Tensor | None, codec: TokenCodec) -> torch.Tensor:
    """Codes (..., T, D) and scales (..., T) -> float32 tokens, on q's device (the trainer calls it on the GPU)."""
    import torch
    if not codec.scaled:
        return q.float()
    if codec.storage == "uint8":
        q = q.view(torch.float8_e4m3fn)
    return q.float() * scale.float().unsqueeze(-1)  # (..., T, D)


def encode_fields(field: str, x: torch.Tensor, codec: TokenCodec) -> dict[str, torch.Tensor]:
    """{field: codes, '<field>.scale': scales} as tensors on x's device (the extract actor copies them to the host)."""
    q, s = encode(x, codec)
    return {field: q} if s is None else {field: q, scale_field(field): s}


def encode_members(field: str, x: torch.Tensor | np.ndarray, codec: TokenCodec) -> dict[str, np.ndarray]:
    """{field: codes, '<field>.scale': scales} as host numpy arrays, ready to be written as .npy members."""
    import torch
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return {k: v.cpu().numpy() for k, v in encode_fields(field, t, codec).items()}


def bad_scales(scale: np.ndarray, codec: TokenCodec) -> np.ndarray:
    """Element-wise over (..., T) scales: whether a stored scale cannot come from `encode`: non-finite, negative,
    or above the float16 range divided by qmax (a flipped exponent bit). A zero scale is possible (an all-zero
    token) and is checked against its codes by check_scales()."""
    s = scale.astype(np.float32)
    return ~np.isfinite(s) | (s < 0) | (s > np.float32(65504.0 / (codec.qmax or 1.0)))


def check_scales(scale: np.ndarray, codec: TokenCodec, what: str, codes: np.ndarray | None = None) -> None:
    """One line naming `what` if any scale is impossible (bad_scales), or is 0 for a token with non-zero codes."""
    bad = bad_scales(scale, codec)
    if codes is not None:  # a zero scale with non-zero codes decodes a token to 0: not what was encoded
        nz = (codes & 0x7F) != 0 if codes.dtype == np.uint8 else codes != 0  # float8: 0x80 is -0
        bad |= (scale == 0) & nz.reshape(*scale.shape, -1).any(-1)
    if bad.any():
        v = float(scale.reshape(-1)[int(np.flatnonzero(bad.reshape(-1))[0])])
        if not np.isfinite(v):
            raise UserError(f"{what}: non-finite scale (corrupt shard?)")
        raise UserError(f"{what}: impossible token scale {v!r} (negative, zero for non-zero codes, or too large: "
                        f"corrupt shard?)")


def decode_arrays(q: np.ndarray, scale: np.ndarray | None, codec: TokenCodec, what: str = "tokens") -> np.ndarray:
    """Numpy codes and scales -> float32 tokens, checking the scale's shape and finiteness (UserError names `what`)."""
    if codec.scaled:
        check(scale is not None, f"{what}: scale member missing")
        check(scale.shape == q.shape[:-1] and scale.dtype == np.float16,
              f"{what}: scale has shape {list(scale.shape)} {scale.dtype}, expected {list(q.shape[:-1])} float16")
        check_scales(scale, codec, what, q)
    import torch
    check(q.dtype == np.dtype(codec.storage), f"{what}: stored as {q.dtype}, codec {codec.name} stores "
                                              f"{codec.storage}")
    return decode(torch.from_numpy(np.ascontiguousarray(q)),
                  None if scale is None else torch.from_numpy(np.ascontiguousarray(scale)), codec).numpy()


def decode_sample(sample: dict[str, Any], field: str, codec: TokenCodec, flip: bool = False,
                  where: str = "sample") -> np.ndarray:
    """Float32 tokens of one decoded shard sample (a dict of ext -> array, as iter_shard yields)."""
    from .shards import npy_ext
    ext = npy_ext(field, flip)
    check(ext in sample, f"{where}: no member '.{ext}'")
    sext = npy_ext(scale_field(field), flip)
    scale = sample.get(sext) if codec.scaled else None
    if codec.scaled and scale is None:
        raise UserError(f"{where}: scale member '.{sext}' missing")
    return decode_arrays(sample[ext], scale, codec, f"{where}: '.{ext}'")


__all__ = ["CODECS", "CODEC_KEY", "DEFAULT_CODEC", "TokenCodec", "get_codec", "scale_field", "token_field",
           "field_codec", "encode", "decode", "encode_fields", "encode_members", "decode_arrays", "decode_sample"]
