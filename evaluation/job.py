"""`python -m evaluation`: sample sets + reference -> FID, sFID, IS, precision, recall (ADM evaluator, DESIGN §6)
and FD_DINOv2 (EDM2, DESIGN §9); several sample sets (seeds) are reported each and then summarised."""
from __future__ import annotations

import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common import UserError
from common.cli import print_config
from common.device import resolve_device
from manifests import storage
from manifests.io import ensure_writable_dir
from manifests.remote_inputs import localize, sync_down, sync_up

from evaluation.config import (DEFAULT_METRICS, INCEPTION_METRICS, EvalConfig, build_parser, parse_config,
                               resolve)

__all__ = ["EvalConfig", "build_parser", "main", "parse_config", "resolve"]


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


def choose_metrics(cfg: EvalConfig) -> list[str]:
    """--metrics as given; by default ADM's four plus fd_dinov2 when its weights need no download (else one line
    saying why it was left out)."""
    from evaluation.dinov2 import parse_dinov2, weights_available
    spec = parse_dinov2(cfg.dinov2)  # a bad name is an error whether or not it is used
    if cfg.metrics is not None:
        return list(cfg.metrics)
    ok, why = weights_available(spec)
    if spec.path is not None and not ok:
        raise UserError(f"DINOv2 weights not found: {spec.path} (--dinov2 {cfg.dinov2})")
    if ok:
        return [*DEFAULT_METRICS, "fd_dinov2"]
    print(f"note: FD_DINOv2 left out: {why} (--metrics ...,fd_dinov2 downloads it; --dinov2 NAME=PATH takes a "
          f"file)", file=sys.stderr)
    return list(DEFAULT_METRICS)


def _open_inputs(cfg: EvalConfig):
    from evaluation.images import open_images
    sets = [open_images(s, num_workers=cfg.num_workers, what="samples").limit(cfg.num_samples)
            for s in cfg.samples or []]
    crop = cfg.resolution
    if crop is None and sets and sets[0].size[0] == sets[0].size[1]:
        crop = sets[0].size[0]
    from manifests.preprocess import CROP_FLAGS
    ref = open_images(cfg.reference, crop=crop, num_workers=cfg.num_workers, what="reference",
                      rule=CROP_FLAGS[cfg.crop])
    for s in sets:
        if ref.size != s.size:
            raise UserError(f"sample set {s.path} is {s.size[0]}x{s.size[1]} but reference {ref.path} is "
                            f"{ref.size[0]}x{ref.size[1]}; evaluate against a reference of the same size")
    return sets, ref


def _describe(images, acts) -> dict[str, Any]:
    out = {"path": str(images.path), "kind": images.kind, "count": images.count, "size": list(images.size),
           "sha256": images.sha256, "transform": images.transform, "cache": acts.cache,
           "cache_path": acts.cache_path}
    if acts.dinov2 is not None:
        out.update(dinov2_cache=acts.dinov2.cache, dinov2_cache_path=acts.dinov2.cache_path)
    return out


def _reference(ref, cfg: EvalConfig, metrics: list[str], model, dino, kw: dict) -> tuple[Any, dict[str, str]]:
    """The reference's activations: stored arrays of a reference .npz where they apply, a pass for the rest."""
    from evaluation.features import Activations, DinoActivations, compute_activations
    from evaluation.reference import StoredReference, dino_applies, inception_applies, load_stored
    stored = load_stored(ref.path, ref.count) if ref.kind == "npz" else StoredReference()
    use_inc, source = (False, "computed")
    if model is not None and ref.kind == "npz":
        use_inc, source = inception_applies(stored, model, cfg.recompute_reference_stats)
    use_pool = use_inc and stored.pool is not None and stored.tag is not None
    use_dino, dino_source = (False, "computed")
    if dino is not None and ref.kind == "npz":
        use_dino, dino_source = dino_applies(stored, dino, cfg.recompute_reference_stats)
    writing = cfg.write_reference is not None
    want_stats = writing or "fid" in metrics or "sfid" in metrics
    want_pool = writing or "pr" in metrics
    run_inc = model is not None and ((want_stats and not use_inc) or (want_pool and not use_pool))
    run_dino = dino is not None and not use_dino
    acts = Activations(cache="stored")  # no pass over the reference: everything it needs is in the .npz
    if run_inc or run_dino:
        acts = compute_activations(ref, model if run_inc else None, dinov2=dino if run_dino else None,
                                   desc="reference", reference=True, **kw)
    if use_inc:
        for k, v in stored.stats.items():
            setattr(acts, k, v)
    if use_pool:
        acts.pool = stored.pool
    if use_dino:
        acts.dinov2 = DinoActivations(feats=None, **stored.dino, cache="stored")
    sources = {"stats_source": source} if model is not None else {}
    if dino is not None:
        sources["dinov2_stats_source"] = dino_source
    return acts, sources


