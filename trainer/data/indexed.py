"""The training loader: micro-batches read by tar offsets into reused shared rings (index and order: index.py)."""
from __future__ import annotations

import os
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from manifests import Manifest
from common import UserError, check
from manifests.codecs import CODECS, decode, field_codec, scale_field
from manifests.shards import CLS, npy_ext, read_npy_header

from trainer.data.context import ContextReads, ContextSpec, cond_to_device, resolve_context  # noqa: F401
from trainer.data.index import ShardIndex, StepSampler, build_index, epoch_permutation  # noqa: F401 (re-exported)
from trainer.loop.steprng import flip_bits

LATENT = "latent"
PREFETCH = 4  # batches in flight per loader worker
MAX_GAP = 16 << 10  # bytes of unwanted members a coalesced read may carry rather than split
RING_EXTRA = 2  # spare ring buffers beyond those in flight: the one in use by the step, and one of margin


@dataclass
class DataSpec:
    """What the manifest says the model must look like; checked before step 0."""
    in_channels: int
    input_size: int
    num_classes: int
    encoders: list[str]
    z_dims: list[int]
    tokens: int
    scale: float
    shift: float
    vae: str
    resolution: int
    classes: list[str] = field(default_factory=list)
    enc_dtypes: list[str] = field(default_factory=list)  # stored (.npy) dtype per encoder field
    enc_codecs: list[str] = field(default_factory=list)  # token codec per encoder field (manifests/codecs.py)
    context: ContextSpec | None = None  # text families: the caption-context field (trainer/data/context.py)


