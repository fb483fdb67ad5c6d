"""`python -m evaluation align`: layer-wise CKNNA and linear probing of SiT or DiT hidden states (REPA Fig. 2, 3, 38;
the DiT half of Figure 2 is Appendix C.2 / Figure 10)."""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from common import UserError, check, run_cli
from manifests import atomic_write_json, load_manifest
from common.cli import ArgumentParser, HelpFormatter, flag, print_config
from common.config_file import add_run_flags, config_values
from common.device import DEVICE_HELP, device_flag, resolve_device
from manifests.io import ensure_writable_dir

from evaluation.align.metric import CKNNA_EPS, DEFAULT_K, cknna_graphs, graph_self_hsic, knn_graph
from evaluation.align.data import pick_encoder, read_align_data
from evaluation.align.model import ModelSpec, hidden_states, load_model, objective_paths
from evaluation.align.probe import HELDOUT_PERCENT, PROBE_BATCH, PROBE_EPOCHS, PROBE_LR, ProbeConfig, heldout_mask, linear_probe

REPORT_NAME = "alignment.json"
PLOT_NAME = "alignment.png"
PAPER_NUM_IMAGES = 10_000  # REPA C.1: "we randomly sample 10,000 images in the validation set"

EPILOG = """example:
  python -m evaluation align --ckpt RUN/export/ema-0400000.safetensors --manifest imagenet256-val \\
      --encoders dinov2-vit-b --layers 1-28 --t 0.5 --out align-400k --pca
  # an official REPA file (no config.json beside it):
  python -m evaluation align --ckpt last.pt --model SiT-XL/2 --encoder-depth 8 --manifest val --out align
  # the released DiT-XL/2 (Appendix C.2; by name from $TORCH_HOME/hub/checkpoints or ./pretrained_models):
  python -m evaluation align --ckpt DiT-XL-2-256x256.pt --manifest val --encoders dinov2-vit-g --out align-dit
"""


@dataclass(kw_only=True)
class AlignConfig:
    """`python -m evaluation align` settings (recorded in alignment.json)."""
    ckpt: str = ""
    manifest: str = ""
    encoder: str | None = None  # None: the manifest's first patch-tokens field
    num_images: int = PAPER_NUM_IMAGES
    layers: str | None = None
    t: float = 0.5
    k: int = DEFAULT_K
    label: str = "null"
    cknna_eps: float = CKNNA_EPS
    seed: int = 0
    epochs: int = PROBE_EPOCHS
    probe_batch_size: int = PROBE_BATCH
    probe_lr: float = PROBE_LR
    skip_probe: bool = False
    model: str | None = None
    encoder_depth: int | None = None
    projector_embed_dims: str | None = None
    weights: str = "ema"
    path: str | None = None
    out: str = "alignment"
    pca: bool = False
    pca_images: int = 4
    batch_size: int = 64
    device: str = "auto"


