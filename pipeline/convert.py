"""`python -m pipeline convert`: re-encode a features set's patch tokens into another codec, exactly once.

Manifest-driven like `extract`: output shard i holds input shard i's samples in the same order; each is written to a
tmp name and renamed, then its sidecar; a re-run keeps finished shards; the manifest comes last. Every member
other than the token fields (latent moments, cls, json) is copied byte for byte, so only the encoders' tokens change.
"""
from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from manifests import Manifest, load_manifest, storage
from common import check
from manifests.codecs import (CODEC_KEY, DEFAULT_CODEC, TokenCodec, decode_arrays, encode_members, field_codec,
                              get_codec, scale_field, token_field)
from manifests.io import ensure_writable_dir
from manifests.lease import hold
from manifests.shards import decode_npy, iter_shard, npy_ext

from .writer import ShardPlan, assemble_manifest, clean_tmp, fingerprint, shard_done, write_shard_once


@dataclass(kw_only=True)
class ConvertConfig:
    """`python -m pipeline convert` settings."""
    manifest: str
    out: str
    feature_dtype: str = DEFAULT_CODEC
    workers: int = 1
    verify: bool = False
    name: str | None = None

    def validate(self) -> None:
        get_codec(self.feature_dtype)
        check(self.workers > 0, f"--workers must be a positive count, got {self.workers}")


def converted_fields(m: Manifest, target: TokenCodec) -> dict:
    """The input's field records with each token field's dtype and token_codec replaced by the target's."""
    fields = {}
    for name, spec in m.fields.items():
        if spec.get("codec") == "patch-tokens":
            t, d = spec["shape"]
            rest = {k: v for k, v in spec.items() if k not in ("dtype", "shape", CODEC_KEY)}
            spec = {**token_field(target.name, t, d, name), **rest}
        fields[name] = spec
    return fields


def _convert_sample(raw: dict, codecs: dict[str, TokenCodec], target: TokenCodec, where: str) -> dict:
    """One sample's members (raw bytes): token fields decoded to float32 and re-encoded, the rest copied."""
    out = dict(raw)
    for field, codec in codecs.items():
        for flip in (False, True):
            ext = npy_ext(field, flip)
            if ext not in raw and flip:
                continue
            check(ext in raw, f"{where}: no member '.{ext}'")
            sext = npy_ext(scale_field(field), flip)
            scale = None
            if codec.scaled:
                check(sext in raw, f"{where}: scale member '.{sext}' missing")
                scale = decode_npy(out.pop(sext), f"{where}: '.{sext}'")
            x = decode_arrays(decode_npy(out.pop(ext), f"{where}: '.{ext}'"), scale, codec, f"{where}: '.{ext}'")
            for f, arr in encode_members(field, x, target).items():  # (T, D) codes [+ (T,) scales]
                out[npy_ext(f, flip)] = arr
    return out


def convert_shard(src: str, url: str, nsamples: int, out: str, index: int, fp: str, codecs: dict[str, str],
                  target: str, fields: dict) -> dict:
    """Convert one input shard into OUT/shards/train-<index>.tar (+ sidecar); returns the sidecar."""
    import torch
    torch.set_num_threads(1)  # shards run in parallel processes; one thread each
    cods, tgt = {f: get_codec(c) for f, c in codecs.items()}, get_codec(target)

    def samples():
        n = 0
        for raw in iter_shard(src, decode=False):
            n += 1
            yield _convert_sample(raw, cods, tgt, f"shard '{url}': sample '{raw['__key__']}'")
        check(n == nsamples, f"shard '{url}' holds {n} samples, the manifest says {nsamples}")

    return write_shard_once(storage.path(out), ShardPlan(index, ()), fp, samples(), [], fields)


def run_convert(cfg: ConvertConfig) -> Path:
    """Make OUT/manifest.json with the tokens in the target codec; safe to re-run after any kill."""
    cfg.validate()
    m = load_manifest(cfg.manifest, kind="features", verify=cfg.verify)
    target = get_codec(cfg.feature_dtype)
    out = storage.resolve(cfg.out)  # a folder, or s3://bucket/prefix
    check(out != m.root.resolve(), f"--out {cfg.out} is the input set's folder; convert writes a new set")
    ensure_writable_dir(out)
    ensure_writable_dir(out / "shards", "shard folder")
    lease = hold(out, "pipeline convert")  # one writer per --out; a second job gets one line naming the holder
    removed = clean_tmp(out, before=lease.started)  # only what dead holders left
    if removed:
        print(f"removed {removed} half-written tmp file(s) from an interrupted run", file=sys.stderr)
    tokens = m.encoder_fields()
    check(bool(tokens), f"manifest {m.path} has no patch-token fields to convert")
    codecs = {f: field_codec(f, m.fields[f], f"manifest {m.path}").name for f in tokens}
    fields = converted_fields(m, target)
    fp = fingerprint({"convert": target.name, "source": m.name,
                      "shards": [[s.url, s.sha256, s.nsamples] for s in m.shardlist]}, [])
    plans = [ShardPlan(i, ()) for i in range(len(m.shardlist))]
    pending = [p for p in plans if not shard_done(out, p, fp, verify=cfg.verify)]
    done = sum(m.shardlist[p.index].nsamples for p in plans if p not in pending)
    print(f"{len(plans)} shards: {len(plans) - len(pending)} finished, {len(pending)} to convert "
          f"({', '.join(f'{f} {c}' for f, c in codecs.items())} -> {target.name})", file=sys.stderr)
    jobs = [(str(m.root / m.shardlist[p.index].url), m.shardlist[p.index].url, m.shardlist[p.index].nsamples,
             str(out), p.index, fp, codecs, target.name, fields) for p in pending]
    from tqdm import tqdm
    with tqdm(total=m.num_samples, initial=done, unit="img", desc="convert", dynamic_ncols=True) as bar:
        if cfg.workers == 1 or len(jobs) <= 1:
            for job in jobs:
                bar.update(convert_shard(*job)["nsamples"])
        else:
            with ProcessPoolExecutor(max_workers=min(cfg.workers, len(jobs))) as pool:
                for side in pool.map(convert_shard, *zip(*jobs)):
                    bar.update(side["nsamples"])
    created = {"version": m.created_by.get("version", "unknown"), "config": asdict(cfg),
               "command": " ".join(["python -m pipeline convert", *sys.argv[2:]]),
               "converted_from": {"manifest": str(m.path), "name": m.name, "token_codecs": codecs},
               "extract": m.created_by}
    name = cfg.name or f"{m.name}-{target.name}"
    res = assemble_manifest(out, plans, name=name, classes=m.classes, preprocess=m.preprocess,
                            extra_skipped=m.skipped, created_by=created)
    if cfg.verify:
        load_manifest(out, verify=True)
    lease.release()
    return res.path


__all__ = ["ConvertConfig", "run_convert", "convert_shard", "converted_fields"]
