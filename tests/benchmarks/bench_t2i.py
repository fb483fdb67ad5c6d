"""CPU benchmark of the text-to-image path (issue 24): extraction's CPU side per image with caption contexts, and the
trainer loader's samples/s with int8 caption contexts against float16 ones.

    python tests/benchmarks/bench_t2i.py [--images 16] [--captions 5] [--batch 8] [--reps 2]
                                         [--samples 320] [--workers 2] [--loader-batch 32] [--rounds 2]
                                         [--parts extract,loader]

1. Extraction, per image: the pipeline's decode + U-ViT centre crop (`pipeline.transforms.decode_crop(data, 256,
   "uvit-center")`) of COCO-sized synthetic JPEGs (640x480), and the int8 caption contexts of its `--captions`
   captions (`TextEncoder.members`, the pipeline's call, `--batch` images per call as the encoder actor batches them),
   for the `tiny-clip-text` preset and for CLIP ViT-L/14's text transformer at its real size with random weights
   (768 wide, 12 layers, 12 heads, MLP 3072, 77 positions; the pretrained weights are not available offline, and
   the cost does not depend on the values). Alone and both together; interleaved, best of `--reps`.
2. The trainer's loader (plan_loader + open_loader, as `trainer train` builds it for MMDiT-Debug/2) over two small
   COCO-layout feature sets extracted in this process (tests/test_t2i_pipeline.py's `write_coco` plus more images
   with five captions each; tiny-vae, tiny-dinov2, tiny-clip-text) that differ only in --context-dtype (int8 vs
   float16): samples/s, the bytes of the context members per sample, and the ratio; interleaved, best of
   `--rounds`; and the CPU time per sample of a micro-batch read in one process, with its caption-context part.
   With tiny-clip-text the contexts are 64 wide; the figures for 768 are printed beside them (computed).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from manifests.codecs import get_codec  # noqa: E402
from pipeline.transforms import decode_crop  # noqa: E402
from pipeline.synth import _draw  # noqa: E402
from pipeline.text import TEXT_LENGTH, TextEncoder, load_text_encoder, tiny_tokenizer_files  # noqa: E402
from pipeline.presets import TEXT_ENCODERS  # noqa: E402

COCO_SIZE = (640, 480)  # the most common MS-COCO image size
SUBJECTS = ["A man", "A woman", "Two people", "A young boy", "A dog", "A cat", "A large bus", "A red truck",
            "A plate of food", "A group of people", "A giraffe", "A train", "A person", "An elephant"]
ACTIONS = ["standing next to", "sitting on", "riding", "walking down", "looking at", "parked near", "holding",
           "laying on top of", "eating", "crossing"]
OBJECTS = ["a wooden bench", "a city street", "a surfboard on a wave", "a table with a white cloth", "the grass",
           "a snowy hill", "a kitchen counter", "a tall fence in a field", "the train tracks", "a busy sidewalk"]
TAILS = ["", " in the rain", " on a sunny day", " at night", " near a building", " with trees behind it"]


def coco_captions(n_images: int, k: int, seed: int = 0) -> list[list[str]]:
    """`k` COCO-style captions per image (about 10 words, as COCO's average)."""
    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    return [[f"{pick(SUBJECTS)} {pick(ACTIONS)} {pick(OBJECTS)}{pick(TAILS)}." for _ in range(k)]
            for _ in range(n_images)]


def coco_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """Synthetic 640x480 JPEGs (quality 90) of the pipeline's drawn pictures, landscape and portrait."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = COCO_SIZE if i % 4 else COCO_SIZE[::-1]
        buf = io.BytesIO()
        _draw(i % 10, 10, w, h, rng).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def vit_l_text() -> TextEncoder:
    """CLIP ViT-L/14's text transformer at its real size, random weights, with the tiny tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    with tempfile.TemporaryDirectory(prefix="bench-t2i-tok-") as d:
        tiny_tokenizer_files(d)
        tokenizer = CLIPTokenizer.from_pretrained(d, model_max_length=TEXT_LENGTH)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=TEXT_LENGTH,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu")
    torch.manual_seed(0)
    return TextEncoder(TEXT_ENCODERS["clip-vit-l-text"], tokenizer, CLIPTextModel(config), "random")


def bench_extract(images: int, k: int, batch: int, reps: int) -> None:
    jpegs = coco_jpegs(images)
    caps = coco_captions(images, k)
    codec = get_codec("int8")
    encoders = {"tiny-clip-text": load_text_encoder("tiny-clip-text"), "ViT-L/14 text (random)": vit_l_text()}
    kib = sum(map(len, jpegs)) / len(jpegs) / 1024
    words = np.mean([len(c.split()) for cs in caps for c in cs])
    print(f"== extraction CPU side per image: {images} COCO-sized JPEGs ({COCO_SIZE[0]}x{COCO_SIZE[1]} and "
          f"portrait, {kib:.0f} KiB avg), U-ViT crop 256, {k} captions per image ({words:.1f} words avg), int8 "
          f"contexts, {batch} images per members() call, {torch.get_num_threads()} torch threads, best of {reps}")

    def decode() -> float:
        t0 = time.perf_counter()
        for data in jpegs:
            decode_crop(data, 256, "uvit-center")
        return (time.perf_counter() - t0) / images

    def contexts(enc: TextEncoder) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():  # as the encoder actor calls it (pipeline/worker.py _contexts)
            for i in range(0, images, batch):
                enc.members(caps[i:i + batch], codec)
        return (time.perf_counter() - t0) / images

    def both(enc: TextEncoder) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, images, batch):
                for data in jpegs[i:i + batch]:
                    decode_crop(data, 256, "uvit-center")
                enc.members(caps[i:i + batch], codec)
        return (time.perf_counter() - t0) / images

    with torch.inference_mode():  # warm-up: allocator, kernels, tokenizer caches
        decode_crop(jpegs[0], 256, "uvit-center")
        for enc in encoders.values():
            enc.members(caps[:1], codec)
    t_dec = float("inf")
    t_ctx = {n: float("inf") for n in encoders}
    t_both = dict(t_ctx)
    for _ in range(reps):  # interleaved: the machine is shared, keep the best of each
        t_dec = min(t_dec, decode())
        for n, enc in encoders.items():
            t_ctx[n] = min(t_ctx[n], contexts(enc))
            t_both[n] = min(t_both[n], both(enc))
    line = lambda t: f"{1 / t:9.1f} img/s  {1e3 * t:8.2f} ms/img"  # noqa: E731
    print(f"  decode + U-ViT crop            : {line(t_dec)}")
    for n in encoders:
        d = encoders[n].dim
        print(f"  {n}, D={d}:")
        print(f"    contexts ({k} captions)      : {line(t_ctx[n])}  ({1e3 * t_ctx[n] / k:.2f} ms/caption; "
              f"{t_ctx[n] / t_dec:.2f}x the decode)")
        print(f"    decode + crop + contexts    : {line(t_both[n])}  (contexts {t_ctx[n] / t_both[n]:.0%} of it; "
              f"sum of the parts {1e3 * (t_dec + t_ctx[n]):.2f} ms)")
    a, b = encoders
    print(f"  ViT-L/14 text vs tiny-clip-text contexts: {t_ctx[b] / t_ctx[a]:.1f}x the time per image")


