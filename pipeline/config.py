"""The one settings object of `python -m pipeline extract`: built by the CLI, validated once, handed as is to the
encoder actors (DESIGN §3, §8)."""
from __future__ import annotations

from dataclasses import dataclass, field

from common import check
from manifests.codecs import DEFAULT_CODEC, get_codec
from manifests.preprocess import CROP_FLAGS

from .presets import ENCODERS, TEXT_ENCODERS, VAES, parse_spec

RESOLUTIONS = (128, 256, 512)  # 128: the CPU demo (an 8x8 token grid for the tiny encoders and SiT/2)
# default: REPA's numerics (its EDM2-derived dataset_tools.py encodes with the VAE in fp32 under PyTorch's default
# TF32 convolutions; its train.py runs the encoders under fp16 autocast); fast: bf16 autocast for both (never fp16
# for the VAE: its mean reaches |mu| > 16); fp32: no autocast and no TF32.
PRECISIONS = ("default", "fast", "fp32")


@dataclass(kw_only=True)
class ExtractConfig:
    """`python -m pipeline extract` settings."""
    source: str
    out: str
    resolution: int = 256
    vae: str = "sd-vae-ft-ema"
    encoders: list[str] = field(default_factory=lambda: ["dinov2-vit-b"])
    shard_size: int = 1000
    batch_size: int = 64  # images per encoder forward pass
    hflip: bool = False
    feature_dtype: str = DEFAULT_CODEC  # the token codec (manifests/codecs.py), recorded as each field's token_codec
    limit: int | None = None
    num_gpus: int | None = None  # GPU actors; None: every GPU in the cluster (one CPU actor without GPUs)
    num_cpus: int | None = None  # local Ray only; None: all cores
    cpu_actors: int = 1  # encoder actors when the cluster has no GPU (several write shards concurrently)
    precision: str = "default"  # PRECISIONS
    verify: bool = False
    name: str | None = None
    ray_address: str | None = None  # None: RAY_ADDRESS (set by `ray job submit`), else a new local Ray
    # Text-to-image (DESIGN §9): COCO captions file (None: captions from the tars' txt/json members), the caption
    # encoder, the contexts' token codec, and the crop (None: uvit with a text encoder, U-ViT's COCO protocol;
    # else adm, ADM's ImageNet protocol).
    captions: str | None = None
    text_encoder: str | None = None
    context_dtype: str = DEFAULT_CODEC
    crop: str | None = None  # CROP_FLAGS key: 'adm' | 'uvit'

    @property
    def crop_name(self) -> str:
        """The manifest's `preprocess.crop` (a key of manifests.preprocess.CROPS)."""
        return CROP_FLAGS[self.crop or ("uvit" if self.text_encoder else "adm")]

    def validate(self) -> None:
        """Every bad value is a one-line UserError naming the flag; the only place settings are checked."""
        check(self.resolution in RESOLUTIONS, f"--resolution must be one of {RESOLUTIONS}, got {self.resolution}")
        for flag, v in (("--shard-size", self.shard_size), ("--batch-size", self.batch_size)):
            check(v > 0, f"{flag} must be a positive count, got {v}")
        check(self.limit is None or self.limit > 0, f"--limit must be a positive count, got {self.limit}")
        check(self.num_gpus is None or self.num_gpus >= 0, f"--num-gpus must be >= 0, got {self.num_gpus}")
        check(self.num_cpus is None or self.num_cpus > 0, f"--num-cpus must be positive, got {self.num_cpus}")
        check(self.cpu_actors > 0, f"--cpu-actors must be a positive count, got {self.cpu_actors}")
        get_codec(self.feature_dtype, "--feature-dtype")  # a token codec this version knows
        check(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}")
        check(len(self.encoders) > 0, "--encoders needs at least one encoder name")
        vname, _ = parse_spec(self.vae)
        check(vname in VAES, f"unknown VAE '{vname}' (--vae); choose one of: {', '.join(sorted(VAES))}")
        names = [parse_spec(e)[0] for e in self.encoders]
        for n in names:
            check(n in ENCODERS, f"unknown encoder '{n}' (--encoders); choose from: {', '.join(sorted(ENCODERS))}")
        check(len(set(names)) == len(names), f"--encoders lists an encoder twice: {','.join(names)}")
        check(self.crop is None or self.crop in CROP_FLAGS,
              f"--crop must be one of {', '.join(CROP_FLAGS)}, got {self.crop!r}")
        get_codec(self.context_dtype, "--context-dtype")
        if self.text_encoder is not None:
            tname = parse_spec(self.text_encoder)[0]
            check(tname in TEXT_ENCODERS, f"unknown text encoder '{tname}' (--text-encoder); choose one of: "
                                          f"{', '.join(sorted(TEXT_ENCODERS))}")
        check(not self.captions or self.text_encoder,
              "--captions needs --text-encoder (clip-vit-l-text: U-ViT's CLIP ViT-L/14 contexts)")


def content_settings(cfg: ExtractConfig) -> dict:
    """The settings that decide shard bytes (not --num-gpus, --verify or --limit itself)."""
    s = {"resolution": cfg.resolution, "vae": cfg.vae, "encoders": cfg.encoders, "shard_size": cfg.shard_size,
         "batch_size": cfg.batch_size, "hflip": cfg.hflip, "feature_dtype": cfg.feature_dtype,
         "precision": cfg.precision}
    if cfg.crop_name != "adm-center":  # only when set, so sets extracted before these settings keep their fingerprint
        s["crop"] = cfg.crop_name
    if cfg.text_encoder:
        s.update(text_encoder=cfg.text_encoder, context_dtype=cfg.context_dtype)
    return s