def _one_encoder(text: str) -> str:
    if "," in text:
        raise argparse.ArgumentTypeError(f"align compares against one encoder field, got {text!r}")
    return text.strip()


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m evaluation align", description=__doc__, epilog=EPILOG,
                       formatter_class=HelpFormatter)
    g = p.add_argument_group("inputs")
    g.add_argument("--ckpt", help="our checkpoint/export, an official REPA or DiT .pt, or a released name "
                   "(DiT-XL-2-256x256.pt) or NAME=PATH; required")
    g.add_argument("--manifest", help="features manifest (file or folder) of held-out images; required")
    flag(g, "--encoders", "--encoder", dest="encoder", metavar="NAME", type=_one_encoder, default=None,
         help="the one patch-tokens field to compare against (default: the first)")
    flag(g, "--num-samples", "--num-images", dest="num_images", metavar="N", type=int, default=PAPER_NUM_IMAGES,
         help="random subset size (seeded); all images when the set is smaller")
    add_run_flags(g)
    a = p.add_argument_group("analysis")
    a.add_argument("--layers", default=None, help="1-based blocks, 'A-B' or 'A,B,C' (default: all)")
    a.add_argument("--t", type=float, default=0.5, help="noise level of the inputs (t=1 is pure noise; DiT: "
                   "timestep floor(t*1000), capped at 999)")
    a.add_argument("--k", type=int, default=DEFAULT_K, help="mutual k-NN size of CKNNA")
    a.add_argument("--label", choices=("null", "real"), default="null",
                   help="class fed to the model: the null (unconditional) class, or the image's label, which "
                        "leaks into every block through adaLN and makes the probe read the label, not the image")
    a.add_argument("--cknna-eps", type=float, default=CKNNA_EPS,
                   help="added to the CKNNA denominator; 1e-6 reproduces platonic-rep's metrics.py")
    a.add_argument("--seed", type=int, default=0, help="subset choice, noise and probe initialisation")
    pr = p.add_argument_group("linear probe")
    pr.add_argument("--epochs", type=int, default=PROBE_EPOCHS, help="probe epochs (paper: 90)")
    pr.add_argument("--probe-batch-size", type=int, default=PROBE_BATCH, help="probe batch (paper: 16384)")
    pr.add_argument("--probe-lr", type=float, default=PROBE_LR, help="initial Adam lr, cosine-decayed to 0")
    pr.add_argument("--skip-probe", action="store_true", help="CKNNA only")
    m = p.add_argument_group("model (official files; ours carry config.json)")
    m.add_argument("--model", default=None, help="registry name, e.g. SiT-XL/2 or DiT-XL/2 (default: config.json, "
                   "else the file's family's released size)")
    m.add_argument("--encoder-depth", type=int, default=None, help="block whose output feeds the projectors")
    m.add_argument("--projector-embed-dims", default=None, help="each projector's output width, i.e. its "
                   "encoder's token width (comma list, e.g. 768)")
    m.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="EMA weights (as sampling uses), or a training checkpoint's raw weights")
    m.add_argument("--path", choices=objective_paths(), default=None,
                   help="the objective's path used to noise the inputs: SiT's interpolant, DiT's beta schedule "
                   "(default: config.json, else linear)")
    o = p.add_argument_group("output and runtime")
    o.add_argument("--out", default="alignment", help="output folder")
    o.add_argument("--pca", action="store_true", help="also write PCA maps of token features per layer")
    o.add_argument("--pca-images", type=int, default=4, help="images shown in the PCA maps")
    o.add_argument("--batch-size", type=int, default=64, help="images per forward pass; one process, so global")
    o.add_argument("--device", type=device_flag, default="auto", help=DEVICE_HELP)
    return p


def resolve(argv: Sequence[str]) -> tuple[AlignConfig, bool]:
    """argv -> (settings, dry_run); defaults < --config file < flags."""
    values, dry = config_values(build_parser(), argv, AlignConfig)
    for name in ("ckpt", "manifest"):
        check(bool(values.get(name)), f"python -m evaluation align: --{name} is required (or '{name}' in --config)")
    return AlignConfig(**values), dry


def parse_layers(spec: str | None, depth: int) -> list[int]:
    """'A-B' (inclusive), 'A,B,C' or 'A' -> sorted 1-based block numbers within [1, depth]."""
    if spec is None:
        return list(range(1, depth + 1))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
            check(a <= b, f"--layers {spec!r}: range {part!r} runs backwards")
            out.update(range(a, b + 1))
    except ValueError as e:
        raise UserError(f"--layers {spec!r} is not 'A-B' or a comma list of block numbers") from e
    bad = [i for i in sorted(out) if not 1 <= i <= depth]
    check(not bad, f"--layers {spec!r}: block(s) {bad} outside 1-{depth} (the model has {depth} blocks)")
    return sorted(out)


