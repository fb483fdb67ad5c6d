"""`python -m evaluation` settings: the typed config, its flags and their resolution (docs/evaluation.md)."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from common import UserError
from common.cli import ArgumentParser, PlainHelpFormatter, comma_list, flag, positive_float, positive_int
from common.config_file import add_run_flags, config_values
from common.device import DEVICE_HELP, device_flag

from evaluation.cache import DEFAULT_CACHE_GB

EXAMPLE = """examples:
  python -m evaluation --samples samples/ --reference VIRTUAL_imagenet256_labeled.npz --out report.json
  python -m evaluation --samples samples.npz --reference feats/ --inception-weights pt_inception-2015-12-05-6726825d.pth
  python -m evaluation --samples seed0/ seed1/ seed2/ --reference ref.npz --metrics fid,fd_dinov2   # EDM2's row
  python -m evaluation --reference imagenet-val-folder/ --resolution 512 --write-reference ref512.npz
Without --inception-weights the network loads torch-fidelity's cached download (torch hub checkpoints folder).
A reference .npz's mu/sigma/mu_s/sigma_s are used as stored; its arr_0 images give precision/recall."""
METRICS = ("fid", "sfid", "is", "pr", "fd_dinov2")  # --metrics names; 'pr' is precision and recall
DEFAULT_METRICS = ("fid", "sfid", "is", "pr")  # fd_dinov2 joins them when its weights need no download
INCEPTION_METRICS = ("fid", "sfid", "is", "pr")
RESIZE_MODES = ("torch", "pil")  # evaluation.dinov2.RESIZE_MODES (not imported here: it imports torch)


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/repa/inception (~/.cache/... without it), read when a config is made, not at import."""
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "repa" / "inception")


@dataclass(kw_only=True)
class EvalConfig:
    """Resolved settings of one evaluation (recorded in report.json)."""
    samples: list[str] | None = None  # one set, or several (seeds) reported with their spread
    reference: str = ""
    out: str = "report.json"
    num_samples: int | None = None
    write_reference: str | None = None
    resolution: int | None = None
    crop: str = "adm"  # a folder reference's crop rule (manifests.preprocess.CROP_FLAGS); manifests carry their own
    metrics: list[str] | None = None  # None: DEFAULT_METRICS, plus fd_dinov2 when its weights are here
    inception_weights: str | None = None
    dinov2: str = "dinov2-vit-l"  # EDM2's FD_DINOv2 network (evaluation.dinov2.DEFAULT_DINOV2)
    clip_model: str | None = None  # text-to-image: adds clip_score (evaluation/clip_score.py)
    resize: str = "torch"
    device: str = "auto"
    batch_size: int = 100
    num_workers: int = min(8, os.cpu_count() or 1)
    pr_dtype: str = "float32"
    pr_k: int = 3
    is_split: int = 5000
    recompute_reference_stats: bool = False
    cache_dir: str = field(default_factory=default_cache_dir)
    no_cache: bool = False
    no_cache_samples: bool = False
    cache_gb: float = DEFAULT_CACHE_GB
    progress: bool = True


PR_PRECISION = {"fp32": "float32", "fp16": "float16", "float32": "float32", "float16": "float16"}


def pr_precision(text: str) -> str:
    """--precision fp32|fp16 (old --pr-dtype float32|float16) -> the torch dtype name kept in pr_dtype."""
    if text not in PR_PRECISION:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from fp32, fp16)")
    return PR_PRECISION[text]


def metric_list(text: str) -> list[str]:
    """'fid,fd_dinov2' -> ['fid', 'fd_dinov2'] (known names, each once, in the given order)."""
    names = list(dict.fromkeys(comma_list(text.lower())))
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        what = f"unknown metric {bad[0]!r}" if bad else "no metric named"
        raise argparse.ArgumentTypeError(f"{what} (choose from {', '.join(METRICS)})")
    return names


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    p = ArgumentParser(prog="python -m evaluation", formatter_class=PlainHelpFormatter,
                       description="FID, sFID, IS, precision and recall as the ADM evaluator computes them, and "
                                   "FD_DINOv2 as EDM2 does, in PyTorch.", epilog=EXAMPLE)
    g = p.add_argument_group("inputs")
    g.add_argument("--samples", nargs="+", metavar="S",
                   help="samples manifest (or its folder), ADM-style .npz (arr_0), or a folder of PNGs; several "
                        "sets (e.g. seeds) are reported each, then their mean, min and std")
    g.add_argument("--reference",
                   help="ADM reference .npz, features manifest, or image folder (centre-cropped to the sample "
                        "size); required")
    g.add_argument("--num-samples", type=positive_int, help="expected sample count: fewer is an error, more are cut "
                   "(default: all)")
    g.add_argument("--write-reference", metavar="OUT.npz", help="write the reference as an ADM-format batch "
                   "(arr_0, mu, sigma, mu_s, sigma_s) plus pool3 and, with fd_dinov2, mu_dinov2/sigma_dinov2; "
                   "--samples becomes optional")
    g.add_argument("--resolution", type=positive_int, help="centre-crop a folder reference to this size "
                   "(default: the sample size)")
    g.add_argument("--crop", choices=("adm", "uvit"), default=d.crop,
                   help="centre crop of a folder reference: adm (ImageNet, ADM's rule) or uvit (MS-COCO val, "
                        "U-ViT's rule); a features manifest uses the crop it records (default: %(default)s)")
    g = p.add_argument_group("networks")
    g.add_argument("--inception-weights", metavar="PATH|random:SEED",
                   help="converted 2015 TF Inception weights (default: torch-fidelity's cached download); "
                        "random:SEED is for tests and marks the report 'not comparable'")
    g.add_argument("--dinov2", metavar="NAME[=PATH]", default=d.dinov2,
                   help="the FD_DINOv2 network, named as pipeline --encoders names it; a timm checkpoint file "
                        "after '='; tiny-dinov2 is random, for tests (default: %(default)s, EDM2's ViT-L/14)")
    g.add_argument("--clip-model", metavar="NAME[=PATH]", default=None,
                   help="text-to-image: add clip_score, 100 x the CLIP ViT-L/14 image-caption cosine (clipped at 0, "
                        "averaged) from the captions in the sample shards; clip-vit-l (openai/clip-vit-large-"
                        "patch14), NAME=PATH a Hugging Face folder, tiny-clip random for tests (default: off)")
    g.add_argument("--resize", choices=RESIZE_MODES, default=d.resize,
                   help="DINOv2's resize to 224: torch (bicubic with antialias, EDM2's default) or pil (PIL "
                        "bicubic on uint8: dgm-eval exactly) (default: %(default)s)")
    g.add_argument("--device", default=d.device, type=device_flag, help=f"{DEVICE_HELP} (default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="images per forward pass; one "
                   "process, so global (default: %(default)s)")
    g.add_argument("--num-workers", type=positive_int, default=d.num_workers, help="image decoding threads "
                   "(default: %(default)s)")
    g = p.add_argument_group("metrics")
    g.add_argument("--metrics", type=metric_list, metavar="LIST",
                   help=f"comma list from {', '.join(METRICS)} (default: {','.join(DEFAULT_METRICS)}, plus "
                        "fd_dinov2 when its weights are already downloaded)")
    flag(g, "--precision", "--pr-dtype", dest="pr_dtype", default=d.pr_dtype, type=pr_precision,
         metavar="{fp32,fp16}", help="numerics of the P/R pairwise distances, the one choice here (Inception "
         "always runs in fp32 without TF32); fp16 reproduces ADM. float32/float16 also work (default: fp32)")
    g.add_argument("--pr-k", type=positive_int, default=d.pr_k, help="k-NN radius for P/R (default: %(default)s)")
    g.add_argument("--is-split", type=positive_int, default=d.is_split, help="IS split size (default: %(default)s)")
    g.add_argument("--recompute-reference-stats", action="store_true",
                   help="ignore a reference .npz's stored statistics and compute them from its arr_0")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=d.out, help="report JSON (default: %(default)s)")
    g.add_argument("--cache-dir", default=d.cache_dir, help="HDF5 activation cache (default: %(default)s)")
    g.add_argument("--cache-gb", type=positive_float, default=d.cache_gb,
                   help="size bound of --cache-dir in GiB: least recently used sample sets are evicted, "
                        "references never (default: %(default)s)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the activation cache")
    g.add_argument("--no-cache-samples", action="store_true",
                   help="cache the reference only: sample sets are computed every time and never stored")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_run_flags(g)
    return p


def parse_config(argv: Sequence[str] | None) -> EvalConfig:
    """defaults < --config file < flags."""
    cfg, _ = resolve(argv)
    return cfg


def resolve(argv: Sequence[str] | None) -> tuple[EvalConfig, bool]:
    argv = list(sys.argv[1:] if argv is None else argv)
    values, dry = config_values(build_parser(), argv, EvalConfig, extra={"no_progress"})
    if "no_progress" in values:
        values["progress"] = not values.pop("no_progress")
    if isinstance(values.get("samples"), str):  # a config file's single path
        values["samples"] = [values["samples"]]
    cfg = EvalConfig(**values)
    if not cfg.reference:
        raise UserError("python -m evaluation: --reference is required (or 'reference' in --config)")
    if not cfg.samples and cfg.write_reference is None:
        raise UserError("python -m evaluation: --samples is required (unless --write-reference is given)")
    return cfg, dry