def make_coco(root: Path, extra: int, k: int) -> tuple[Path, Path]:
    """tests/test_t2i_pipeline.py's COCO fixture (5 good images and its bad inputs) plus `extra` images with `k`
    captions each, in the same layout."""
    from test_t2i_pipeline import _jpeg, write_coco
    images, ann = write_coco(root)
    coco = json.loads(ann.read_text())
    caps = coco_captions(extra, k, seed=1)
    nid = 900 + len(coco["annotations"])
    for j in range(extra):
        iid = 100_000 + j
        name = f"COCO_train2014_{iid:012d}.jpg"
        (images / name).write_bytes(_jpeg(iid, 320, 240))
        coco["images"].append({"id": iid, "file_name": name, "width": 320, "height": 240})
        for c in caps[j]:
            coco["annotations"].append({"image_id": iid, "caption": c, "id": nid})
            nid += 1
    ann.write_text(json.dumps(coco))
    return images, ann


def loader_rate(m, micro: int, workers: int, index_cache: Path, epochs: int) -> tuple[float, dict[str, float]]:
    """(samples/s of the trainer's loader over `epochs` epochs after two warm-up ones, bytes shipped per sample)."""
    from trainer.data import open_loader, plan_loader
    from trainer.data.indexed import resolve_fields
    spec = resolve_fields(m, None, 2, False, "text", "MMDiT-Debug/2")
    plan = plan_loader(m, spec, stream=False, hflip=False, index_cache=index_cache)
    steps = len(plan.index) // micro
    loader = open_loader(plan, m, spec, seed=0, hflip=False, rank=0, world=1, batch=micro, micro=micro,
                         start_step=0, steps=steps * (epochs + 3), num_workers=workers, pin=False)
    it = iter(loader)
    for _ in range(2 * steps):
        b = next(it)
    ctx = b["y"].nbytes + (0 if b.get("yscale") is None else b["yscale"].nbytes)
    rest = sum(t.nbytes for t in [b["x"], *b["zs"], *[s for s in b["zscales"] if s is not None]])
    t0 = time.perf_counter()
    for _ in range(steps * epochs):
        next(it)
    took = (time.perf_counter() - t0) / epochs
    del it
    return steps * micro / took, {"ctx": ctx / micro, "all": (ctx + rest) / micro}


