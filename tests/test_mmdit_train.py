"""Text-to-image training (issue 24, section 2): MMDiT-Debug/2 + REPA on COCO-layout features with int8 caption
contexts, through the family registry; exact resume after SIGKILL; the caption chosen per (seed, global sample);
classifier-free dropout to the manifest's empty context; the one-line input errors.

The features come from the real extraction code run in this process (tests/test_t2i_pipeline.py), once per module.
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from common import UserError, run_cli
from helpers import make_features_manifest
from manifests import iter_shard, load_manifest
from manifests.codecs import decode_sample, field_codec
from manifests.schema import empty_context
from test_t2i_pipeline import TINY, extract_inprocess, write_coco
from trainer_common import ckpt, popen, run_inproc, same_state, stats, wait_for

from trainer.__main__ import main as trainer_main
from trainer.data.context import cond_to_device
from trainer.data.indexed import FeatureBatches, StepSampler, build_index, needed_exts, resolve_fields
from trainer.loop.steprng import caption_choice

SEED = 0


def train_argv(feats: Path, run: Path, *extra: str, steps: int = 4) -> list[str]:
    """4 steps, checkpoints every 2, and a 2-step prompt grid every 2 steps."""
    return ["train", "--manifest", str(feats), "--run-dir", str(run), "--model", "MMDiT-Debug/2", "--encoders",
            "tiny-dinov2", "--batch-size", "4", "--steps", str(steps), "--ckpt-every", "2", "--precision", "fp32",
            "--num-workers", "0", "--log-every", "1", "--report-to", "none", "--sample-every", "2",
            "--sample-num-steps", "2", *extra]


@pytest.fixture(scope="module")
def t2i(tmp_path_factory) -> Path:
    """COCO layout -> `pipeline extract --text-encoder tiny-clip-text` (int8 contexts, 1 to 3 captions a sample)."""
    root = tmp_path_factory.mktemp("coco")
    images, captions = write_coco(root)
    out = root / "feat"
    extract_inprocess(source=str(images), captions=str(captions), out=str(out), **TINY)
    return out


@pytest.fixture(scope="module")
def mmdit_run(t2i, tmp_path_factory) -> Path:
    """The uninterrupted reference run, with --trace-data."""
    run = tmp_path_factory.mktemp("mmdit") / "a"
    assert run_cli(trainer_main, train_argv(t2i, run, "--trace-data")) == 0
    return run


def _samples(feats: Path) -> dict[str, dict]:
    m = load_manifest(feats)
    return {s["__key__"]: s for url in m.shard_paths() for s in iter_shard(url)}


def _dataset(feats: Path) -> tuple[FeatureBatches, object]:
    m = load_manifest(feats)
    spec = resolve_fields(m, ["tiny-dinov2"], 2, False, "text", "MMDiT-Debug/2")
    return FeatureBatches(build_index(m, needed_exts(spec, False)), spec, SEED, False), m


def _rows(ds: FeatureBatches, world: int, micro: int, steps: int = 3, batch: int = 4) -> dict[int, tuple]:
    """Global position -> (key, caption index, decoded context (77, D)) over every rank's micro-batches."""
    out = {}
    for rank in range(world):
        for item in StepSampler(len(ds.index), batch, rank, world, micro, SEED, 0, steps):
            b = ds[item]
            ctx = cond_to_device(b, torch.device("cpu"))  # (n, 77, D) float32
            assert ctx.dtype == torch.float32 and b["y"].dtype == torch.int8  # shipped as codes, decoded here
            for j, pos in enumerate(item[1]):
                out[int(pos)] = (b["keys"][j], b["captions"][j], ctx[j].clone())
    return out


