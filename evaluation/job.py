"""`python -m evaluation`: sample set + reference -> FID, sFID, IS, precision, recall (ADM evaluator, DESIGN §6)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common import UserError
from manifests import atomic_open
from common.cli import ArgumentParser, PlainHelpFormatter, flag, positive_int, print_config
from common.config_file import add_run_flags, config_values
from common.device import DEVICE_HELP, device_flag, resolve_device
from manifests import storage
from manifests.io import ensure_writable_dir
from manifests.remote_inputs import localize, sync_down, sync_up

EXAMPLE = """examples:
  python -m evaluation --samples samples/ --reference VIRTUAL_imagenet256_labeled.npz --out report.json
  python -m evaluation --samples samples.npz --reference feats/ --inception-weights pt_inception-2015-12-05-6726825d.pth
  python -m evaluation --reference imagenet-val-folder/ --resolution 512 --write-reference ref512.npz
Without --inception-weights the network loads torch-fidelity's cached download (torch hub checkpoints folder).
A reference .npz's mu/sigma/mu_s/sigma_s are used as stored; its arr_0 images give precision/recall."""
STAT_SHAPES = {"mu": "d", "sigma": "dd", "mu_s": "s", "sigma_s": "ss"}
WEIGHTS_TAG = "inception_weights"  # extra array in references we write: which weights made the statistics


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/repa/inception (~/.cache/... without it), read when a config is made, not at import."""
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "repa" / "inception")


@dataclass(kw_only=True)
class EvalConfig:
    """Resolved settings of one evaluation (recorded in report.json)."""
    samples: str | None = None
    reference: str = ""
    out: str = "report.json"
    num_samples: int | None = None
    write_reference: str | None = None
    resolution: int | None = None
    inception_weights: str | None = None
    device: str = "auto"
    batch_size: int = 100
    num_workers: int = min(8, os.cpu_count() or 1)
    pr_dtype: str = "float32"
    pr_k: int = 3
    is_split: int = 5000
    recompute_reference_stats: bool = False
    cache_dir: str = field(default_factory=default_cache_dir)
    no_cache: bool = False
    progress: bool = True


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    p = ArgumentParser(prog="python -m evaluation", formatter_class=PlainHelpFormatter,
                description="FID, sFID, IS, precision and recall as the ADM evaluator computes them, in PyTorch.",
                epilog=EXAMPLE)
    g = p.add_argument_group("inputs")
    g.add_argument("--samples", help="samples manifest (or its folder), ADM-style .npz (arr_0), or a folder of PNGs")
    g.add_argument("--reference",
                   help="ADM reference .npz, features manifest, or image folder (centre-cropped to the sample "
                        "size); required")
    g.add_argument("--num-samples", type=positive_int, help="expected sample count: fewer is an error, more are cut "
                   "(default: all)")
    g.add_argument("--write-reference", metavar="OUT.npz", help="write the reference as an ADM-format batch "
                   "(arr_0, mu, sigma, mu_s, sigma_s); --samples becomes optional")
    g.add_argument("--resolution", type=positive_int, help="centre-crop a folder reference to this size "
                   "(default: the sample size)")
    g = p.add_argument_group("network")
    g.add_argument("--inception-weights", metavar="PATH|random:SEED",
                   help="converted 2015 TF Inception weights (default: torch-fidelity's cached download); "
                        "random:SEED is for tests and marks the report 'not comparable'")
    g.add_argument("--device", default=d.device, type=device_flag, help=f"{DEVICE_HELP} (default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="images per Inception forward "
                   "pass; one process, so global (default: %(default)s)")
    g.add_argument("--num-workers", type=positive_int, default=d.num_workers, help="image decoding threads "
                   "(default: %(default)s)")
    g = p.add_argument_group("metrics")
    flag(g, "--precision", "--pr-dtype", dest="pr_dtype", default=d.pr_dtype, type=pr_precision,
         metavar="{fp32,fp16}", help="numerics of the P/R pairwise distances, the one choice here (Inception "
         "always runs in fp32 without TF32); fp16 reproduces ADM. float32/float16 also work (default: fp32)")
    g.add_argument("--pr-k", type=positive_int, default=d.pr_k, help="k-NN radius for P/R (default: %(default)s)")
    g.add_argument("--is-split", type=positive_int, default=d.is_split, help="IS split size (default: %(default)s)")
    g.add_argument("--recompute-reference-stats", action="store_true",
                   help="ignore a reference .npz's stored mu/sigma and compute them from its arr_0")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=d.out, help="report JSON (default: %(default)s)")
    g.add_argument("--cache-dir", default=d.cache_dir, help="HDF5 activation cache (default: %(default)s)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the activation cache")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_run_flags(g)
    return p


PR_PRECISION = {"fp32": "float32", "fp16": "float16", "float32": "float32", "float16": "float16"}


def pr_precision(text: str) -> str:
    """--precision fp32|fp16 (old --pr-dtype float32|float16) -> the torch dtype name kept in pr_dtype."""
    if text not in PR_PRECISION:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from fp32, fp16)")
    return PR_PRECISION[text]


def parse_config(argv: Sequence[str] | None) -> EvalConfig:
    """defaults < --config file < flags."""
    cfg, _ = resolve(argv)
    return cfg


def resolve(argv: Sequence[str] | None) -> tuple[EvalConfig, bool]:
    argv = list(sys.argv[1:] if argv is None else argv)
    values, dry = config_values(build_parser(), argv, EvalConfig, extra={"no_progress"})
    if "no_progress" in values:
        values["progress"] = not values.pop("no_progress")
    cfg = EvalConfig(**values)
    if not cfg.reference:
        raise UserError("python -m evaluation: --reference is required (or 'reference' in --config)")
    if cfg.samples is None and cfg.write_reference is None:
        raise UserError("python -m evaluation: --samples is required (unless --write-reference is given)")
    return cfg, dry


def _outpath(loc: str) -> Path:
    """An output file: an object-store URL as is, else a local path with ~ expanded."""
    return storage.path(loc) if storage.is_url(loc) else Path(loc).expanduser()  # type: ignore[return-value]


def _check_out(path: Path, what: str) -> None:
    if storage.is_url(path):  # an object: the bucket must take a write
        ensure_writable_dir(storage.path(path).parent, f"{what} folder")
        return
    ensure_writable_dir(path.parent if str(path.parent) else Path("."), f"{what} folder")
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, expected a file name")


def _load_reference_stats(path: Path) -> tuple[dict[str, np.ndarray], str | None]:
    """A reference .npz's stored statistics (validated before any work) and the weights tag, if any."""
    from evaluation.images import load_npz_arrays
    from evaluation.inception import POOL_DIM, SPATIAL_DIM
    arrays = load_npz_arrays(path, [*STAT_SHAPES, WEIGHTS_TAG])
    stats = {k: v for k, v in arrays.items() if k in STAT_SHAPES}
    for a, b in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (a in stats) != (b in stats):
            have, lack = (a, b) if a in stats else (b, a)
            raise UserError(f"reference {path} has '{have}' without '{lack}'; both or neither are required")
    dims = {"d": POOL_DIM, "s": SPATIAL_DIM}
    for k, v in stats.items():
        want = tuple(dims[c] for c in STAT_SHAPES[k])
        if v.shape != want or not np.issubdtype(v.dtype, np.floating) or not np.isfinite(v).all():
            raise UserError(f"reference {path}: '{k}' has shape {list(v.shape)} dtype {v.dtype}, expected finite "
                            f"floats of shape {list(want)}")
    tag = str(arrays[WEIGHTS_TAG]) if WEIGHTS_TAG in arrays else None
    return {k: v.astype(np.float64) for k, v in stats.items()}, tag


