"""Ray workers: CPU tasks decode+crop a whole shard; one GPU actor holds the VAE and every encoder and writes it."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .sources import Item
from .transforms import BadImage, decode_crop
from .writer import ShardPlan, write_shard_once


@dataclass(kw_only=True)
class EncodeConfig:
    """What the GPU actor needs: models, geometry and the shard-writing target."""
    out: str
    fingerprint: str
    resolution: int = 256
    vae: str = "sd-vae-ft-ema"
    encoders: list[str] = field(default_factory=lambda: ["dinov2-vit-b"])
    batch_size: int = 64
    hflip: bool = False
    feature_dtype: str = "float16"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    cpu_threads: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def decode_shard(row: dict[str, Any]) -> dict[str, Any]:
    """One shard's inputs -> stacked uint8 crops (as bytes) plus per-sample metadata and skip reasons."""
    resolution = int(row["resolution"])
    crops, samples, skipped = [], [], []
    for d in json.loads(row["items"]):
        it = Item(**d)
        try:
            try:
                data = it.read()
            except OSError as e:
                raise BadImage(f"unreadable file ({e.strerror or e})") from None
            crop, size = decode_crop(data, resolution)
        except BadImage as e:
            skipped.append({"key": it.key, "source": it.source, "reason": str(e)})
            continue
        crops.append(crop)
        samples.append({"key": it.key, "label": it.label, "source": it.source, "size": list(size)})
    images = np.stack(crops) if crops else np.zeros((0, resolution, resolution, 3), np.uint8)  # (n, R, R, 3)
    return {"shard": int(row["shard"]), "n": len(samples), "images": images.tobytes(),
            "meta": json.dumps({"samples": samples, "skipped": skipped})}


class ShardEncoder:
    """Ray actor: VAE moments + patch tokens for every image of a shard, in fixed sub-batches, then write it."""

    def __init__(self, cfg: dict):
        import torch

        from .encoders import load_encoder, load_vae, vae_meta, vae_moments
        self.vae_moments = vae_moments
        self.cfg = EncodeConfig(**cfg)
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            # Same thread count and deterministic kernels in every run: byte-identical shards on CPU.
            torch.set_num_threads(max(1, self.cfg.cpu_threads))
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        prec = self.cfg.precision
        self.autocast = self.device.type == "cuda" and prec in ("auto", "bf16")  # never fp16 for the VAE
        self.vae = load_vae(self.cfg.vae, device=self.device)
        self.encoders = [load_encoder(e, self.cfg.resolution, device=self.device) for e in self.cfg.encoders]
        r8 = self.cfg.resolution // 8
        lat_c = 2 * int(self.vae.config.latent_channels)
        self.fields: dict[str, Any] = {"latent": {"dtype": "float32", "shape": [lat_c, r8, r8], "codec": "vae-moments",
                                                  "vae": vae_meta(self.cfg.vae)}}
        for enc in self.encoders:
            self.fields[enc.name] = {"dtype": self.cfg.feature_dtype, "shape": [enc.grid[0] * enc.grid[1], enc.dim],
                                     "codec": "patch-tokens", "encoder": enc.meta}

    def _encode(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (n, R, R, 3) -> {'latent': (n, 8, R/8, R/8) f32, name: (n, T, D) feature dtype}."""
        torch = self.torch
        out: dict[str, list[np.ndarray]] = {k: [] for k in self.fields}
        bs = self.cfg.batch_size
        for i in range(0, len(crops), bs):  # fixed sub-batches from the shard start: same numerics every run
            x = torch.from_numpy(crops[i:i + bs]).to(self.device, non_blocking=True)  # (b, R, R, 3) uint8
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                out["latent"].append(self.vae_moments(self.vae, x).float().cpu().numpy())
                for enc in self.encoders:
                    # Cast on the device (round-to-nearest-even, as numpy would) to halve the copy to the host.
                    tok = enc(x).to(getattr(torch, self.cfg.feature_dtype)).cpu().numpy()  # (b, T, D)
                    out[enc.name].append(tok)
        return {k: np.concatenate(v) for k, v in out.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        res = {"shard": [], "nsamples": [], "nskipped": []}
        for j in range(len(batch["shard"])):
            plan = ShardPlan(int(batch["shard"][j]), ())
            meta = json.loads(str(batch["meta"][j]))
            n, r = int(batch["n"][j]), self.cfg.resolution
            crops = np.frombuffer(batch["images"][j], dtype=np.uint8).reshape(n, r, r, 3).copy()  # writable
            feats = self._encode(crops) if n else {}
            flips = self._encode(np.ascontiguousarray(crops[:, :, ::-1])) if n and self.cfg.hflip else {}
            samples = []
            for i, s in enumerate(meta["samples"]):
                sample = {"__key__": s["key"], "cls": s["label"], "json": {"source": s["source"], "size": s["size"]}}
                for name in self.fields:
                    sample[f"{name}.npy"] = feats[name][i]
                    if flips:
                        sample[f"{name}.flip.npy"] = flips[name][i]
                samples.append(sample)
            write_shard_once(Path(self.cfg.out), plan, self.cfg.fingerprint, samples, meta["skipped"], self.fields)
            res["shard"].append(plan.index)
            res["nsamples"].append(len(samples))
            res["nskipped"].append(len(meta["skipped"]))
        return res


def cpu_threads_default() -> int:
    """Threads for the CPU actor: fixed, so numerics do not depend on the machine's load."""
    return int(os.environ.get("REPA_ENCODE_THREADS", "1"))
