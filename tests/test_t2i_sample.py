"""Text-to-image sampling and evaluation (issue 24, sections 3-4): a trained MMDiT-Debug/2 run samples from a prompt
file and from COCO annotations, with CFG on the empty context; shards carry each image's caption; images do not
depend on the batch size; evaluation scores FID against the COCO features (U-ViT crop) and the CLIP score."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common import UserError, run_cli
from manifests import iter_shard, load_manifest
from test_mmdit_train import t2i, train_argv  # noqa: F401 - the module's COCO features fixture
from test_t2i_pipeline import GOOD

from trainer.__main__ import main as trainer_main

PROMPTS = ["a red square on the left", "a blue circle", "an orange star"]
FAST = ["--num-steps", "2", "--shard-size", "2", "--vae", "tiny-vae"]


@pytest.fixture(scope="module")
def run(t2i, tmp_path_factory) -> Path:  # noqa: F811
    r = tmp_path_factory.mktemp("t2i-run") / "run"
    assert run_cli(trainer_main, train_argv(t2i, r, steps=2)) == 0
    return r


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n\n")
    return p


def sample(ckpt, out, *extra: str) -> int:
    return run_cli(trainer_main, ["sample", "--ckpt", str(ckpt), "--out", str(out), *FAST, *extra])


def _shard_samples(out: Path) -> list[dict]:
    m = load_manifest(out, kind="samples", verify=True)
    return [s for url in m.shard_paths() for s in iter_shard(url)]


@pytest.mark.slow
def test_prompts_file_cfg_on_the_empty_context_and_batch_free(run, prompt_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert sample(run, a, "--prompts", str(prompt_file), "--num-samples", "4", "--cfg-scale", "2",
                  "--batch-size", "4") == 0
    got = _shard_samples(a)
    assert [s["txt"].decode() if isinstance(s["txt"], bytes) else s["txt"] for s in got] == \
        [PROMPTS[i % 3] for i in range(4)]  # sample i uses prompt i mod P
    m = load_manifest(a, kind="samples")
    assert "txt" in m.fields and "cls" not in m.fields and m.extra["sampler"]["prompts"] == str(prompt_file)
    assert sample(run, b, "--prompts", str(prompt_file), "--num-samples", "4", "--cfg-scale", "2",
                  "--batch-size", "1") == 0
    for x, y in zip(got, _shard_samples(b)):  # batch 1 vs 4: the same images up to float rounding
        d = np.abs(np.asarray(x["png"]).astype(int) - np.asarray(y["png"]).astype(int))
        assert d.max() <= 2 and (d > 0).mean() < 0.01
    c = tmp_path / "c"  # without --num-samples: one per prompt
    assert sample(run, c, "--prompts", str(prompt_file)) == 0
    assert load_manifest(c, kind="samples").num_samples == 3


def test_cfg_batch_uses_the_empty_context():
    """The unconditional half of a text family's CFG batch is the empty context on every row. (Planted bug this
    catches: null_like falling back to full_like(y, null) for contexts.)"""
    from trainer.sampling.samplers import velocity
    seen = {}

    def model(x, t, y):
        seen["y"] = y
        return torch.zeros_like(x), ()
    ctx, empty = torch.randn(2, 77, 8), torch.randn(77, 8)
    velocity(model, torch.zeros(2, 4, 4, 4, dtype=torch.float64), 0.5, ctx, cfg_scale=2.0, guidance_low=0.0,
             guidance_high=1.0, null_class=empty)
    assert torch.equal(seen["y"][:2], ctx) and torch.equal(seen["y"][2:], empty.expand(2, 77, 8))


@pytest.mark.slow
def test_coco_captions_one_per_image_then_fid_and_clip_score(run, t2i, tmp_path, capsys):  # noqa: F811
    """--captions ANNOTATIONS.json: one sample per captioned image in id order, its caption one of the image's
    own, drawn by (seed, image); evaluation against the COCO features manifest (its U-ViT crop) adds clip_score."""
    from evaluation.__main__ import main as eval_main
    ann = t2i.parent / "annotations" / "captions_train2014.json"
    out = tmp_path / "coco"
    assert sample(run, out, "--captions", str(ann)) == 0
    got = [s["txt"] for s in _shard_samples(out)]
    got = [t.decode() if isinstance(t, bytes) else t for t in got]
    with_caps = sorted(GOOD)  # the fixture's images with text captions (and ids 20/99 without, 55 without file)
    per_image = {3: GOOD[3], 7: GOOD[7], 15: GOOD[15], 42: GOOD[42], 1000: GOOD[1000], 55: ["a lost one"],
                 30: ["a broken one"]}
    ids = sorted(per_image)
    assert len(got) == len(ids) and all(t in per_image[i] for t, i in zip(got, ids))
    again = tmp_path / "again"
    assert sample(run, again, "--captions", str(ann), "--seed", "0", "--num-samples", "2") == 0
    assert [s["txt"] for s in _shard_samples(again)] == [s["txt"] for s in _shard_samples(out)][:2]
    assert with_caps  # the fixture changed if this fails
    report = tmp_path / "report.json"
    rc = run_cli(eval_main, ["--samples", str(out), "--reference", str(t2i), "--metrics", "fid", "--clip-model",
                             "tiny-clip", "--inception-weights", "random:0", "--no-cache", "--batch-size", "4",
                             "--out", str(report), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads(report.read_text())
    assert np.isfinite(rep["metrics"]["fid"]) and rep["metrics"]["clip_score"] >= 0
    assert rep["reference"]["transform"].startswith("uvit-center-crop@256")


def test_wrong_conditioning_inputs_are_one_line(run, prompt_file, tmp_path):
    from trainer.sampling import job
    with pytest.raises(UserError, match="text-conditioned: give --prompts"):
        job.main(["--ckpt", str(run), "--out", str(tmp_path / "x"), *FAST])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(UserError, match="has no prompts"):
        job.main(["--ckpt", str(run), "--out", str(tmp_path / "y"), *FAST, "--prompts", str(empty)])
    with pytest.raises(UserError, match="not both"):
        job.main(["--ckpt", str(run), "--out", str(tmp_path / "z"), *FAST, "--prompts", str(prompt_file),
                  "--captions", str(prompt_file)])


def test_a_bare_state_dict_in_the_official_layout_samples(prompt_file, tmp_path):
    """An MMDiT state dict in the official key layout (no config) is recognised by the registry and samples from
    prompts; the VAE and text encoder come from flags, as for a released file."""
    from trainer.models import MMDiT_models
    torch.manual_seed(0)
    bare = tmp_path / "mmdit.pt"
    torch.save(MMDiT_models["MMDiT-Debug/2"](input_size=32, context_dim=64, z_dims=[64]).state_dict(), bare)
    out = tmp_path / "out"
    assert sample(bare, out, "--prompts", str(prompt_file), "--text-encoder", "tiny-clip-text") == 0
    m = load_manifest(out, kind="samples")
    assert m.num_samples == 3 and m.extra["sampler"]["model"] == "MMDiT-Debug/2" and "txt" in m.fields


@pytest.mark.slow
def test_the_fid_watcher_follows_a_text_run(run, t2i, tmp_path):  # noqa: F811
    """`evaluation watch` on an MMDiT run: its exports sample one caption per reference image (the captioned
    features manifest) and each row carries FID and the CLIP score."""
    from evaluation.watch import main as watch_main
    rc = run_cli(watch_main, [str(run), "--reference", str(t2i), "--once", "--num-samples", "3", "--num-steps", "2",
                              "--batch-size", "4", "--inception-weights", "random:0", "--metrics", "fid",
                              "--clip-model", "tiny-clip", "--eval-batch-size", "4"])
    assert rc == 0
    rows = [json.loads(x) for x in (run / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(r["fid"]) and r["clip_score"] >= 0 for r in rows)
