"""Ray workers: CPU tasks decode+crop a whole shard; one GPU actor holds the VAE and every encoder and writes it."""
from __future__ import annotations

import errno
import json
import os
import queue
import threading
from typing import Any, Iterator

import numpy as np

from common import UserError
from manifests import storage
from manifests.codecs import encode_fields, get_codec, token_field

from .config import ExtractConfig
from .sources import Item, read_items
from .transforms import BadImage, decode_crop
from .writer import ShardPlan, write_shard_once


def numerics(precision: str, device_type: str) -> tuple[object, object]:
    """(VAE autocast dtype, encoder autocast dtype), None meaning fp32; CPU default stays fp32 (deterministic)."""
    import torch
    if precision == "fast":
        return torch.bfloat16, torch.bfloat16
    if precision == "default" and device_type == "cuda":
        return None, torch.float16
    return None, None


def image_fault(e: BaseException) -> bool:
    """Whether a read error is the image's own (a dangling link, a file that is gone or unreadable, an object
    deleted since listing): skipped. Anything else (a store still failing after the retry policy, an I/O error)
    fails the shard instead, so no image is lost to a transient fault."""
    if isinstance(e, UserError):
        return isinstance(e.__cause__, FileNotFoundError)
    return isinstance(e, OSError) and e.errno in (errno.ENOENT, errno.EACCES, errno.EISDIR, errno.ELOOP,
                                                  errno.ENOTDIR)


def decode_shard(row: dict[str, Any]) -> dict[str, Any]:
    """One shard's inputs -> stacked uint8 crops (as bytes) plus per-sample metadata and skip reasons."""
    resolution, crop_rule = int(row["resolution"]), str(row.get("crop", "adm-center"))
    crops, samples, skipped = [], [], []
    items = [Item(**d) for d in json.loads(row["items"])]
    for it, data in zip(items, read_items(items)):  # remote inputs: concurrent GETs
        try:
            if isinstance(data, Exception):
                if not image_fault(data):  # the store's trouble, not the image's: fail the shard, a re-run redoes it
                    raise UserError(f"shard {int(row['shard'])}: cannot read {it.source}: {data}") from data
                raise BadImage(f"unreadable file ({getattr(data, 'strerror', None) or data})")
            crop, size = decode_crop(data, resolution, crop_rule)
        except BadImage as e:
            skipped.append({"key": it.key, "source": it.source, "reason": str(e)})
            continue
        crops.append(crop)
        samples.append({"key": it.key, "label": it.label, "source": it.source, "size": list(size),
                        **({"captions": list(it.captions)} if it.captions else {})})
    images = np.stack(crops) if crops else np.zeros((0, resolution, resolution, 3), np.uint8)  # (n, R, R, 3)
    return {"shard": int(row["shard"]), "n": len(samples), "images": images.tobytes(),
            "meta": json.dumps({"samples": samples, "skipped": skipped})}