def _use_stored_stats(stats: dict[str, np.ndarray], tag: str | None, model, cfg: EvalConfig
                      ) -> tuple[dict[str, np.ndarray] | None, str]:
    """Stored statistics if they apply to these weights, with the reason either way."""
    if not stats:
        return None, "computed (the .npz stores no statistics)"
    if cfg.recompute_reference_stats:
        return None, "computed (--recompute-reference-stats)"
    if tag is None and not model.comparable:
        return None, "computed (stored statistics come from the TF Inception, not these random weights)"
    if tag is not None and tag != model.cache_id:
        return None, f"computed (stored statistics were made with other weights: {tag[:16]})"
    return stats, "npz"


def _open_inputs(cfg: EvalConfig):
    from evaluation.images import open_images
    samples = None
    if cfg.samples is not None:
        samples = open_images(cfg.samples, num_workers=cfg.num_workers, what="samples").limit(cfg.num_samples)
    crop = cfg.resolution
    if crop is None and samples is not None and samples.size[0] == samples.size[1]:
        crop = samples.size[0]
    ref = open_images(cfg.reference, crop=crop, num_workers=cfg.num_workers, what="reference")
    if samples is not None and ref.size != samples.size:
        raise UserError(f"sample set {samples.path} is {samples.size[0]}x{samples.size[1]} but reference "
                        f"{ref.path} is {ref.size[0]}x{ref.size[1]}; evaluate against a reference of the same size")
    return samples, ref


def _write_reference(path: Path, ref, acts, model, cfg: EvalConfig) -> None:
    """An ADM-format reference batch: arr_0 plus statistics (and which weights made them)."""
    images = np.concatenate(list(ref.batches(cfg.batch_size, cfg.num_workers)))  # (N, H, W, 3) uint8
    with atomic_open(path, "wb") as f:
        np.savez(f, arr_0=images, mu=acts.mu, sigma=acts.sigma, mu_s=acts.mu_s, sigma_s=acts.sigma_s,
                 **{WEIGHTS_TAG: np.array(model.cache_id)})
    print(f"wrote reference batch {path} ({images.shape[0]} images)", file=sys.stderr)