def validate(args: AlignConfig) -> None:
    check(0.0 <= args.t <= 1.0, f"--t {args.t} must be in [0, 1] (0 = clean, 1 = pure noise)")
    check(args.k >= 1, f"--k {args.k} must be at least 1")
    check(args.num_images >= 4, f"--num-images {args.num_images}: CKNNA needs at least 4 images")
    check(args.epochs >= 1 and args.probe_batch_size >= 2, "--epochs must be >= 1 and --probe-batch-size >= 2")
    check(args.batch_size >= 1, f"--batch-size {args.batch_size} must be >= 1")
    check(args.pca_images >= 1, f"--pca-images {args.pca_images} must be >= 1")
    check(args.cknna_eps >= 0, f"--cknna-eps {args.cknna_eps} must be >= 0")


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def run_cknna(pooled: dict[int, np.ndarray], enc: np.ndarray, k: int, eps: float,
              device: torch.device) -> dict[int, float]:
    """CKNNA of every layer against the encoder; the encoder's k-NN graph and self-HSIC are computed once."""
    g_enc = knn_graph(torch.from_numpy(enc).to(device), k)
    self_enc = graph_self_hsic(g_enc)
    out = {}
    for layer, h in tqdm(pooled.items(), desc="CKNNA", unit="layer"):
        out[layer] = cknna_graphs(knn_graph(torch.from_numpy(h).to(device), k), g_enc, eps=eps, self_b=self_enc)
    return out


def run_probes(pooled: dict[int, np.ndarray], enc: np.ndarray, labels: np.ndarray, keys: list[str],
               num_classes: int, cfg: ProbeConfig) -> tuple[dict[int, Any], Any, np.ndarray]:
    """A probe per layer and one on the encoder's pooled tokens (the reference line), same split."""
    test = heldout_mask(keys)
    check(test.any() and (~test).sum() >= 2,
          f"{len(keys)} images give {int(test.sum())} held-out / {int((~test).sum())} training images for the "
          f"probe; use more --num-images or --skip-probe")
    res = {layer: linear_probe(h[~test], labels[~test], h[test], labels[test], num_classes, cfg)
           for layer, h in tqdm(pooled.items(), desc="linear probe", unit="layer")}
    ref = linear_probe(enc[~test], labels[~test], enc[test], labels[test], num_classes, cfg)
    return res, ref, test


def write_figures(out: Path, layers: list[int], cknna: dict[int, float], probe: dict[int, Any] | None,
                  enc_ref: Any | None, encoder: str, model: str = "SiT") -> None:
    from evaluation.align.plot import curve_panel, hstack, save_png
    panels = []
    if probe is not None:
        panels.append(curve_panel(layers, [100 * probe[i].top1 for i in layers], title="(a) linear probing",
                                  ylabel="top-1 accuracy (%)", ref=100 * enc_ref.top1, ref_label=encoder,
                                  model=model))
    panels.append(curve_panel(layers, [cknna[i] for i in layers], title=f"(b) CKNNA vs {encoder}",
                              ylabel="alignment (CKNNA)", model=model))
    save_png(hstack(panels), out / PLOT_NAME)


def write_pca(out: Path, tokens: dict[int, np.ndarray], enc_tokens: np.ndarray, encoder: str) -> list[str]:
    from evaluation.align.plot import pca_strip, save_png, vstack
    rows, files = [], []
    if len(enc_tokens):
        rows.append(pca_strip(enc_tokens, f"{encoder} (target)"))
    for layer, tok in tokens.items():
        strip = pca_strip(tok, f"layer {layer}")
        name = f"pca/layer-{layer:02d}.png"
        save_png(strip, out / name)
        files.append(name)
        rows.append(strip)
    save_png(vstack(rows), out / "pca/all-layers.png")
    return files + ["pca/all-layers.png"]


