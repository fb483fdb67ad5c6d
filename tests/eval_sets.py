"""Shared tiny image sets and CLI helpers for the evaluation tests."""
import io
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from helpers import assert_user_error
from manifests import Manifest, ShardEntry, write_manifest, write_shard
from common import run_cli

RES, N = 32, 6  # Inception resizes to 299 whatever the size: small images cost no less, few images do


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_samples_manifest(root: Path, images: np.ndarray, shard_size: int = 4) -> Path:
    entries = []
    for j in range(0, len(images), shard_size):
        samples = [{"__key__": f"sample_{i:07d}", "png": png_bytes(images[i]), "cls": i % 2}
                   for i in range(j, min(j + shard_size, len(images)))]
        info = write_shard(root / "shards" / f"samples-{j // shard_size:06d}.tar", samples)
        entries.append(ShardEntry(url=f"shards/{info.path.name}", nsamples=len(info.keys), sha256=info.sha256,
                                  bytes=info.bytes))
    h, w = images.shape[1:3]
    write_manifest(Manifest(root=root, name="test-samples", shardlist=entries, kind="samples",
                            num_samples=len(images), fields={"png": {"dtype": "uint8", "shape": [h, w, 3],
                                                                     "codec": "png"},
                                                             "cls": {"dtype": "int64", "shape": []}}))
    return root


def write_folder(root: Path, images, ext="png") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(root / f"{i:04d}.{ext}")
    return root


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsets")
    rng = np.random.default_rng(0)
    smp = rng.integers(0, 256, (N, RES, RES, 3), dtype=np.uint8)
    smp[:, :16] //= 2  # some structure so the sets differ in more than noise
    ref_big = rng.integers(0, 256, (N, 40, 48, 3), dtype=np.uint8)  # non-square: the ADM crop applies
    np.savez(root / "samples.npz", arr_0=smp)
    return SimpleNamespace(
        root=root, images=smp, npz=root / "samples.npz",
        manifest=write_samples_manifest(root / "samples", smp), folder=write_folder(root / "samples_png", smp),
        ref=write_folder(root / "ref", ref_big, "png"), cache=root / "cache")


def evaluate(capsys, *args, cache=None, weights="random:0"):
    """Run the CLI in-process (imports once per session); returns (rc, stdout, stderr)."""
    from evaluation.__main__ import main
    argv = [*args, "--inception-weights", weights, "--no-progress", "--batch-size", "4", "--num-workers", "2"]
    if cache is not None:
        argv += ["--cache-dir", str(cache)]
    elif "--no-cache" not in args:
        argv += ["--no-cache"]
    capsys.readouterr()
    rc = run_cli(main, argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, *needles):
    assert_user_error(subprocess.CompletedProcess([], rc, "", err), *needles)


# ---- end to end -----------------------------------------------------------------------------------------------


def _tmp_files(folder: Path):
    return sorted(p for p in folder.glob(".tmp-*")) if folder.exists() else []


def write_lively_dinov2(path: Path) -> Path:
    """A random `tiny-dinov2` checkpoint whose CLS feature depends on the image. timm's init (LayerScale 1e-5,
    CLS token ~1e-6) gives a network whose output barely sees the input, so no test could tell preprocessing
    apart; here the LayerScales are 1 and every weight is of order one over the fan-in."""
    import timm
    import torch
    from safetensors.torch import save_file
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518,
                                embed_dim=64, depth=2, num_heads=2)
        sd = {}
        for k, v in net.state_dict().items():
            if k.endswith("gamma"):
                v = torch.ones_like(v)
            elif k in ("cls_token", "pos_embed"):
                v = torch.randn_like(v) * 0.5
            elif v.ndim >= 2:
                v = torch.randn_like(v) / v[0].numel() ** 0.5
            sd[k] = v.contiguous()
    save_file(sd, str(path))
    return path
