"""CLI: `python -m pipeline synth|extract|convert|verify` (DESIGN §3, §8; flag convention: docs/cli.md)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from common import UserError, run_cli
from common.cli import (ArgumentParser, Command, HelpFormatter, comma_list, dispatch, flag, nonneg_int, positive_int,
                        print_config)
from common.config_file import add_run_flags, config_values
from manifests.codecs import CODECS, DEFAULT_CODEC

EXAMPLES = """examples:
  python -m pipeline synth --out data/synth --classes 10 --per-class 20
  python -m pipeline extract --source data/synth --out data/feat --vae tiny-vae --encoders tiny-dinov2,tiny-siglip
  python -m pipeline extract --source /data/imagenet/train --out /data/in256 --encoders dinov2-vit-b --store-hflip
  python -m pipeline extract --source /data/coco/train2014 --captions /data/coco/annotations/captions_train2014.json \
      --out /data/coco256 --crop uvit --text-encoder clip-vit-l-text --encoders dinov2-vit-b
  python -m pipeline extract --source data/synth --captions data/synth/captions.json --out data/synth-t2i \
      --vae tiny-vae --encoders tiny-dinov2 --text-encoder tiny-clip-text
  ray job submit --working-dir . -- python -m pipeline extract --source /nfs/in/train --out /nfs/in256
  python -m pipeline convert --manifest /data/in256-fp16 --out /data/in256 --feature-dtype int8
  python -m pipeline verify /data/in256