def _score(smp, ref_acts, metrics: list[str], cfg: EvalConfig, device: str) -> tuple[dict[str, float], float, float]:
    from evaluation.metrics import frechet_distance, inception_score, precision_recall
    t0 = time.perf_counter()
    out: dict[str, float] = {}
    if "fid" in metrics:
        out["fid"] = frechet_distance(smp.mu, smp.sigma, ref_acts.mu, ref_acts.sigma)
    if "sfid" in metrics:
        out["sfid"] = frechet_distance(smp.mu_s, smp.sigma_s, ref_acts.mu_s, ref_acts.sigma_s)
    if "is" in metrics:
        out["is"] = inception_score(smp.logits, split_size=cfg.is_split)
    t_fid = time.perf_counter() - t0
    t0 = time.perf_counter()
    if "pr" in metrics:
        out["precision"], out["recall"] = precision_recall(ref_acts.pool, smp.pool, k=cfg.pr_k, dtype=cfg.pr_dtype,
                                                           device=device)
    t_pr = time.perf_counter() - t0
    if "fd_dinov2" in metrics:
        t0 = time.perf_counter()
        out["fd_dinov2"] = frechet_distance(smp.dinov2.mu, smp.dinov2.sigma, ref_acts.dinov2.mu,
                                            ref_acts.dinov2.sigma)
        t_fid += time.perf_counter() - t0
    return out, t_fid, t_pr