def resolve_fields(m: Manifest, encoders: list[str] | None, patch_size: int, hflip: bool,
                   conditioning: str = "class", model: str = "") -> DataSpec:
    """Check the fields this run needs against the model geometry; every mismatch is a one-line UserError.

    `conditioning` is the family's: "class" needs the class list (and no caption context), "text" a context field.
    """
    lat = m.field(LATENT, hint="VAE moments from `pipeline extract`")
    shape = list(lat.get("shape", []))
    check(len(shape) == 3 and shape[0] % 2 == 0 and shape[1] == shape[2],
          f"manifest field 'latent' has shape {shape}, expected [2*C, H, H] VAE moments (mean then std)")
    check(lat.get("dtype") == "float32", f"manifest field 'latent' has dtype {lat.get('dtype')}, expected float32")
    c2, h, _ = shape
    check(h % patch_size == 0, f"manifest field 'latent' has size {h}, not divisible by the model's patch {patch_size}")
    tokens = (h // patch_size) ** 2
    if encoders is None:
        encoders = sorted(m.encoder_fields())
    z_dims, dtypes, codecs = [], [], []
    for name in encoders:
        spec = m.field(name, hint=f"--encoders {','.join(encoders)}")
        es = list(spec.get("shape", []))
        check(len(es) == 2, f"manifest field '{name}' has shape {es}, expected [tokens, dim] patch tokens")
        check(es[0] == tokens, f"manifest field '{name}' has shape {es}, model expects {tokens} tokens "
                               f"({h}x{h} latent, patch {patch_size}); choose a model with a matching patch size")
        codec = field_codec(name, spec, f"manifest {m.path}")
        z_dims.append(int(es[1]))
        dtypes.append(codec.storage)
        codecs.append(codec.name)
    if hflip:
        check(bool(m.preprocess.get("hflip")), f"--hflip: manifest {m.path} has no flipped twins "
                                                f"(extract with --hflip)")
    context = resolve_context(m, conditioning, model or "?")
    if context is None:
        check(len(m.classes) > 0, f"manifest {m.path}: 'repa.classes' is empty; the trainer needs the class list")
    check(m.num_samples > 0, f"manifest {m.path} holds no samples")
    vae = lat.get("vae", {}) or {}
    return DataSpec(in_channels=c2 // 2, input_size=h, num_classes=len(m.classes), encoders=list(encoders),
                    z_dims=z_dims, tokens=tokens, scale=float(vae.get("scaling_factor", 0.18215)),
                    shift=float(vae.get("shift", 0.0)), vae=str(vae.get("name", "sd-vae-ft-ema")),
                    resolution=int(m.preprocess.get("resolution", h * 8)), classes=list(m.classes),
                    enc_dtypes=dtypes, enc_codecs=codecs, context=context)


_TORCH_DTYPES = {np.dtype(k): getattr(torch, k) for k in ("float16", "float32", "int8", "uint8")}


def tokens_to_device(batch: dict[str, Any], device: torch.device) -> list[torch.Tensor]:
    """The batch's token fields as float32 on `device`: 8-bit codes and their scales cross the bus, then decode."""
    return [decode(z.to(device, non_blocking=True), None if s is None else s.to(device, non_blocking=True),
                   CODECS[c]) for z, s, c in zip(batch["zs"], batch["zscales"], batch["codecs"])]  # (n, T, D) each


def nonfinite_rows(x: torch.Tensor, zs: list[torch.Tensor], names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """Per input field, a (n,) bool tensor of samples holding NaN/inf; computed on the device, read only on trouble."""
    out = [(LATENT, ~torch.isfinite(x).flatten(1).all(1))]
    return out + [(name, ~torch.isfinite(z).flatten(1).all(1)) for name, z in zip(names, zs)]


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype).share_memory_()


# Main process: datasets whose loader workers write into rings made here before they started (see RingRef).
_SHARED_RINGS: "weakref.WeakValueDictionary[str, FeatureBatches]" = weakref.WeakValueDictionary()


class RingRef:
    """Where a loader worker left a batch: slot `slot` of worker `worker`'s ring, made in shared memory by the main
    process before the workers started. Only this crosses the worker queue: sending the tensors themselves costs a
    file-descriptor handshake per tensor (a socket connection and an HMAC challenge), which was most of the main
    process's time per batch."""
    __slots__ = ("key", "worker", "slot", "n")

    def __init__(self, key: str, worker: int, slot: int, n: int):
        self.key, self.worker, self.slot, self.n = key, worker, slot, n

    def tensors(self) -> dict[str, Any]:
        """The batch's arrays: views of the ring slot (main process only)."""
        x, zs, scales, tag, y, ctx = _SHARED_RINGS[self.key]._shared[self.worker][self.slot]
        n = self.n
        out = {"x": x[:n], "y": y[:n], "zs": [z[:n] for z in zs], "tag": tag,
               "zscales": [None if s is None else s[:n] for s in scales]}
        if ctx is not None:  # text: "y" carries the caption contexts as stored (trainer/data/context.py)
            out.update(y=ctx[0][:n], yscale=None if ctx[1] is None else ctx[1][:n])
        return out

    def pin_memory(self, device: Any = None) -> dict[str, Any]:
        """Called by the DataLoader's pin thread (CUDA): page-locked copies, so the slot may be reused at once.
        (`device` is accepted for torch versions that pass one; pinned host memory serves every device.)"""
        t = self.tensors()
        out = {"x": t["x"].pin_memory(), "y": t["y"].pin_memory(), "zs": [z.pin_memory() for z in t["zs"]],
               "zscales": [None if s is None else s.pin_memory() for s in t["zscales"]], "tag": t["tag"].clone()}
        if "yscale" in t:
            out["yscale"] = None if t["yscale"] is None else t["yscale"].pin_memory()
        return out


class FeatureBatches(ContextReads, torch.utils.data.Dataset):
    """Reads one micro-batch by tar offsets: VAE moments (the step draws the latent on the device), labels (or, for
    text families, one caption's context: trainer/data/context.py), tokens.

    Token fields are shipped as stored (float16, or 8-bit codes plus a float16 scale per token); the train step
    decodes them on the device with `tokens_to_device`, so host and host-to-device copies carry the stored bytes.
    """

    def __init__(self, index: ShardIndex, spec: DataSpec, seed: int, hflip: bool):
        self.index, self.spec, self.seed, self.hflip = index, spec, seed, hflip
        self.codecs = [CODECS[c] for c in (spec.enc_codecs or ["float16"] * len(spec.encoders))]
        self.enc_dtypes = [np.dtype(c.storage) for c in self.codecs]
        self._fds: dict[int, int] = {}
        self._headers: dict[str, bytes] = {}
        # Per flip: the members a sample needs, as (ext, kind, encoder index); their offsets sit in one array, so
        # one lookup per sample finds them all.
        self._wanted = {f: [(npy_ext(LATENT, f), "x", -1), (CLS, "y", -1)]
                        + [(npy_ext(n, f), "z", k) for k, n in enumerate(spec.encoders)]
                        + [(npy_ext(scale_field(n), f), "s", k) for k, (n, c) in
                           enumerate(zip(spec.encoders, self.codecs)) if c.scaled] for f in (False, True)}
        cols = sorted({ext for f in self._wanted for ext, _, _ in self._wanted[f] if ext in index.members})
        self._col = {ext: i for i, ext in enumerate(cols)}
        self._offsets = np.stack([index.members[e] for e in cols], 1) if len(index) else None  # (N, E, 2)
        self._gap = bytearray(MAX_GAP)  # tar headers and padding between wanted members land here
        self._cls = bytearray(64)
        self.ring_size = RING_EXTRA  # make_loader sets prefetch_factor + RING_EXTRA for workers
        self._ring: dict[int, list] = {}
        self._next: dict[int, int] = {}
        self._shared: list[list] | None = None  # per worker, its ring in memory the main process shares (RingRef)
        self._ring_key, self._shared_next = "", 0

    def _fd(self, sid: int) -> int:
        si = int(self.index.shard[sid])
        fd = self._fds.get(si)
        if fd is None:  # one fd per shard and worker; pread keeps reads independent of a file position
            fd = self._fds[si] = os.open(self.index.paths[si], os.O_RDONLY)
        return fd

    def _where(self, sid: int, ext: str) -> str:
        return f"shard {self.index.paths[int(self.index.shard[sid])]}: member '{self.index.keys[sid]}.{ext}'"

    def _read(self, sid: int, ext: str) -> bytes:
        off, size = self.index.members[ext][sid]
        data = os.pread(self._fd(sid), int(size), int(off))
        if len(data) != size:
            raise UserError(f"{self._where(sid, ext)} is truncated")
        return data

    def _read_npy_into(self, sid: int, ext: str, out: np.ndarray) -> None:
        """Read a member's .npy header and array bytes in one syscall, the bytes straight into `out`.

        Every sample of a field has the same header, so it is parsed once per field and then compared.
        """
        off, size = (int(v) for v in self.index.members[ext][sid])
        fd = self._fd(sid)
        known = self._headers.get(ext)
        if known is None or size != len(known) + out.nbytes:
            known = self._parse_header(fd, sid, ext, off, size, out)
        head = bytearray(len(known))
        got = os.preadv(fd, [head, memoryview(out).cast("B")], off)
        if got != size or head != known:
            self._parse_header(fd, sid, ext, off, size, out)  # names the culprit
            raise UserError(f"{self._where(sid, ext)} is truncated or malformed")

    def _parse_header(self, fd: int, sid: int, ext: str, off: int, size: int, out: np.ndarray) -> bytes:
        return self._check_header(os.pread(fd, min(size, 4096), off), sid, ext, size, out)

    def _check_header(self, data: bytes, sid: int, ext: str, size: int, out: np.ndarray) -> bytes:
        """Validate a member's .npy header (from its first bytes) against `out`; cache and return the header."""
        shape, dtype, fortran, hlen = read_npy_header(data, self._where(sid, ext))
        if shape != out.shape or dtype != out.dtype or fortran:
            raise UserError(f"{self._where(sid, ext)} has shape {list(shape)} {dtype}, the manifest says "
                            f"{list(out.shape)} {out.dtype}")
        if size != hlen + out.nbytes:
            raise UserError(f"{self._where(sid, ext)} has {size} bytes, expected {hlen + out.nbytes}")
        self._headers[ext] = data[:hlen]
        return self._headers[ext]

    def __getitem__(self, item: tuple[int, np.ndarray, np.ndarray]) -> dict[str, Any]:
        step, positions, ids = item
        n = len(ids)
        worker = torch.utils.data.get_worker_info()
        ref = None
        if self._shared is not None and worker is not None:
            ring = self._shared[worker.id]
            k = self._shared_next
            self._shared_next = (k + 1) % len(ring)
            x, zs, scales, tag, yb, ctx = ring[k]
            x, zs, scales = x[:n], [z[:n] for z in zs], [None if s is None else s[:n] for s in scales]
            ref = RingRef(self._ring_key, worker.id, k, n)
        else:
            x, zs, scales, tag, ctx = self._slot(n)
        if ctx is not None:
            ctx = (ctx[0][:n], None if ctx[1] is None else ctx[1][:n])
        xn, zn = x.numpy(), [z.numpy() for z in zs]
        sn = [None if s is None else s.numpy() for s in scales]
        cls = []
        # Flips hash the global position (seed, step*batch + index): independent of the worker, the rank and
        # the micro-batch size, so the data stream is a pure function of (seed, step) and resumes exactly.
        flips = flip_bits(self.seed, positions) & self.hflip
        for j, sid in enumerate(ids):
            # (2C, H, W) moments: mean then std; (T, D) values or 8-bit codes and their (T,) float16 scales
            outs = {"x": [xn[j]], "z": [z[j] for z in zn], "s": [None if s is None else s[j] for s in sn]}
            cls.append(self._read_sample(int(sid), bool(flips[j]), outs))
        self._check_scales(sn, ids, flips)
        keys = [str(self.index.keys[int(i)]) for i in ids]
        tag.fill_(int(positions[0]))
        out = {"step": step, "codecs": [cd.name for cd in self.codecs], "keys": keys, "pos0": int(positions[0])}
        if ctx is not None:  # text: the chosen captions' contexts, shipped as stored, decoded by cond_to_device
            out.update(captions=self.read_contexts(ids, positions, ctx), ycodec=self.spec.context.codec)
        if ref is not None:  # the arrays stay in the shared ring; the loader rebuilds them in the main process
            yb[:n] = torch.tensor(cls, dtype=torch.int64)
            return {**out, "ring": ref}
        y = {"y": torch.tensor(cls, dtype=torch.int64)} if ctx is None else {"y": ctx[0], "yscale": ctx[1]}
        return {**out, "x": x, **y, "zs": zs, "zscales": scales, "tag": tag}

    def _read_sample(self, sid: int, flip: bool, outs: dict[str, list]) -> int:
        """Read one sample's wanted members into `outs` with one preadv per run of nearby members; return its label.

        A sample's members sit together in the tar, so one syscall carries the tar headers and .npy headers into
        scratch and the arrays straight into the ring. Anything unexpected (an unseen header, a short read, a
        changed header) falls back to member-by-member reads, which name the culprit.
        """
        rows = self._offsets[sid].tolist()  # [[offset, size], ...] per column
        plan = []
        for ext, kind, k in self._wanted[flip]:
            off, size = rows[self._col[ext]]
            if kind == "y":
                if size > len(self._cls):
                    return self._read_members(sid, flip, outs)
                plan.append((off, size, None, self._cls))
                continue
            out = outs[kind][0 if kind == "x" else k]
            head = self._headers.get(ext)
            if head is None or size != len(head) + out.nbytes:
                return self._read_members(sid, flip, outs)  # first sample of a field, or a malformed member
            plan.append((off, size, head, out))
        plan.sort(key=lambda r: r[0])
        fd, checks, bufs, start, end = self._fd(sid), [], [], plan[0][0], plan[0][0]
        for off, size, head, out in plan:
            if off - end > MAX_GAP or off < end:
                if os.preadv(fd, bufs, start) != end - start:
                    return self._read_members(sid, flip, outs)
                bufs, start = [], off
            elif off > end:
                bufs.append(memoryview(self._gap)[:off - end])
            if head is None:
                bufs.append(memoryview(out)[:size])
            else:
                got = bytearray(len(head))
                checks.append((got, head))
                bufs += [got, memoryview(out).cast("B")]
            end = off + size
        if os.preadv(fd, bufs, start) != end - start or any(got != head for got, head in checks):
            return self._read_members(sid, flip, outs)
        return self._label(sid, bytes(self._cls[:rows[self._col[CLS]][1]]))

    def _read_members(self, sid: int, flip: bool, outs: dict[str, list]) -> int:
        """Member-by-member reads with every check and a one-line error naming the culprit; return the label."""
        for ext, kind, k in self._wanted[flip]:
            if kind != "y":
                out = outs[kind][0 if kind == "x" else k]
                if out is not None:
                    self._read_npy_into(sid, ext, out)
        return self._label(sid, self._read(sid, CLS))

    def _label(self, sid: int, data: bytes) -> int:
        try:
            return int(data)
        except ValueError:
            raise UserError(f"{self._where(sid, CLS)} holds {data[:20]!r}, not a class index") from None

    def _check_scales(self, sn: list[np.ndarray | None], ids: np.ndarray, flips: np.ndarray) -> None:
        """A NaN/inf scale would poison every value of its token: stop, naming the shard and sample."""
        for name, s in zip(self.spec.encoders, sn):
            bad = None if s is None else ~np.isfinite(s).all(1)  # (n,)
            if bad is not None and bad.any():
                j = int(bad.nonzero()[0][0])
                ext = npy_ext(scale_field(name), bool(flips[j]))
                raise UserError(f"{self._where(int(ids[j]), ext)} holds a non-finite scale (corrupt shard?)")

    def share_rings(self, workers: int, n: int) -> None:
        """Make each loader worker's ring here, in shared memory, before the workers start (see RingRef)."""
        sp = self.spec
        self._shared = [[(_shared_empty((n, 2 * sp.in_channels, sp.input_size, sp.input_size), torch.float32),
                          [_shared_empty((n, sp.tokens, d), _TORCH_DTYPES[self.enc_dtypes[k]])
                           for k, d in enumerate(sp.z_dims)],
                          [_shared_empty((n, sp.tokens), torch.float16) if cd.scaled else None for cd in self.codecs],
                          _shared_empty((1,), torch.int64), _shared_empty((n,), torch.int64),
                          self.ctx_buffers(n, _shared_empty))
                         for _ in range(self.ring_size)] for _ in range(workers)]
        self._ring_key = uuid.uuid4().hex
        _SHARED_RINGS[self._ring_key] = self

    def _slot(self, n: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor | None], torch.Tensor,
                                     tuple | None]:
        """The next buffer of a ring that is reused instead of allocated per batch.

        Fresh memory costs a page fault per 4 KiB, which made the loader 5x slower than a raw read. A DataLoader
        keeps at most `prefetch_factor` batches of a worker in flight, so a worker's batch k is only written
        again RING_EXTRA batches after the consumer has moved past it. Workers of `make_loader` use the rings of
        `share_rings` instead (same sizes, made before they start); a worker without them gets its own ring in
        shared memory. `tag` lets the loop check that a batch was not overwritten.
        """
        if n not in self._ring:
            sp = self.spec
            shared = torch.utils.data.get_worker_info() is not None
            alloc = _shared_empty if shared else _empty
            self._ring[n] = [(alloc((n, 2 * sp.in_channels, sp.input_size, sp.input_size), torch.float32),
                              [alloc((n, sp.tokens, d), _TORCH_DTYPES[self.enc_dtypes[k]])
                               for k, d in enumerate(sp.z_dims)],
                              [alloc((n, sp.tokens), torch.float16) if cd.scaled else None for cd in self.codecs],
                              alloc((1,), torch.int64), self.ctx_buffers(n, alloc))
                             for _ in range(self.ring_size)]
            self._next[n] = 0
        slot = self._ring[n][self._next[n]]
        self._next[n] = (self._next[n] + 1) % self.ring_size
        return slot

    def __len__(self) -> int:  # unused by the sampler-driven loader; required by Dataset users
        return len(self.index)


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader whose worker-side UserErrors (a corrupt member, say) stay one line, as in the main process."""

    def __iter__(self):
        try:
            for batch in super().__iter__():
                ref = batch.pop("ring", None)  # a RingRef, or its pinned copies (RingRef.pin_memory)
                if ref is not None:
                    batch.update(ref if isinstance(ref, dict) else ref.tensors())
                yield batch
        except UserError as e:
            # torch re-raises a worker's exception with its traceback in the message: keep the last line only.
            last = str(e).strip().splitlines()[-1]
            raise UserError(last.split("UserError: ", 1)[-1]) from None


def make_loader(ds: FeatureBatches, sampler: StepSampler, num_workers: int, pin: bool):
    """A DataLoader over micro-batches; its own generator so the global RNG is untouched (exact resume)."""
    ds.ring_size = (PREFETCH + RING_EXTRA) if num_workers > 0 else RING_EXTRA
    if num_workers > 0 and isinstance(ds, FeatureBatches):
        ds.share_rings(num_workers, sampler.micro)
    return _Loader(ds, batch_size=None, sampler=sampler, num_workers=num_workers, pin_memory=pin,
                   persistent_workers=False, prefetch_factor=PREFETCH if num_workers > 0 else None,
                   generator=torch.Generator().manual_seed(0))


def needed_exts(spec: DataSpec, hflip: bool) -> list[str]:
    """Members every sample must have: latent, cls, each token field and its scale if the codec has one."""
    codecs = spec.enc_codecs or ["float16"] * len(spec.encoders)
    fields = [LATENT] + list(spec.encoders) + [scale_field(e) for e, c in zip(spec.encoders, codecs)
                                                 if CODECS[c].scaled]
    exts = [npy_ext(f) for f in fields] + [CLS]
    if hflip:
        exts += [npy_ext(f, True) for f in fields]
    return exts + (spec.context.exts() if spec.context is not None else [])  # contexts are never flipped


__all__ = ["DataSpec", "resolve_fields", "RingRef", "ShardIndex", "build_index", "epoch_permutation", "StepSampler", "nonfinite_rows",
           "FeatureBatches", "make_loader", "needed_exts", "tokens_to_device", "cond_to_device"]