def main(argv: Sequence[str] | None = None) -> int:
    args, dry = resolve(list(sys.argv[1:] if argv is None else argv))
    if dry:
        return print_config(args)
    validate(args)
    device = torch.device(resolve_device(args.device))
    out = ensure_writable_dir(args.out)
    t0 = time.time()
    m = load_manifest(args.manifest, kind="features")
    encoder = pick_encoder(m, args.encoder)
    try:
        dims = [int(x) for x in args.projector_embed_dims.split(",")] if args.projector_embed_dims else None
    except ValueError as e:
        raise UserError(f"--projector-embed-dims {args.projector_embed_dims!r} is not a comma list of ints") from e
    lm = load_model(args.ckpt, ModelSpec(model=args.model, encoder_depth=args.encoder_depth,
                                          projector_embed_dims=dims, path=args.path,
                                          weights=args.weights), device)
    layers = parse_layers(args.layers, lm.depth)
    data = read_align_data(m, encoder, args.num_images, args.seed, pca_images=args.pca_images if args.pca else 0)
    n = len(data.keys)
    check(n > args.k and n >= 4, f"{n} images in {m.path}: CKNNA with --k {args.k} needs more than k (and >= 4)")
    pooled, tokens = hidden_states(lm, data.moments, data.labels, layers=layers, t=args.t, scale=data.scale,
                                   shift=data.shift, batch_size=args.batch_size, seed=args.seed, device=device,
                                   null_label=args.label == "null", keep_tokens=args.pca_images if args.pca else 0)
    for layer, h in pooled.items():
        check(bool(np.isfinite(h).all()), f"hidden states of block {layer} hold NaN/Inf (a broken checkpoint?)")
    cknna = run_cknna(pooled, data.enc_pooled, args.k, args.cknna_eps, device)
    probe = enc_ref = None
    probe_info: dict[str, Any] = {"skipped": True}
    if not args.skip_probe:
        num_classes = max(len(m.classes), int(data.labels.max()) + 1)
        cfg = ProbeConfig(epochs=args.epochs, batch_size=args.probe_batch_size, lr=args.probe_lr, seed=args.seed,
                          device=str(device))
        probe, enc_ref, test = run_probes(pooled, data.enc_pooled, data.labels, data.keys, num_classes, cfg)
        probe_info = {"epochs": args.epochs, "batch_size": args.probe_batch_size, "lr": args.probe_lr,
                      "schedule": "cosine to 0", "norm": "BatchNorm1d(affine=False)", "num_classes": num_classes,
                      "split": f"held out iff sha256(key) % 100 < {HELDOUT_PERCENT}",
                      "num_train": int((~test).sum()), "num_test": int(test.sum()),
                      "encoder_top1": enc_ref.top1}
    rows = [{"layer": i, "cknna": _finite(cknna[i]),
             **({"probe_top1": probe[i].top1, "probe_train_top1": probe[i].train_top1} if probe else {})}
            for i in layers]
    best = {"cknna": max(((r["cknna"], r["layer"]) for r in rows if r["cknna"] is not None), default=(None, None))}
    if probe:
        best["probe_top1"] = max((r["probe_top1"], r["layer"]) for r in rows)
    write_figures(out, layers, cknna, probe, enc_ref, encoder, model=lm.name.split("-")[0])
    files = [REPORT_NAME, PLOT_NAME]
    if args.pca:
        files += write_pca(out, tokens, data.enc_tokens, encoder)
    report = {
        "checkpoint": {"path": str(args.ckpt), "model": lm.name, "step": lm.step, "path_type": lm.path,
                       "weights": args.weights},
        "manifest": str(m.path), "encoder": encoder, "num_images": n, "t": args.t, "k": args.k,
        "label": args.label, "seed": args.seed, "cknna_eps": args.cknna_eps,
        "features": "global average over tokens of each block's output; L2-normalised inside CKNNA",
        "layers": rows, "best": {k: {"value": v[0], "layer": v[1]} for k, v in best.items()},
        "probe": probe_info, "files": files, "seconds": round(time.time() - t0, 1),
    }
    atomic_write_json(out / REPORT_NAME, report)
    print(f"{'layer':>5}  {'CKNNA':>8}" + ("  probe top-1" if probe else ""))
    for r in rows:
        c = "nan" if r["cknna"] is None else f"{r['cknna']:.4f}"
        print(f"{r['layer']:>5}  {c:>8}" + (f"  {100 * r['probe_top1']:10.2f}%" if probe else ""))
    if enc_ref is not None:
        print(f"{encoder} probe top-1: {100 * enc_ref.top1:.2f}%")
    print(f"wrote {out / REPORT_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