def cpu_costs(m, micro: int, index_cache: Path) -> tuple[float, float]:
    """(CPU seconds per sample of a whole micro-batch read in this process, of its caption-context reads alone).

    CPU time, unlike wall time, barely moves when other jobs share the cores, so it compares codecs fairly there."""
    from trainer.data.index import build_index
    from trainer.data.indexed import FeatureBatches, StepSampler, needed_exts, resolve_fields
    spec = resolve_fields(m, None, 2, False, "text", "MMDiT-Debug/2")
    ds = FeatureBatches(build_index(m, needed_exts(spec, False), cache_dir=index_cache), spec, seed=0, hflip=False)
    ds.ring_size = 4
    items = list(StepSampler(len(ds.index), micro, 0, 1, micro, 0, 0, 3 * len(ds.index) // micro))
    for it in items[:2]:
        ds[it]  # allocate the ring
    t0 = time.process_time()
    for it in items[2:]:
        ds[it]
    whole = (time.process_time() - t0) / (len(items[2:]) * micro)
    bufs = ds.ctx_buffers(micro, lambda shape, dtype: torch.empty(shape, dtype=dtype))
    t0 = time.process_time()
    for _, positions, ids in items[2:]:
        ds.read_contexts(ids, positions, bufs)
    ctx = (time.process_time() - t0) / (len(items[2:]) * micro)
    return whole, ctx


def bench_loader(samples: int, k: int, workers: int, micro: int, rounds: int, epochs: int) -> None:
    from manifests import load_manifest
    from test_t2i_pipeline import extract_inprocess
    codecs = ("int8", "float16")
    with tempfile.TemporaryDirectory(prefix="bench_t2i_") as tmp:
        tmp = Path(tmp)
        extra = samples - 5  # write_coco's five good images
        images, ann = make_coco(tmp / "coco", extra, k)
        outs, took = {}, {}
        for c in codecs:
            t0 = time.perf_counter()
            outs[c] = extract_inprocess(source=str(images), captions=str(ann), out=str(tmp / f"feat-{c}"),
                                        vae="tiny-vae", encoders=["tiny-dinov2"], text_encoder="tiny-clip-text",
                                        context_dtype=c, shard_size=128, batch_size=64)
            took[c] = time.perf_counter() - t0
        ms = {c: load_manifest(outs[c]) for c in codecs}
        n = ms["int8"].num_samples
        print(f"== trainer loader, MMDiT-Debug/2 (text): {n} COCO-layout samples (tiny-vae moments, tiny-dinov2 "
              f"tokens int8, tiny-clip-text contexts; {k} captions per sample, the fixture's {n - extra} have 1-3), "
              f"extracted in "
              f"{took['int8']:.0f} + {took['float16']:.0f} s; {workers} workers, batch {micro}, shuffled indexed "
              f"reads, {epochs} epochs, best of {rounds} rounds")
        res = {c: {"rate": 0.0} for c in codecs}
        for c in codecs:
            from trainer.data.index import build_index
            from trainer.data.indexed import needed_exts, resolve_fields
            spec = resolve_fields(ms[c], None, 2, False, "text", "MMDiT-Debug/2")
            index = build_index(ms[c], needed_exts(spec, False), cache_dir=tmp / f"index-{c}")
            ctx = spec.context
            sizes = index.members["context.npy"][:, 1].astype(np.int64)
            if ctx.scaled:
                sizes = sizes + index.members["context.scale.npy"][:, 1]
            res[c].update(stored=float(sizes.mean()), dim=ctx.dim, length=ctx.length,
                          shards=sum(p.stat().st_size for p in ms[c].shard_paths()) / n)
        for _ in range(rounds):  # interleaved rounds: the machine is shared, keep the best of each
            for c in codecs:
                rate, shipped = loader_rate(ms[c], micro, workers, tmp / f"index-{c}", epochs)
                res[c]["rate"] = max(res[c]["rate"], rate)
                res[c]["shipped"] = shipped
                whole, ctx_cpu = cpu_costs(ms[c], micro, tmp / f"index-{c}")
                res[c]["cpu"] = min(res[c].get("cpu", 1e9), whole)
                res[c]["ctx_cpu"] = min(res[c].get("ctx_cpu", 1e9), ctx_cpu)
        f16 = res["float16"]
        print(f"  {'contexts':9s} {'stored ctx/sample':>18s} {'shard bytes/sample':>19s} {'ctx read/sample':>16s} "
              f"{'shipped/sample':>15s} {'samples/s':>10s} {'vs fp16':>8s}")
        for c in codecs:
            r = res[c]
            print(f"  {c:9s} {r['stored']:16,.0f} B {r['shards']:17,.0f} B {r['shipped']['ctx']:14,.0f} B "
                  f"{r['shipped']['all']:13,.0f} B {r['rate']:10.0f} {r['rate'] / f16['rate']:7.2f}x")
        print("  CPU time per sample (one process, robust to other jobs on the cores):")
        for c in codecs:
            r = res[c]
            print(f"  {c:9s} micro-batch read {r['cpu'] * 1e6:6.1f} us, of it the caption-context reads "
                  f"{r['ctx_cpu'] * 1e6:6.1f} us; fp16 / this {f16['cpu'] / r['cpu']:.2f}x")
        i8 = res["int8"]
        print(f"  int8 / float16 contexts: {i8['rate'] / f16['rate']:.2f}x the samples/s; context members "
              f"{i8['stored'] / f16['stored']:.2f}x the bytes (one caption read per sample: "
              f"{i8['shipped']['ctx'] / f16['shipped']['ctx']:.2f}x)")
        L = i8["length"]
        print(f"  at D=768 (CLIP ViT-L/14, computed): one caption's context is {L * 768 + 2 * L:,} B int8 + scales "
              f"vs {2 * L * 768:,} B float16 ({(L * 768 + 2 * L) / (2 * L * 768):.2f}x); {k} captions "
              f"{k * (L * 768 + 2 * L):,} vs {k * 2 * L * 768:,} B stored per sample")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16, help="JPEGs for the extraction timing")
    p.add_argument("--captions", type=int, default=5, help="captions per image (COCO has 5, a few have 6-7)")
    p.add_argument("--batch", type=int, default=8, help="images per TextEncoder.members call")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--samples", type=int, default=320, help="samples per loader feature set")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loader-batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--parts", default="extract,loader", help="comma list of extract, loader")
    a = p.parse_args()
    parts = set(a.parts.split(","))
    if "extract" in parts:
        bench_extract(a.images, a.captions, a.batch, a.reps)
    if "loader" in parts:
        bench_loader(a.samples, a.captions, a.workers, a.loader_batch, a.rounds, a.epochs)


if __name__ == "__main__":
    main()