def _describe(images, acts) -> dict[str, Any]:
    return {"path": str(images.path), "kind": images.kind, "count": images.count, "size": list(images.size),
            "sha256": images.sha256, "transform": images.transform, "cache": acts.cache,
            "cache_path": acts.cache_path}


def main(argv: Sequence[str] | None = None) -> int:
    t_start = time.perf_counter()
    cfg, dry = resolve(argv)
    if dry:
        return print_config(cfg)
    out = _outpath(cfg.out)
    urls = (cfg.samples, cfg.reference)  # recorded in the report as given
    # Object-store inputs are fetched once into a local cache (sha256-checked shard sets, files by size).
    cfg.samples = None if cfg.samples is None else str(localize(cfg.samples, "samples"))
    cfg.reference = str(localize(cfg.reference, "reference"))
    if cfg.samples is not None:
        _check_out(out, "report")
    if cfg.write_reference:
        _check_out(_outpath(cfg.write_reference), "--write-reference")
    samples, ref = _open_inputs(cfg)
    cfg.samples, cfg.reference = urls
    ref_stats, ref_tag = _load_reference_stats(ref.path) if ref.kind == "npz" else ({}, None)
    device = resolve_device(cfg.device)

    from evaluation.features import compute_activations
    from evaluation.inception import InceptionFeatures
    from evaluation.metrics import frechet_distance, inception_score, precision_recall
    from evaluation.report import NOT_COMPARABLE, format_table, write_report
    model = InceptionFeatures(cfg.inception_weights, device=device)
    remote_cache = None if cfg.no_cache or not storage.is_url(cfg.cache_dir) else cfg.cache_dir
    cache_dir = (None if cfg.no_cache else sync_down(remote_cache, ".h5") if remote_cache
                 else Path(cfg.cache_dir).expanduser())
    kw = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, cache_dir=cache_dir, progress=cfg.progress)

    ref_acts = compute_activations(ref, model, desc="reference", **kw)
    stored, stats_source = (None, "computed")
    if ref.kind == "npz":
        stored, stats_source = _use_stored_stats(ref_stats, ref_tag, model, cfg)
    if stored is not None:
        for k, v in stored.items():
            setattr(ref_acts, k, v)
    if cfg.write_reference:
        _write_reference(_outpath(cfg.write_reference), ref, ref_acts, model, cfg)
    if samples is None:
        if remote_cache:
            sync_up(cache_dir, remote_cache, ".h5")
        return 0

    smp_acts = compute_activations(samples, model, desc="samples", **kw)
    t0 = time.perf_counter()
    metrics = {"fid": frechet_distance(smp_acts.mu, smp_acts.sigma, ref_acts.mu, ref_acts.sigma),
               "sfid": frechet_distance(smp_acts.mu_s, smp_acts.sigma_s, ref_acts.mu_s, ref_acts.sigma_s),
               "is": inception_score(smp_acts.logits, split_size=cfg.is_split)}
    t_fid = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics["precision"], metrics["recall"] = precision_recall(ref_acts.pool, smp_acts.pool, k=cfg.pr_k,
                                                               dtype=cfg.pr_dtype, device=device)
    t_pr = time.perf_counter() - t0

    timing = {}
    for name in ("decode_wait_s", "forward_s", "statistics_s"):
        timing[name] = round(sum(a.timing.get(name, 0.0) for a in (ref_acts, smp_acts)), 3)
    timing.update(fid_is_s=round(t_fid, 3), pr_s=round(t_pr, 3), total_s=round(time.perf_counter() - t_start, 3))
    import torch
    report = {
        "metrics": metrics,
        "comparable": model.comparable,
        **({} if model.comparable else {"note": NOT_COMPARABLE}),
        "samples": _describe(samples, smp_acts),
        "reference": {**_describe(ref, ref_acts), "stats_source": stats_source},
        "inception": {"weights": model.weights_id, "sha256": model.weights_sha256, "comparable": model.comparable},
        "settings": {**asdict(cfg), "device": device, "tf32": False, "autocast": False, "torch": torch.__version__},
        "timing": timing,
        "created_by": {"command": "python -m evaluation " + shlex.join(list(argv or sys.argv[1:]))},
    }
    write_report(out, report)
    if remote_cache:
        sync_up(cache_dir, remote_cache, ".h5")
    shown = cfg.samples if storage.is_url(cfg.samples) else samples.path  # a URL as given, not its local copy
    print(format_table(str(shown), samples.count, metrics, model.comparable))
    print(f"report: {out}", file=sys.stderr)
    return 0