def main(argv: Sequence[str] | None = None) -> int:
    t_start = time.perf_counter()
    cfg, dry = resolve(argv)
    if dry:
        return print_config(cfg)
    metrics = choose_metrics(cfg)
    out = _outpath(cfg.out)
    urls = (None if cfg.samples is None else list(cfg.samples), cfg.reference)  # recorded in the report as given
    # Object-store inputs are fetched once into a local cache (sha256-checked shard sets, files by size).
    cfg.samples = None if cfg.samples is None else [str(localize(s, "samples")) for s in cfg.samples]
    cfg.reference = str(localize(cfg.reference, "reference"))
    if cfg.samples:
        _check_out(out, "report")
    if cfg.write_reference:
        _check_out(_outpath(cfg.write_reference), "--write-reference")
    sets, ref = _open_inputs(cfg)
    cfg.samples, cfg.reference = urls
    device = resolve_device(cfg.device)

    from evaluation.cache import evict
    from evaluation.features import compute_activations
    from evaluation.report import (NOT_COMPARABLE, NOT_COMPARABLE_CLIP, NOT_COMPARABLE_DINO, format_rows,
                                   summarize, write_report)
    model = dino = None
    if cfg.write_reference or any(m in INCEPTION_METRICS for m in metrics):
        from evaluation.inception import InceptionFeatures
        model = InceptionFeatures(cfg.inception_weights, device=device)
    if "fd_dinov2" in metrics:
        from evaluation.dinov2 import DinoV2Features
        dino = DinoV2Features(cfg.dinov2, device=device, resize=cfg.resize)
    remote_cache = None if cfg.no_cache or not storage.is_url(cfg.cache_dir) else cfg.cache_dir
    cache_dir = (None if cfg.no_cache else sync_down(remote_cache, ".h5") if remote_cache
                 else Path(cfg.cache_dir).expanduser())
    kw = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, cache_dir=cache_dir, progress=cfg.progress)

    ref_acts, sources = _reference(ref, cfg, metrics, model, dino, kw)
    if cfg.write_reference:
        from evaluation.reference import write_reference
        images = np.concatenate(list(ref.batches(cfg.batch_size, cfg.num_workers)))  # (N, H, W, 3) uint8
        write_reference(_outpath(cfg.write_reference), images, ref_acts, model, dino)
    smp_kw = {**kw, "cache_dir": None if cfg.no_cache_samples else cache_dir}
    clip = captions = None
    if cfg.clip_model and sets:
        from evaluation.clip_score import ClipScorer, read_captions
        captions = [read_captions(s.path).captions for s in sets]  # every caption present before any forward
        clip = ClipScorer(cfg.clip_model, device=device)
    results, t_fid, t_pr = [], 0.0, 0.0
    for i, samples in enumerate(sets):
        desc = "samples" if len(sets) == 1 else f"samples {i + 1}/{len(sets)}"
        acts = compute_activations(samples, model, dinov2=dino, desc=desc, **smp_kw)
        scores, a, b = _score(acts, ref_acts, metrics, cfg, device)
        if clip is not None:
            from evaluation.clip_score import clip_score
            scores["clip_score"] = clip_score(samples.batches(cfg.batch_size, cfg.num_workers), captions[i], clip,
                                              samples.count, progress=cfg.progress)
        results.append((samples, acts, scores))
        t_fid, t_pr = t_fid + a, t_pr + b
    if cache_dir is not None:
        used = {Path(p) for a in [ref_acts, *(r[1] for r in results)]
                for p in (a.cache_path, a.dinov2.cache_path if a.dinov2 else None) if p}
        evict(cache_dir, cfg.cache_gb, keep=used)
        if remote_cache:
            sync_up(cache_dir, remote_cache, ".h5")
    if not sets:
        return 0

    all_acts = [ref_acts, *(r[1] for r in results)]
    timing = {k: round(sum(a.timing.get(k, 0.0) for a in all_acts), 3)
              for k in ("decode_wait_s", "forward_s", *(("dinov2_forward_s",) if dino else ()), "statistics_s")}
    timing.update(fid_is_s=round(t_fid, 3), pr_s=round(t_pr, 3), total_s=round(time.perf_counter() - t_start, 3))
    inc_ok = model is None or model.comparable
    comparable = inc_ok and (dino is None or dino.comparable) and (clip is None or clip.comparable)
    notes = ([] if inc_ok else [NOT_COMPARABLE]) + ([] if dino is None or dino.comparable else [NOT_COMPARABLE_DINO])
    notes += [] if clip is None or clip.comparable else [NOT_COMPARABLE_CLIP]
    import torch
    settings = {**asdict(cfg), "samples": urls[0][0] if len(sets) == 1 else urls[0], "metrics": metrics,
                "device": device, "tf32": False, "autocast": False, "torch": torch.__version__}
    report: dict[str, Any] = {"metrics": results[0][2] if len(sets) == 1 else {}, "comparable": comparable,
                              **({"note": "; ".join(notes)} if notes else {})}
    if len(sets) == 1:
        report["samples"] = _describe(results[0][0], results[0][1])
    else:
        report["summary"] = summarize([r[2] for r in results])
        report["metrics"] = {k: v["mean"] for k, v in report["summary"].items()}
        report["sets"] = [{"samples": _describe(s, a), "metrics": m} for s, a, m in results]
    report["reference"] = {**_describe(ref, ref_acts), **sources}
    if model is not None:
        report["inception"] = {"weights": model.weights_id, "sha256": model.weights_sha256,
                               "comparable": model.comparable}
    if dino is not None:
        report["dinov2"] = {"model": dino.spec.name, "weights": dino.weights_id, "sha256": dino.weights_sha256,
                            "resize": dino.resize, "comparable": dino.comparable}
    if clip is not None:
        report["clip"] = {"model": clip.name, "weights": clip.weights, "comparable": clip.comparable,
                          "definition": "mean over images of max(100 * cos(CLIP image, CLIP caption), 0)"}
    report.update(settings=settings, timing=timing,
                  created_by={"command": "python -m evaluation " + shlex.join(list(argv or sys.argv[1:]))})
    write_report(out, report)
    shown = [u if storage.is_url(u) else str(s.path) for u, (s, _, _) in zip(urls[0], results)]  # URLs as given
    rows = [(name, s.count, m) for name, (s, _, m) in zip(shown, results)]
    print(format_rows(rows, inc_ok, summary=report.get("summary"),
                      notes=[n for n in notes if n != NOT_COMPARABLE]))
    print(f"report: {out}", file=sys.stderr)
    return 0