class ShardEncoder:
    """Ray actor: VAE moments + patch tokens for every image of a shard, in fixed sub-batches, then write it."""

    # Ray may run two calls of this actor at once (job.py): one encodes while the other's writer drains, so the
    # device never waits on the writer. The lock keeps encoding itself to one call at a time (one actor per process).
    _device_lock = threading.Lock()

    def __init__(self, cfg: ExtractConfig, fingerprint: str, out: str | None = None, cpu_threads: int = 1):
        """`cfg` as the user gave it; what the job resolved comes beside it: the extract's fingerprint, the shard
        folder (absolute; None: cfg.out) and the CPU thread count."""
        import torch

        from .encoders import load_encoder, load_vae, vae_meta, vae_moments
        self.vae_moments = vae_moments
        self.cfg, self.fingerprint, self.out = cfg, fingerprint, storage.path(out or cfg.out)
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            # Same thread count and deterministic kernels in every run: byte-identical shards on CPU.
            torch.set_num_threads(max(1, cpu_threads))
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.vae = load_vae(self.cfg.vae, device=self.device)
        self.encoders = [load_encoder(e, self.cfg.resolution, device=self.device) for e in self.cfg.encoders]
        self._setup_numerics()
        r8 = self.cfg.resolution // 8
        lat_c = 2 * int(self.vae.config.latent_channels)
        self.fields: dict[str, Any] = {"latent": {"dtype": "float32", "shape": [lat_c, r8, r8], "codec": "vae-moments",
                                                  "vae": vae_meta(self.cfg.vae)}}
        self.codec = get_codec(self.cfg.feature_dtype)  # the TokenCodec object of the setting validate() checked
        for enc in self.encoders:
            self.fields[enc.name] = {**token_field(self.codec.name, enc.grid[0] * enc.grid[1], enc.dim, enc.name),
                                     "codec": "patch-tokens", "encoder": enc.meta}
        self.text = None  # text-to-image: captions -> contexts (pipeline/text.py), always fp32 as U-ViT
        if self.cfg.text_encoder:
            from .encoders import load_text_encoder
            self.text = load_text_encoder(self.cfg.text_encoder, device=self.device)
            self.context_codec = get_codec(self.cfg.context_dtype)
            self.fields["context"] = self.text.field(self.context_codec)

    def _setup_numerics(self, compile_: bool | None = None) -> None:
        """Autocast dtypes, TF32 and (on CUDA) channels-last + torch.compile of the VAE encoder and the encoders."""
        torch = self.torch
        self.vae_amp, self.enc_amp = numerics(self.cfg.precision, self.device.type)
        if self.device.type != "cuda":
            return
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = self.cfg.precision != "fp32"  # PyTorch's default: TF32 convolutions
        torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default: fp32 matmuls (VAE attention, ViTs)
        self.vae = self.vae.to(memory_format=torch.channels_last)
        if compile_ if compile_ is not None else os.environ.get("REPA_COMPILE", "1") != "0":
            self.vae.encoder = torch.compile(self.vae.encoder)
            for enc in self.encoders:
                enc.model.forward_features = torch.compile(enc.model.forward_features)

    def _autocast(self, dtype):
        return self.torch.autocast(self.device.type, dtype=dtype or self.torch.float32, enabled=dtype is not None)

    def _to_host(self, t) -> np.ndarray:
        """Device -> numpy through a pinned buffer on CUDA (an async copy; the caller syncs once per sub-batch)."""
        if t.device.type != "cuda":
            return t.numpy()
        host = self.torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True).numpy()

    def _encode_iter(self, crops: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        """uint8 (n, R, R, 3) -> per sub-batch {'latent': (b, 8, R/8, R/8) f32, name: (b, T, D) feature dtype}."""
        torch = self.torch
        cuda = self.device.type == "cuda"
        for i in range(0, len(crops), self.cfg.batch_size):  # fixed sub-batches from the shard start: same numerics
            x = torch.from_numpy(crops[i:i + self.cfg.batch_size])  # (b, R, R, 3) uint8
            x = x.pin_memory().to(self.device, non_blocking=True) if cuda else x
            out = {}
            with torch.inference_mode():
                with self._autocast(self.vae_amp):
                    out["latent"] = self._to_host(self.vae_moments(self.vae, x).float())  # (b, 8, R/8, R/8)
                with self._autocast(self.enc_amp):
                    for enc in self.encoders:
                        # Encode on the device to shrink the copy to the host: fp16 (b, T, D), or int8 codes +
                        # (b, T) scales (manifests/codecs.py).
                        coded = encode_fields(enc.name, enc(x), self.codec)
                        out.update({k: self._to_host(v) for k, v in coded.items()})
            if cuda:
                torch.cuda.current_stream(self.device).synchronize()  # the pinned copies above have landed
            yield out

    def _encode(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """All sub-batches of a shard, concatenated."""
        parts = list(self._encode_iter(crops))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _samples(self, crops: np.ndarray, metas: list[dict]) -> Iterator[list[dict]]:
        """Per sub-batch, the finished sample dicts (with flipped twins if asked)."""
        flips = self._encode_iter(np.ascontiguousarray(crops[:, :, ::-1])) if self.cfg.hflip else None
        start = 0
        for feats in self._encode_iter(crops):
            flip = next(flips) if flips is not None else None
            b = len(feats["latent"])
            batch = []
            contexts = self._contexts(metas[start:start + b])
            for i, s in enumerate(metas[start:start + b]):
                sample = {"__key__": s["key"], "cls": s["label"], "json": {"source": s["source"], "size": s["size"]}}
                if contexts is not None:  # K captions -> context (K, 77, D) codes (+ scales); never flipped
                    sample["json"]["captions"] = s["captions"]
                    sample.update({f"{name}.npy": arr for name, arr in contexts[i].items()})
                for name in feats:  # fields, plus '<field>.scale' for scaled token codecs
                    sample[f"{name}.npy"] = feats[name][i]
                    if flip is not None:
                        sample[f"{name}.flip.npy"] = flip[name][i]
                batch.append(sample)
            start += b
            yield batch

    def _contexts(self, metas: list[dict]) -> list[dict[str, np.ndarray]] | None:
        """Per sample, its captions' coded contexts (None without a text encoder); fp32, no autocast."""
        if self.text is None:
            return None
        with self.torch.inference_mode():
            return self.text.members([s["captions"] for s in metas], self.context_codec)

    def _encode_and_write(self, plan: ShardPlan, crops: np.ndarray, metas: list[dict], skipped: list[dict]) -> dict:
        """Encode sub-batches while a thread streams finished samples into the shard's tar (GPU never waits on IO:
        while this call waits for its writer to finish the shard, a second concurrent call encodes the next one).

        If encoding fails, the writer is aborted, so no partial tar is ever renamed into place.
        """
        out, fp = self.out, self.fingerprint
        if not metas:
            return write_shard_once(out, plan, fp, [], skipped, self.fields)
        q: queue.Queue = queue.Queue(maxsize=4)
        result: dict[str, Any] = {"eos": False}

        def stream() -> Iterator[dict]:
            while True:
                item = q.get()
                if item is _END or item is _ABORT:
                    result["eos"] = True
                    if item is _ABORT:
                        raise RuntimeError(f"shard {plan.name}: encoding failed, tar abandoned")
                    return
                yield from item

        def writer() -> None:
            try:
                result["side"] = write_shard_once(out, plan, fp, stream(), skipped, self.fields)
            except BaseException as e:  # noqa: BLE001 - handed to the encoding thread below
                result["error"] = e
                while not result["eos"]:  # drain up to the end mark so the producer never blocks
                    result["eos"] = q.get() in (_END, _ABORT)

        t = threading.Thread(target=writer, name=f"write-{plan.name}", daemon=True)
        t.start()
        ok = False
        try:
            with self._device_lock:  # released before the drain below: the next shard encodes meanwhile
                for batch in self._samples(crops, metas):
                    if "error" in result:
                        break
                    q.put(batch)
            ok = True
        finally:
            q.put(_END if ok else _ABORT)
            t.join()  # the shard is whole (tar, sidecar) before Ray hears of it, so the driver's count is true
        if "error" in result:
            raise result["error"]
        return result["side"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        res = {"shard": [], "nsamples": [], "nskipped": []}
        for j in range(len(batch["shard"])):
            plan = ShardPlan(int(batch["shard"][j]), ())
            meta = json.loads(str(batch["meta"][j]))
            n, r = int(batch["n"][j]), self.cfg.resolution
            crops = np.frombuffer(batch["images"][j], dtype=np.uint8).reshape(n, r, r, 3).copy()  # writable
            side = self._encode_and_write(plan, crops, meta["samples"], meta["skipped"])
            res["shard"].append(plan.index)
            res["nsamples"].append(side["nsamples"])
            res["nskipped"].append(len(meta["skipped"]))
        return res


_END, _ABORT = object(), object()  # writer-queue sentinels


def cpu_threads_default() -> int:
    """Threads for the CPU actor: fixed, so numerics do not depend on the machine's load."""
    return int(os.environ.get("REPA_ENCODE_THREADS", "1"))
