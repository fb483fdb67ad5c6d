"""The 2015 TF Inception (torch-fidelity's port) with the ADM feature heads: pool3, sFID spatial, IS logits."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from common import UserError
from common.errors import os_error_message
from manifests.io import sha256_file

INPUT_SIZE = 299  # TF Inception input (ADM evaluator, torch-fidelity INPUT_IMAGE_SIZE)
POOL_DIM = 2048  # pool_3:0
LOGIT_DIM = 1008  # softmax/logits over the 2015 graph's 1008 classes
SPATIAL_CHANNELS = 7  # ADM evaluator: mixed_6/conv:0[..., :7]
SPATIAL_GRID = 17  # Mixed_6d runs at 17x17
SPATIAL_DIM = SPATIAL_GRID * SPATIAL_GRID * SPATIAL_CHANNELS  # 2023
# File names the converted weights go by: torch-fidelity's release and pytorch-fid's (same tensors, same keys).
WEIGHT_FILES = (os.path.basename(URL_INCEPTION_V3), "pt_inception-2015-12-05-6726825d.pth")
RANDOM_PREFIX = "random:"


def flatten_spatial(fmap: torch.Tensor) -> torch.Tensor:
    """(N, C, 17, 17) -> NHWC, first 7 channels, flattened in (h, w, c) order: (N, 2023). CHW order is a bug."""
    return fmap.permute(0, 2, 3, 1)[..., :SPATIAL_CHANNELS].reshape(fmap.shape[0], -1)


def default_weights_dir() -> Path:
    """Where torch-fidelity's download lands (torch.hub's checkpoint cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


class _TFInception(FeatureExtractorInceptionV3):
    """torch-fidelity's network, built without its own loader (it downloads, and it unpickles a given file fully)."""
    _building = False

    def __init__(self) -> None:
        empty = io.BytesIO()
        torch.save({}, empty)  # our own empty dict: the library's loader reads it, we load the real weights safely
        empty.seek(0)
        type(self)._building = True
        try:
            super().__init__("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=empty)
        finally:
            type(self)._building = False

    def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: D401 - nn.Module override
        if type(self)._building:
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _random_state_dict(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded He-normal convs, identity batch norms and a small fc: activations neither vanish nor explode."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in net.state_dict().items():
        if name.endswith("conv.weight"):
            fan_in = t[0].numel()
            sd[name] = torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif name == "fc.weight":
            sd[name] = torch.randn(t.shape, generator=g) * (1.0 / t.shape[1]) ** 0.5 * 4.0
        elif name.endswith("running_var") or name.endswith("bn.weight"):
            sd[name] = torch.ones_like(t)
        else:  # bn.bias, running_mean, fc.bias, num_batches_tracked
            sd[name] = torch.zeros_like(t)
    return sd


def _load_weights_file(path: Path, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Read a converted state dict safely and map it onto torch-fidelity's key names."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise UserError(f"Inception weights not found: {path}") from e
    except OSError as e:
        raise UserError(f"cannot read Inception weights {os_error_message(e, path)}") from e
    except Exception as e:  # noqa: BLE001 - unpickling errors of many kinds: one line naming the file
        raise UserError(f"Inception weights {path} are not a plain state dict ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"Inception weights {path} hold a {type(sd).__name__}, expected a state dict")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    want = net.state_dict()
    # Files converted with older torch lack BatchNorm's num_batches_tracked; it is unused in eval mode.
    for k, v in want.items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros_like(v)
    sd = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}  # torchvision aux head: unused
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise UserError(f"Inception weights {path} do not match the 2015 TF Inception: "
                        f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
                        f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}")
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise UserError(f"Inception weights {path}: '{k}' has shape {list(sd[k].shape)}, expected {list(v.shape)}")
    return sd


def resolve_weights(spec: str | None) -> tuple[Path | None, int | None]:
    """`None` -> the cached download, `random:SEED` -> (None, seed), else a path that must exist."""
    if spec and spec.startswith(RANDOM_PREFIX):
        try:
            return None, int(spec[len(RANDOM_PREFIX):])
        except ValueError as e:
            raise UserError(f"--inception-weights {spec!r}: expected random:SEED with an integer SEED") from e
    if spec:
        p = Path(spec).expanduser()
        if not p.is_file():
            raise UserError(f"Inception weights not found: {p}")
        return p, None
    folder = default_weights_dir()
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name, None
    raise UserError(f"Inception weights not found: download {URL_INCEPTION_V3} to {folder / WEIGHT_FILES[0]} "
                    f"(torch-fidelity's cache) or pass --inception-weights PATH")


@dataclass
class Features:
    """One batch of the three ADM feature heads, float32 on the network's device."""
    pool: torch.Tensor  # (N, 2048)
    spatial: torch.Tensor  # (N, 2023)
    logits: torch.Tensor  # (N, 1008)


class InceptionFeatures:
    """uint8 NHWC images -> pool3, sFID spatial features and unbiased logits, in fp32 with TF32 off."""

    def __init__(self, spec: str | None = None, device: str | torch.device = "cpu") -> None:
        path, seed = resolve_weights(spec)
        net = _TFInception()
        if seed is not None:
            sd = _random_state_dict(net, seed)
            self.weights_id, self.weights_sha256, self.comparable = f"random:{seed}", None, False
        else:
            sd = _load_weights_file(path, net)
            self.weights_id, self.weights_sha256, self.comparable = str(path), sha256_file(path), True
        net.load_state_dict(sd)
        self.device = torch.device(device)
        self.net = net.to(self.device).eval().requires_grad_(False)
        if self.device.type == "cpu":
            # oneDNN's own layout (the NHWC input already is): ~25% less CPU per image, mostly in the pools; the
            # same operations, only summed in another order (float32 rounding).
            self.net = self.net.to(memory_format=torch.channels_last)
        self._spatial: torch.Tensor | None = None
        # BasicConv2d returns relu(bn(conv(x))): its output is ADM's post-ReLU `mixed_6/conv:0`.
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._grab_spatial)

    @property
    def cache_id(self) -> str:
        """What identifies the weights in cache keys."""
        return self.weights_sha256 or self.weights_id

    def _grab_spatial(self, module, inputs, output) -> None:
        self._spatial = flatten_spatial(output).float()  # (N, 2023), a copy: later in-place ops can't touch it

    @torch.no_grad()
    def __call__(self, images) -> Features:
        """images: uint8 (N, H, W, 3) array or tensor."""
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3) images, got {x.dtype} {tuple(x.shape)}")
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # ADM ran in fp32
        try:
            with torch.autocast(self.device.type, enabled=False):
                pool, logits = self.net(x)  # (N, 2048), (N, 1008)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        spatial, self._spatial = self._spatial, None
        return Features(pool=pool, spatial=spatial, logits=logits)