@pytest.mark.slow
def test_train_then_kill_and_resume_is_bit_identical(mmdit_run, t2i, tmp_path, capsys):
    """Planted bugs caught: the caption drawn from a process-global RNG (Python's `random`, torch's global
    generator) or from loader state that no checkpoint holds: the resumed run then reads other captions and its
    weights differ; a text run that draws class-label grids (it would crash at step 0 or 2)."""
    cfg = json.loads((mmdit_run / "config.json").read_text())
    assert cfg["model"] == "MMDiT-Debug/2" and cfg["classes"] == [] and "num_classes" not in cfg["model_kwargs"]
    assert cfg["model_kwargs"]["context_dim"] == 64 and cfg["model_kwargs"]["z_dims"] == [64]
    assert cfg["context"]["field"] == "context" and cfg["context"]["length"] == 77
    rows = stats(mmdit_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert all(r["proj_loss"] != 0 for r in rows)  # the REPA term on the image tokens is on
    log = (mmdit_run / "log.txt").read_text()
    # Grids for fixed prompts: each of the first samples' first caption, from the manifest's own contexts.
    assert sorted(p.name for p in (mmdit_run / "samples").glob("step-*.png")) == \
        ["step-0000000.png", "step-0000002.png", "step-0000004.png"]
    assert "2 ode steps" in log
    first = list(dict.fromkeys(s["json"]["captions"][0] for s in _samples(t2i).values()))  # distinct, in order
    assert (mmdit_run / "samples" / "prompts.txt").read_text().splitlines() == first[:16]

    b = tmp_path / "b"  # SIGKILL while checkpoint 4 is half-written, then the same command again
    p = popen(train_argv(t2i, b), env={"REPA_TEST_SLOW_CKPT": "4:120"})
    wait_for(lambda: (b / "checkpoints").is_dir() and any(x.name.startswith(".tmp-0000004.pt")
                                                          for x in (b / "checkpoints").glob("*")),
             180, "checkpoint 4 tmp file", p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (b / "checkpoints" / "0000004.pt").exists()
    capsys.readouterr()
    assert run_cli(trainer_main, train_argv(t2i, b)) == 0
    assert "0000002.pt" in capsys.readouterr().out  # resumed from the last complete checkpoint
    same_state(ckpt(mmdit_run, 4), ckpt(b, 4))  # weights, EMA, AdamW moments
    assert [r["loss"] for r in stats(mmdit_run)] == [r["loss"] for r in stats(b)]


def test_trace_captions_follow_the_seed_and_global_position(mmdit_run, t2i):
    """The run's trace names each sample's caption: exactly caption_choice(seed, step * batch + j, K).
    Planted bug caught: a loader that always reads caption 0, or draws its own (e.g. per-worker) numbers."""
    counts = {k: len(s["json"]["captions"]) for k, s in _samples(t2i).items()}
    lines = [json.loads(x) for x in (mmdit_run / "trace" / "rank0.jsonl").read_text().splitlines()
             if "keys" in x]
    assert [r["step"] for r in lines] == [0, 1, 2, 3]
    for r in lines:
        want = caption_choice(SEED, r["step"] * 4 + np.arange(4), np.array([counts[k] for k in r["keys"]]))
        assert r["captions"] == want.tolist()


def test_caption_choice_is_rank_and_micro_batch_free_and_uniform(t2i):
    """One rank with whole batches and two ranks with micro-batches of 1 pick the same caption, and the same
    decoded context, at every global position; over many positions every caption of a sample is drawn about
    equally. Planted bugs caught: choosing by the index within the micro-batch or rank (the split then changes
    the captions), or `hash % K` replaced by a constant row."""
    ds, _ = _dataset(t2i)
    one, two = _rows(ds, world=1, micro=4), _rows(ds, world=2, micro=1)
    assert sorted(one) == sorted(two) == list(range(12))
    for pos in one:
        (k1, c1, x1), (k2, c2, x2) = one[pos], two[pos]
        assert (k1, c1) == (k2, c2) and torch.equal(x1, x2), pos
    # the chooser itself: uniform over K, deterministic in (seed, position), another seed another draw
    pos = np.arange(30_000)
    draws = caption_choice(SEED, pos, np.full(len(pos), 3))
    assert np.allclose(np.bincount(draws, minlength=3) / len(pos), 1 / 3, atol=0.02)
    assert np.array_equal(draws, caption_choice(SEED, pos, np.full(len(pos), 3)))
    assert not np.array_equal(draws, caption_choice(SEED + 1, pos, np.full(len(pos), 3)))
    assert set(caption_choice(SEED, pos, np.array([1] * len(pos)))) == {0}


def test_loader_workers_ship_the_same_contexts_through_shared_rings(t2i):
    """With loader workers the contexts travel in the shared rings (RingRef) and arrive as the in-process reads.
    Planted bugs caught: a ring without context buffers (the batch keeps int64 labels), or slots handed out
    before the caption rows are written."""
    from trainer.data.indexed import make_loader
    ds, _ = _dataset(t2i)
    want = _rows(ds, world=1, micro=2, steps=2)
    ds2, _ = _dataset(t2i)
    got = {}
    for b in make_loader(ds2, StepSampler(len(ds2.index), 4, 0, 1, 2, SEED, 0, 2), num_workers=2, pin=False):
        ctx = cond_to_device(b, torch.device("cpu"))
        for j in range(len(b["keys"])):
            got[b["pos0"] + j] = (b["keys"][j], b["captions"][j], ctx[j].clone())
    assert sorted(got) == sorted(want)
    for pos, (k, c, x) in want.items():
        assert got[pos][:2] == (k, c) and torch.equal(got[pos][2], x), pos


def test_int8_context_decode_equals_the_manifests_decode(t2i):
    """The loader's codes, decoded on the device by cond_to_device, equal manifests.codecs.decode_sample's row of
    the chosen caption exactly, for the indexed and the --stream reader. Planted bugs caught: reading the codes
    at a wrong offset (another caption's rows), pairing codes with another caption's scales, skipping the scale."""
    from trainer.data.stream import StreamBatches
    ds, m = _dataset(t2i)
    codec = field_codec("context", m.fields["context"])
    samples = _samples(t2i)
    rows = _rows(ds, world=1, micro=4, steps=2)
    assert {c for _, c, _ in rows.values()} != {0}  # some sample trains on a caption other than its first
    for key, c, got in rows.values():
        want = decode_sample(samples[key], "context", codec, where=key)[c]  # (77, D)
        assert np.array_equal(got.numpy(), want), key
    stream = StreamBatches(m, ds.spec, SEED, 0, 1, 4, 2, 0, 2)
    for b in stream:
        ctx = cond_to_device(b, torch.device("cpu"))
        for j, key in enumerate(b["keys"]):
            k = len(samples[key]["json"]["captions"])
            assert b["captions"][j] == int(caption_choice(SEED, np.array([b["pos0"] + j]), np.array([k]))[0])
            want = decode_sample(samples[key], "context", codec, where=key)[b["captions"][j]]
            assert np.array_equal(ctx[j].numpy(), want), key


def test_dropout_replaces_the_context_with_the_manifests_empty_one(t2i, tmp_path):
    """The loss hands the model the empty caption's context exactly where `drop` is set, and the run's setup
    gives the loss the manifest's empty context. Planted bugs caught: the drop ignored (the caption kept),
    replaced by zeros, or by the empty context of another manifest; drop without an empty context passing."""
    from trainer.loop.config import resolve
    from trainer.loop.runtime import setup
    from trainer.models import MMDIT
    seen = {}

    def model(x_t, t, context=None):
        seen["context"] = context
        return torch.zeros_like(x_t), []
    g = torch.Generator().manual_seed(0)
    x, ctx, null = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 77, 64, generator=g), torch.randn(77, 64)
    drop = torch.tensor([True, False, True, False])
    MMDIT.objective.loss(model, x, ctx, [], drop=drop, null_context=null, t=torch.rand(4), eps=torch.randn_like(x))
    got = seen["context"]
    assert torch.equal(got[0], null) and torch.equal(got[2], null)
    assert torch.equal(got[1], ctx[1]) and torch.equal(got[3], ctx[3])
    with pytest.raises(ValueError, match="empty caption"):
        MMDIT.objective.loss(model, x, ctx, [], drop=drop)
    cfg, _ = resolve(train_argv(t2i, tmp_path / "r", "--micro-batch", "0")[1:])
    r = setup(cfg)
    try:
        assert torch.equal(r.cond_kw["null_context"], torch.from_numpy(empty_context(load_manifest(t2i))))
        assert r.rand.drop_prob == 0.1 and r.context == "context"  # --class-dropout-prob drives the drop draw
    finally:
        r.close()


def test_wrong_conditioning_or_width_is_one_line(t2i, tmp_path, capsys):
    """Class features to MMDiT, caption features to SiT, and 64-wide contexts to MMDiT/2 (768) each stop before
    step 0 with one line naming the manifest and the field. Planted bugs caught: the context check skipped (SiT
    then fails on the empty class list, a message without 'context'), or MMDiT/2 silently taking 64-wide text."""
    classes = tmp_path / "classes"
    make_features_manifest(classes, num=4, classes=2, shard_size=4, latent_shape=(8, 16, 16), tokens=64)
    cases = [(["--manifest", str(classes), "--model", "MMDiT-Debug/2"], ["no caption-context field 'context'"]),
             (["--manifest", str(t2i), "--model", "SiT-Debug/2", "--encoders", "none"],
              ["caption-context field 'context'", "class-conditional"]),
             (["--manifest", str(t2i), "--model", "MMDiT/2", "--encoders", "none"],
              ["field 'context' holds 64-wide", "embeds 768-wide"])]
    for flags, wants in cases:
        rc, err = run_inproc(["train", "--run-dir", str(tmp_path / "r"), "--steps", "1", *flags], capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, (flags, err)
        manifest = flags[1]
        assert str(Path(manifest).resolve()) in lines[0] or manifest in lines[0], lines[0]
        assert all(w in lines[0] for w in wants), lines[0]


def test_family_record_presets_and_released_files(tmp_path):
    """MMDiT is registered as a text family with the interpolant objective, SiT's samplers, the paper's depth 8
    for MMDiT/2, the Table 12 presets; a bare MMDiT state dict is recognised and its size detected.
    Planted bugs caught: a preset without REPA's settings, MMDiT/2's encoder depth left at the debug value, a
    released file taken for SiT or DiT."""
    from trainer.loop.config import PRESETS
    from trainer.models import MMDIT, MMDiT_models, family_for, load_model
    from trainer.sampling.samplers import ode, sde
    assert family_for("MMDiT/2") is MMDIT and MMDIT.conditioning == "text" and MMDIT.objective.paths[0] == "linear"
    assert MMDIT.samplers == {"ode": ode, "sde": sde}
    assert MMDiT_models["MMDiT/2"].resolve(z_dims=[768])["encoder_depth"] == 8
    assert MMDiT_models["MMDiT-Debug/2"].resolve()["encoder_depth"] == 2
    p = PRESETS["mmdit-repa-coco"]
    assert (p["model"], p["encoders"], p["enc_depth"], p["proj_coeff"], p["steps"], p["batch_size"]) == \
        ("MMDiT/2", ["dinov2-vit-b"], 8, 0.5, 150_000, 256)
    assert PRESETS["mmdit-coco"]["encoders"] == [] and PRESETS["mmdit-coco"]["steps"] == 150_000
    torch.manual_seed(0)
    path = tmp_path / "last.pt"
    torch.save(MMDiT_models["MMDiT-Debug/2"](z_dims=[32], context_dim=16).state_dict(), path)
    loaded = load_model(path)
    assert loaded.family is MMDIT and loaded.name == "MMDiT-Debug/2" and loaded.built_from == "released defaults"
    assert loaded.record.model_kwargs["context_dim"] == 16 and loaded.record.vae == "sd-vae-ft-mse"
    with pytest.raises(UserError, match="context_embedder"):
        from trainer.models import load_weights_into
        load_weights_into(MMDiT_models["MMDiT-Debug/2"](z_dims=[32], context_dim=8), path, name="MMDiT-Debug/2")


@pytest.mark.slow
def test_two_torchrun_ranks_equal_one_rank(t2i, tmp_path, capsys):
    """MMDiT under torchrun: 2 ranks (gloo) train on the captions, noise and dropout of the 1-rank run, so losses
    and weights agree within float rounding; the loader-level test above pins the caption rule itself."""
    import subprocess
    import sys

    from helpers import REPO, free_port
    from trainer_common import ENV, assert_weights_close

    def argv(run: Path) -> list[str]:
        return train_argv(t2i, run, "--lr", "1e-3", "--sample-every", "0", steps=2)
    two, one = tmp_path / "two", tmp_path / "one"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(free_port()), "-m", "trainer", *argv(two)],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    rc, err = run_inproc(argv(one), capsys)
    assert rc == 0, err
    np.testing.assert_allclose([r["loss"] for r in stats(two)], [r["loss"] for r in stats(one)], rtol=1e-5)
    assert_weights_close(ckpt(two, 2)["model"], ckpt(one, 2)["model"], steps=2)
