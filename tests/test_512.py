"""512 px end to end with tiny presets and two encoders, driven by REPA's own flag names.

extract (64x64 latents, 32x32 token grids; CLIP from an OpenAI-layout file) -> train SiT-Debug/2 on both
encoders (`--enc-type a,b`, as REPA's comma list) -> sample -> evaluate against the source images ADM-cropped to 512 px.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import run_module
from manifests import run_cli

from evaluation.__main__ import main as evaluation_main
from trainer.__main__ import main as trainer_main


def _openai_clip_file(path) -> None:
    """A tiny CLIP in OpenAI's plain state-dict layout (open_clip's class, QuickGELU)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    m = CLIP(32, CLIPVisionCfg(layers=2, width=64, patch_size=14, image_size=224),
             CLIPTextCfg(context_length=8, vocab_size=50, width=64, heads=1, layers=1), quick_gelu=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in m.state_dict().items()}, path)


@pytest.mark.slow
def test_512_chain_two_encoders_repa_flags(synth_dir, tmp_path):
    from manifests import iter_shard, load_manifest
    clip = tmp_path / "ViT-L-14.pt"
    _openai_clip_file(clip)
    feats, exps, samples = tmp_path / "feats512", tmp_path / "exps", tmp_path / "samples512"
    run_module("pipeline", "extract", "--source", str(synth_dir), "--out", str(feats), "--resolution", "512",
               "--vae", "tiny-vae", "--encoders", f"tiny-dinov2,TINY-CLIP={clip}", "--limit", "8",
               "--shard-size", "8", "--batch-size", "8", check=True, timeout=300)
    m = load_manifest(feats)
    assert m.preprocess["resolution"] == 512 and m.fields["latent"]["shape"] == [8, 64, 64]
    for name in ("tiny-dinov2", "tiny-clip"):
        f = m.fields[name]
        assert f["shape"] == [1024, 64], (name, f["shape"])
        assert f["encoder"]["grid"] == [32, 32] and f["encoder"]["input_size"] == 448
    enc = m.fields["tiny-clip"]["encoder"]
    assert enc["weights"] == str(clip) and "before ln_post" in enc["tokens"] and enc["mean"][0] == 0.48145466
    # The stored tokens are the encoders' own output on the 512 px ADM crop of the source image.
    from PIL import Image

    from pipeline.encoders import load_encoder
    from pipeline.transforms import adm_center_crop
    first = next(iter_shard(m.shard_paths()[0]))
    crop = np.asarray(adm_center_crop(Image.open(synth_dir / first["json"]["source"]), 512)).copy()
    for spec, name in ((f"tiny-clip={clip}", "tiny-clip"), ("tiny-dinov2", "tiny-dinov2")):
        want = load_encoder(spec, 512)(torch.from_numpy(crop)[None])[0].numpy()
        from manifests.codecs import decode_sample, field_codec  # int8 codes by default: decode them
        got = decode_sample(first, name, field_codec(name, m.fields[name]))
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)

    # Train with REPA's train.py names: --data-dir, --output-dir/--exp-name, --enc-type a,b, ...
    # The CLI mains run in this process from here on (the extract above is the real Ray job): same argv, same code.
    assert run_cli(trainer_main, ["train", "--data-dir", str(feats), "--output-dir", str(exps), "--exp-name", "xl512",
                                  "--model", "SiT-Debug/2", "--enc-type", "tiny-dinov2,tiny-clip", "--encoder-depth",
                                  "2", "--max-train-steps", "2", "--checkpointing-steps", "2", "--batch-size", "4",
                                  "--mixed-precision", "no", "--num-workers", "0", "--allow-tf32"]) == 0
    run_dir = exps / "xl512"
    conf = json.loads((run_dir / "config.json").read_text())
    assert conf["resolution"] == 512 and conf["model_kwargs"]["input_size"] == 64
    assert conf["encoders"] == ["tiny-dinov2", "tiny-clip"] and conf["model_kwargs"]["z_dims"] == [64, 64]
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines() if line.strip()]
    assert stats and all(np.isfinite(s["loss"]) for s in stats if "loss" in s)

    # Sample with generate.py names and the Table 11 preset (its 512 px check passes on this checkpoint).
    assert run_cli(trainer_main, ["sample", "--ckpt", str(run_dir), "--sample-dir", str(samples), "--preset",
                                  "paper-512-cfg", "--num-fid-samples", "4", "--num-steps", "2",
                                  "--per-proc-batch-size", "2", "--no-tf32", "--vae", "tiny-vae", "--npz"]) == 0
    with np.load(samples / "samples.npz") as z:
        assert z["arr_0"].shape == (4, 512, 512, 3)
    sm = load_manifest(samples, kind="samples")
    assert sm.preprocess["resolution"] == 512

    report = tmp_path / "report.json"
    assert run_cli(evaluation_main, ["--samples", str(samples), "--reference", str(synth_dir),
                                     "--inception-weights", "random:0", "--batch-size", "4", "--out", str(report)]) == 0
    r = json.loads(report.read_text())
    assert np.isfinite(r["metrics"]["fid"]), r["metrics"]
    assert "@512" in json.dumps(r)  # the reference folder was ADM-cropped at the samples' 512 px
