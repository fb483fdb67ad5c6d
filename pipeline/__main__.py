"""CLI: `python -m pipeline synth|extract|convert|verify` (DESIGN §3, §8)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from common import run_cli
from manifests.codecs import CODECS, DEFAULT_CODEC
from common.cli import ArgumentParser, HelpFormatter

EXAMPLES = """examples:
  python -m pipeline synth --out data/synth --classes 10 --per-class 20
  python -m pipeline extract --source data/synth --out data/feat --vae tiny-vae --encoders tiny-dinov2,tiny-siglip
  python -m pipeline extract --source /data/imagenet/train --out /data/in256 --encoders dinov2-vit-b --hflip
  ray job submit --working-dir . -- python -m pipeline extract --source /nfs/in/train --out /nfs/in256
  python -m pipeline convert --manifest /data/in256-fp16 --out /data/in256 --feature-dtype int8
  python -m pipeline verify /data/in256
"""


def _count(s: str) -> int:
    """An integer; the range check (positive) is done by the job so the message names the flag."""
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def _precision(s: str) -> str:
    return {"auto": "default", "bf16": "fast"}.get(s, s)


def build_parser() -> argparse.ArgumentParser:
    from .presets import ENCODERS
    from .worker import PRECISIONS
    p = ArgumentParser(prog="python -m pipeline", description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="write the embedded synthetic ImageFolder", formatter_class=HelpFormatter,
                       epilog=EXAMPLES)
    s.add_argument("--out", required=True, help="output folder (ImageFolder: OUT/<wnid>/*.JPEG)")
    s.add_argument("--classes", type=_count, default=10, help="number of classes")
    s.add_argument("--per-class", type=_count, default=20, help="images per class")
    s.add_argument("--seed", type=int, default=0, help="random seed")

    e = sub.add_parser("extract", help="images -> VAE moments + encoder tokens in WebDataset shards",
                       formatter_class=HelpFormatter, epilog=EXAMPLES)
    io = e.add_argument_group("input and output")
    io.add_argument("--source", required=True, help="ImageFolder root (class folders) or folder of jpg+cls tars")
    io.add_argument("--out", required=True, help="output folder: manifest.json + shards/")
    io.add_argument("--name", default=None, help="manifest name (None: <source folder name><res>-features)")
    io.add_argument("--limit", type=_count, default=None, help="use N inputs spread evenly over the sorted list (None: all)")
    io.add_argument("--shard-size", type=_count, default=1000, help="inputs per shard")
    io.add_argument("--verify", action="store_true", help="re-hash finished shards before trusting them, "
                                                          "and verify the manifest's sha256 at the end")
    mo = e.add_argument_group("models and preprocessing")
    mo.add_argument("--resolution", type=int, default=256, help="ADM centre-crop size: 256 or 512 (128 for the CPU demo)")
    mo.add_argument("--vae", default="sd-vae-ft-ema", help="VAE preset NAME or NAME=PATH (sd-vae-ft-ema, "
                                                          "sd-vae-ft-mse, tiny-vae, pixel-vae)")
    mo.add_argument("--encoders", default="dinov2-vit-b",
                    help=f"comma list of NAME or NAME=PATH; names: {', '.join(sorted(ENCODERS))}")
    mo.add_argument("--hflip", action="store_true", help="also store horizontally flipped twins (*.flip.npy)")
    mo.add_argument("--feature-dtype", default=DEFAULT_CODEC, choices=tuple(CODECS),
                    help="token codec of the stored encoder tokens: int8 and float8_e4m3 keep one float16 scale "
                         "per token (half the bytes of float16; see README 'Compact features'); latent moments "
                         "are always float32")
    ru = e.add_argument_group("execution")
    ru.add_argument("--batch-size", type=_count, default=64, help="images per encoder forward pass")
    ru.add_argument("--num-gpus", type=_count, default=None, help="GPU actors (None: every GPU in the cluster)")
    ru.add_argument("--num-cpus", type=_count, default=None, help="CPUs for a local Ray (None: all cores)")
    ru.add_argument("--cpu-actors", type=_count, default=1, help="encoder actors when the cluster has no GPU "
                                                                 "(each writes its own shards)")
    ru.add_argument("--precision", default="default", type=_precision, choices=PRECISIONS,
                    help="GPU numerics. default: REPA's, the VAE in fp32 (TF32 convolutions, as PyTorch defaults) "
                         "and the encoders under fp16 autocast; fast: bf16 autocast for both (deviation in the "
                         "README); fp32: no autocast, no TF32. On CPU default is fp32 throughout (byte-identical "
                         "re-runs). 'auto' and 'bf16' are accepted for default and fast")
    ru.add_argument("--ray-address", default=None, help="Ray cluster to attach to (None: $RAY_ADDRESS, "
                                                        "else start a local Ray)")

    c = sub.add_parser("convert", help="re-encode a features set's tokens into another codec (no encoder re-run)",
                       formatter_class=HelpFormatter, epilog=EXAMPLES,
                       description="Rewrite a features set with its patch tokens in another codec; latents, labels "
                                   "and every other member are copied byte for byte. Exactly once, like extract: "
                                   "re-running keeps finished shards; the manifest is written last.")
    c.add_argument("--manifest", required=True, help="input features manifest.json (or its folder)")
    c.add_argument("--out", required=True, help="output folder (new manifest.json + shards/); not the input's")
    c.add_argument("--feature-dtype", default=DEFAULT_CODEC, choices=tuple(CODECS), help="target token codec")
    c.add_argument("--workers", type=_count, default=1, help="shards converted in parallel processes")
    c.add_argument("--name", default=None, help="manifest name (None: <input name>-<codec>)")
    c.add_argument("--verify", action="store_true", help="check the input's sha256 first and the output's at the end")

    v = sub.add_parser("verify", help="check a shard set: manifest schema, sizes and sha256",
                       formatter_class=HelpFormatter,
                       description="Check a shard set: manifest schema, shard paths and sizes, and every sha256.",
                       epilog="example:\n  python -m pipeline verify /data/in256")
    v.add_argument("manifest", help="manifest.json or the folder holding it")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "synth":
        from .synth import synthesize
        paths = synthesize(args.out, classes=args.classes, per_class=args.per_class, seed=args.seed)
        print(f"wrote {len(paths)} JPEGs in {args.classes} classes to {args.out}")
        return 0
    if args.cmd == "verify":
        from manifests import load_manifest
        m = load_manifest(args.manifest, verify=True)
        print(f"ok: {m.path}: {len(m.shardlist)} shards, {m.num_samples} samples, sha256 verified")
        return 0
    if args.cmd == "convert":
        from .convert import ConvertConfig, run_convert
        path = run_convert(ConvertConfig(manifest=args.manifest, out=args.out, feature_dtype=args.feature_dtype,
                                         workers=args.workers, verify=args.verify, name=args.name))
        _summary(path)
        return 0
    from .job import ExtractConfig, run_extract
    cfg = ExtractConfig(source=args.source, out=args.out, resolution=args.resolution, vae=args.vae,
                        encoders=[x for x in args.encoders.split(",") if x.strip()], shard_size=args.shard_size,
                        batch_size=args.batch_size, hflip=args.hflip, feature_dtype=args.feature_dtype,
                        limit=args.limit, num_gpus=args.num_gpus, num_cpus=args.num_cpus, precision=args.precision,
                        verify=args.verify, name=args.name, ray_address=args.ray_address, cpu_actors=args.cpu_actors)
    path = run_extract(cfg)
    _summary(path)
    return 0


def _summary(path) -> None:
    from manifests import load_manifest
    m = load_manifest(path)
    fields = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in m.fields.items())
    print(f"wrote {m.path}: {m.num_samples} samples in {len(m.shardlist)} shards, {len(m.skipped)} skipped, "
          f"{m.extra.get('stats', {}).get('bytes_per_sample', 0) / 1024:.1f} KiB/sample; fields: {fields}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