"""


@dataclass(kw_only=True)
class SynthConfig:
    """`python -m pipeline synth` settings."""
    out: str = ""
    classes: int = 10
    per_class: int = 20
    seed: int = 0
    captions: str | None = None  # the COCO-layout captions file; None: OUT/captions.json


@dataclass(kw_only=True)
class VerifyConfig:
    """`python -m pipeline verify` settings."""
    manifest: str = ""


def _precision(s: str) -> str:
    return {"auto": "default", "bf16": "fast"}.get(s, s)


def _sub(name: str, description: str, epilog: str = EXAMPLES) -> argparse.ArgumentParser:
    return ArgumentParser(prog=f"python -m pipeline {name}", description=description, epilog=epilog,
                          formatter_class=HelpFormatter)


def synth_parser() -> argparse.ArgumentParser:
    d = SynthConfig()
    s = _sub("synth", "Write the embedded synthetic ImageFolder (a few JPEGs per class, some grayscale and CMYK).")
    s.add_argument("--out", help="output folder (ImageFolder: OUT/<wnid>/*.JPEG); required")
    s.add_argument("--classes", type=positive_int, default=d.classes, help="number of classes")
    s.add_argument("--per-class", type=positive_int, default=d.per_class, help="images per class")
    s.add_argument("--seed", type=int, default=d.seed, help="random seed")
    s.add_argument("--captions", default=None, metavar="FILE",
                   help="where to write the captions (MS-COCO annotation layout, three per image, file names "
                        "relative to --out) for `extract --captions` (None: OUT/captions.json)")
    add_run_flags(s)
    return s


def extract_parser() -> argparse.ArgumentParser:
    from manifests.preprocess import CROP_FLAGS

    from .config import PRECISIONS
    from .presets import ENCODERS, TEXT_ENCODERS
    e = _sub("extract", "Images -> VAE moments + encoder tokens in WebDataset shards and a features manifest.")
    io = e.add_argument_group("input and output")
    io.add_argument("--source", help="ImageFolder root (class folders), folder of jpg+cls tars, or (text-to-image) "
                                     "the COCO image folder or jpg+txt/json tars; required")
    io.add_argument("--out", help="output folder: manifest.json + shards/; required")
    io.add_argument("--name", default=None, help="manifest name (None: <source folder name><res>-features)")
    flag(io, "--num-samples", "--limit", dest="limit", metavar="N", type=positive_int, default=None,
         help="use N inputs spread evenly over the sorted list (None: all)")
    io.add_argument("--shard-size", type=positive_int, default=1000, help="inputs per shard")
    io.add_argument("--verify", action="store_true", help="re-hash finished shards before trusting them, "
                                                          "and verify the manifest's sha256 at the end")
    add_run_flags(io)
    mo = e.add_argument_group("models and preprocessing")
    mo.add_argument("--resolution", type=int, default=256, help="centre-crop size: 256 or 512 (128 for the CPU demo)")
    mo.add_argument("--vae", default="sd-vae-ft-ema", help="VAE preset NAME or NAME=PATH (sd-vae-ft-ema, "
                                                          "sd-vae-ft-mse, tiny-vae, pixel-vae)")
    mo.add_argument("--encoders", type=comma_list, default="dinov2-vit-b",
                    help=f"comma list of NAME or NAME=PATH; names: {', '.join(sorted(ENCODERS))}")
    flag(mo, "--store-hflip", "--hflip", dest="hflip", action="store_true",
         help="also store horizontally flipped twins (*.flip.npy); `trainer train --use-hflip` uses them")
    mo.add_argument("--feature-dtype", default=DEFAULT_CODEC, choices=tuple(CODECS),
                    help="token codec of the stored encoder tokens: int8 and float8_e4m3 keep one float16 scale "
                         "per token (half the bytes of float16; see docs/codecs.md); latent moments "
                         "are always float32")
    mo.add_argument("--crop", default=None, choices=tuple(CROP_FLAGS),
                    help="centre crop, recorded as the manifest's preprocess.crop: adm (ADM/REPA: BOX halving, "
                         "BICUBIC, crop) or uvit (U-ViT's MS-COCO rule: centre square, LANCZOS) (None: uvit with "
                         "--text-encoder, else adm)")
    tx = e.add_argument_group("text-to-image (MS-COCO, docs/pipeline.md#text-to-image)")
    tx.add_argument("--captions", default=None, metavar="ANNOTATIONS.json",
                    help="MS-COCO captions file (captions_train2014.json layout) whose file names are relative to "
                         "--source (None with --text-encoder: captions from the tars' txt/json members)")
    tx.add_argument("--text-encoder", default=None, metavar="NAME[=PATH]",
                    help=f"caption encoder; names: {', '.join(sorted(TEXT_ENCODERS))}; NAME=PATH reads a Hugging Face "
                         f"folder (openai/clip-vit-large-patch14 layout). Stores each caption's context (77, D)")
    tx.add_argument("--context-dtype", default=DEFAULT_CODEC, choices=tuple(CODECS),
                    help="token codec of the stored contexts (the empty caption's context is float32)")
    ru = e.add_argument_group("execution")
    flag(ru, "--micro-batch", "--batch-size", dest="batch_size", metavar="N", type=positive_int, default=64,
         help="images per encoder forward pass on one device (extract has no global batch: each actor streams "
              "its own shards)")
    ru.add_argument("--num-gpus", type=nonneg_int, default=None,
                    help="GPU actors (None: every GPU in the cluster)")
    ru.add_argument("--num-cpus", type=positive_int, default=None, help="CPUs for a local Ray (None: all cores)")
    flag(ru, "--num-workers", "--cpu-actors", dest="cpu_actors", metavar="N", type=positive_int, default=1,
         help="encoder actors when the cluster has no GPU (each writes its own shards)")
    ru.add_argument("--precision", default="default", type=_precision, choices=PRECISIONS,
                    help="GPU numerics. default: REPA's, the VAE in fp32 (TF32 convolutions, as PyTorch defaults) "
                         "and the encoders under fp16 autocast; fast: bf16 autocast for both; fp32: no autocast, "
                         "no TF32. On CPU default is fp32 throughout (byte-identical re-runs). 'auto' and 'bf16' "
                         "are accepted for default and fast")
    ru.add_argument("--ray-address", default=None, help="Ray cluster to attach to (None: $RAY_ADDRESS, "
                                                        "else start a local Ray)")
    return e


def convert_parser() -> argparse.ArgumentParser:
    c = ArgumentParser(prog="python -m pipeline convert", formatter_class=HelpFormatter, epilog=EXAMPLES,
                       description="Rewrite a features set with its patch tokens in another codec; latents, labels "
                                   "and every other member are copied byte for byte. Exactly once, like extract: "
                                   "re-running keeps finished shards; the manifest is written last.")
    c.add_argument("--manifest", help="input features manifest.json (or its folder); required")
    c.add_argument("--out", help="output folder (new manifest.json + shards/); not the input's; required")
    c.add_argument("--feature-dtype", default=DEFAULT_CODEC, choices=tuple(CODECS), help="target token codec")
    flag(c, "--num-workers", "--workers", dest="workers", metavar="N", type=positive_int, default=1,
         help="shards converted in parallel processes")
    c.add_argument("--name", default=None, help="manifest name (None: <input name>-<codec>)")
    c.add_argument("--verify", action="store_true", help="check the input's sha256 first and the output's at the end")
    add_run_flags(c)
    return c


def verify_parser() -> argparse.ArgumentParser:
    v = _sub("verify", "Check a shard set: manifest schema, shard paths and sizes, and every sha256.",
             epilog="example:\n  python -m pipeline verify /data/in256")
    v.add_argument("manifest", nargs="?", help="manifest.json or the folder holding it; required")
    add_run_flags(v)
    return v


def _required(values: dict[str, Any], cmd: str, *names: str) -> None:
    for n in names:
        if not values.get(n):
            shown = n if cmd == "verify" else "--" + n.replace("_", "-")
            raise UserError(f"python -m pipeline {cmd}: {shown} is required (or '{n}' in --config)")


def resolve(cmd: str, argv: Sequence[str]) -> tuple[Any, bool]:
    """argv of one command -> (its typed config, dry_run); defaults < --config file < flags."""
    if cmd == "synth":
        values, dry = config_values(synth_parser(), argv, SynthConfig)
        _required(values, cmd, "out")
        return SynthConfig(**values), dry
    if cmd == "verify":
        values, dry = config_values(verify_parser(), argv, VerifyConfig)
        _required(values, cmd, "manifest")
        return VerifyConfig(**values), dry
    if cmd == "convert":
        from .convert import ConvertConfig
        values, dry = config_values(convert_parser(), argv, ConvertConfig)
        _required(values, cmd, "manifest", "out")
        return ConvertConfig(**values), dry
    if cmd == "extract":
        from .config import ExtractConfig
        values, dry = config_values(extract_parser(), argv, ExtractConfig)
        _required(values, cmd, "source", "out")
        return ExtractConfig(**values), dry
    raise UserError(f"python -m pipeline: unknown command {cmd!r}")


def _runner(cmd: str, run: Callable[[Any], int]) -> Callable[[list[str]], int]:
    def main(argv: list[str]) -> int:
        cfg, dry = resolve(cmd, argv)
        if dry:
            if hasattr(cfg, "validate"):  # a dry run reports the same bad values a real run would
                cfg.validate()
            return print_config(cfg)
        return run(cfg)
    return main


def _synth(cfg: SynthConfig) -> int:
    from .synth import synthesize
    from .synth import CAPTIONS_NAME
    paths = synthesize(cfg.out, classes=cfg.classes, per_class=cfg.per_class, seed=cfg.seed, captions=cfg.captions)
    print(f"wrote {len(paths)} JPEGs in {cfg.classes} classes to {cfg.out}, "
          f"captions to {cfg.captions or f'{cfg.out}/{CAPTIONS_NAME}'}")
    return 0


def _verify(cfg: VerifyConfig) -> int:
    from manifests import load_manifest
    m = load_manifest(cfg.manifest, verify=True)
    print(f"ok: {m.path}: {len(m.shardlist)} shards, {m.num_samples} samples, sha256 verified")
    return 0


def _convert(cfg) -> int:
    from .convert import run_convert
    _summary(run_convert(cfg))
    return 0


def _extract(cfg) -> int:
    from .job import run_extract
    _summary(run_extract(cfg))
    return 0


def _summary(path) -> None:
    from manifests import load_manifest
    m = load_manifest(path)
    fields = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in m.fields.items())
    print(f"wrote {m.path}: {m.num_samples} samples in {len(m.shardlist)} shards, {len(m.skipped)} skipped, "
          f"{m.extra.get('stats', {}).get('bytes_per_sample', 0) / 1024:.1f} KiB/sample; fields: {fields}")


COMMANDS = (
    Command("synth", "write the embedded synthetic ImageFolder", _runner("synth", _synth)),
    Command("extract", "images -> VAE moments + encoder tokens in WebDataset shards", _runner("extract", _extract)),
    Command("convert", "re-encode a features set's tokens into another codec (no encoder re-run)",
            _runner("convert", _convert)),
    Command("verify", "check a shard set: manifest schema, sizes and sha256", _runner("verify", _verify)),
)
PARSERS = {"synth": synth_parser, "extract": extract_parser, "convert": convert_parser, "verify": verify_parser}


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch("python -m pipeline", "Build and check feature shard sets (DESIGN §3).", COMMANDS, argv,
                    epilog=EXAMPLES)


if __name__ == "__main__":
    sys.exit(run_cli(main))
