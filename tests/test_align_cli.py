"""`python -m evaluation align` end to end on a tiny SiT-Debug/2 export and a contract features manifest."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_user_error, make_features_manifest, run_module
from manifests import load_manifest
from common import run_cli

from evaluation.align.cli import main as align_main

MODEL_KWARGS = dict(input_size=32, in_channels=4, num_classes=4, encoder_depth=2, z_dims=[64], projector_dim=256,
                    class_dropout_prob=0.1)


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    """SiT-Debug/2 with every weight perturbed: at init adaLN-Zero makes each block the identity."""
    from trainer.models import SiT_models
    torch.manual_seed(seed)
    model = SiT_models["SiT-Debug/2"](**MODEL_KWARGS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A features manifest (4 classes, 60 images) and our export layout (safetensors + config.json)."""
    from trainer.loop.checkpoint import export_ema
    root = tmp_path_factory.mktemp("align")
    make_features_manifest(root / "feat", num=60, classes=4, shard_size=16, encoders={"tiny-dinov2": 64,
                                                                                       "tiny-siglip": 32})
    model = _tiny_model()
    cfg = {"model": "SiT-Debug/2", "model_kwargs": MODEL_KWARGS, "path": "linear", "encoders": ["tiny-dinov2"],
           "latent_scale": 0.18215, "latent_shift": 0.0, "resolution": 256}
    export = export_ema(root / "run", 10, model.state_dict(), cfg)
    bare = root / "last.pt"
    torch.save(model.state_dict(), bare)
    return {"root": root, "feat": root / "feat", "export": export, "bare": bare, "model": model}


BASE = ["--layers", "1-4", "--num-images", "48", "--epochs", "3", "--probe-batch-size", "16", "--batch-size", "16",
        "--device", "cpu"]


@pytest.mark.slow
def test_end_to_end(setup, capsys):
    out = setup["root"] / "out"
    assert run_cli(align_main, ["--ckpt", str(setup["export"]), "--manifest", str(setup["feat"]), "--out", str(out),
                                "--pca", "--pca-images", "3", *BASE]) == 0
    stdout = capsys.readouterr().out
    rep = json.loads((out / "alignment.json").read_text())
    assert rep["encoder"] == "tiny-dinov2" and rep["num_images"] == 48 and rep["t"] == 0.5 and rep["k"] == 10
    assert rep["checkpoint"]["model"] == "SiT-Debug/2" and rep["checkpoint"]["step"] == 10
    assert [r["layer"] for r in rep["layers"]] == [1, 2, 3, 4]
    for r in rep["layers"]:
        assert -1.0 <= r["cknna"] <= 1.0 and 0.0 <= r["probe_top1"] <= 1.0
    assert len({r["cknna"] for r in rep["layers"]}) == 4, "blocks differ, so must their alignment"
    assert rep["probe"]["num_train"] + rep["probe"]["num_test"] == 48 and rep["probe"]["num_test"] > 0
    assert 0.0 <= rep["probe"]["encoder_top1"] <= 1.0
    with Image.open(out / "alignment.png") as im:
        assert im.size[0] > 900 and im.mode == "RGB"
    for layer in range(1, 5):
        with Image.open(out / f"pca/layer-{layer:02d}.png") as im:
            arr = np.asarray(im)
            assert arr.std() > 10, "a PCA map must not be blank"
    assert (out / "pca/all-layers.png").is_file()
    assert "layer" in stdout and "CKNNA" in stdout
    assert not list(out.rglob(".tmp-*")), "no half-written files may remain"


def _run(argv: list[str], capsys) -> tuple[int, str]:
    rc = run_cli(align_main, argv)
    return rc, capsys.readouterr().err


@pytest.mark.slow
def test_on_pipeline_features(setup, tiny_features, capsys, tmp_path):
    """The real `pipeline extract` output (tiny presets): second encoder field, all images, PCA maps."""
    rc, err = _run(["--ckpt", str(setup["export"]), "--manifest", str(tiny_features), "--encoder", "tiny-siglip",
                    "--out", str(tmp_path), "--pca", "--pca-images", "2", "--epochs", "2", "--device", "cpu"], capsys)
    assert rc == 0, err
    rep = json.loads((tmp_path / "alignment.json").read_text())
    assert rep["encoder"] == "tiny-siglip" and rep["num_images"] == load_manifest(tiny_features).num_samples
    assert all(-1 <= r["cknna"] <= 1 for r in rep["layers"]) and (tmp_path / "pca/layer-04.png").is_file()


def test_hooks_match_manual_forward(setup):
    """Pooled hook outputs equal a hand-run of the blocks on the same noisy input, and are batch-size free."""
    from evaluation.align.data import read_align_data
    from evaluation.align.model import LoadedModel, hidden_states
    model = setup["model"]
    m = load_manifest(setup["feat"])
    data = read_align_data(m, "tiny-dinov2", 10, seed=0)
    lm = LoadedModel(model=model, name="SiT-Debug/2", path="cosine", depth=4, step=None)
    kw = dict(layers=[2, 3], t=0.3, scale=data.scale, shift=data.shift, seed=5, device=torch.device("cpu"))
    pooled, tokens = hidden_states(lm, data.moments, data.labels, batch_size=4, keep_tokens=6, **kw)
    pooled7, _ = hidden_states(lm, data.moments, data.labels, batch_size=7, **kw)
    assert np.allclose(pooled[3], pooled7[3], atol=1e-5)
    assert tokens[2].shape == (6, 256, model.pos_embed.shape[-1])
    # manual: image 0 with the same per-image generator and the cosine path
    g = torch.Generator().manual_seed(5 * 1_000_003 + 0)
    mom = torch.from_numpy(data.moments[:1])
    e1, e2 = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 4, 32, 32, generator=g)
    z = (mom[:, :4] + mom[:, 4:] * e1) * 0.18215
    a, s = np.cos(np.pi * 0.3 / 2), np.sin(np.pi * 0.3 / 2)
    with torch.no_grad():
        x = model.x_embedder(a * z + s * e2) + model.pos_embed
        c = model.t_embedder(torch.tensor([0.3])) + model.y_embedder(torch.from_numpy(data.labels[:1]), False)
        for blk in model.blocks[:3]:
            x = blk(x, c)
    assert np.allclose(pooled[3][0], x.mean(1)[0].numpy(), atol=1e-5)
    assert np.allclose(tokens[3][0], x[0].numpy(), atol=1e-5)


def test_null_label_hides_the_class(setup):
    """With the null class the hidden states do not depend on the label; with real labels they do (adaLN leak)."""
    from evaluation.align.data import read_align_data
    from evaluation.align.model import LoadedModel, hidden_states
    data = read_align_data(load_manifest(setup["feat"]), "tiny-dinov2", 8, seed=0)
    lm = LoadedModel(model=setup["model"], name="SiT-Debug/2", path="linear", depth=4, step=None)
    kw = dict(layers=[4], t=0.5, scale=data.scale, shift=data.shift, seed=0, device=torch.device("cpu"),
              batch_size=8)
    other = (data.labels + 1) % 4
    null_a, _ = hidden_states(lm, data.moments, data.labels, null_label=True, **kw)
    null_b, _ = hidden_states(lm, data.moments, other, null_label=True, **kw)
    real_a, _ = hidden_states(lm, data.moments, data.labels, **kw)
    real_b, _ = hidden_states(lm, data.moments, other, **kw)
    assert np.array_equal(null_a[4], null_b[4])
    assert not np.allclose(real_a[4], real_b[4], atol=1e-4)


def test_official_bare_state_dict(setup, capsys, tmp_path):
    """A bare state dict (official last.pt) has no config: the model is detected from its shapes, or named."""
    argv = ["--ckpt", str(setup["bare"]), "--manifest", str(setup["feat"]), "--out", str(tmp_path / "o"),
            "--skip-probe", "--layers", "2,4", "--num-images", "20", "--device", "cpu"]
    rc, err = _run(argv, capsys)
    assert rc == 0, err
    rep = json.loads((tmp_path / "o/alignment.json").read_text())
    assert rep["checkpoint"]["model"] == "SiT-Debug/2" and rep["checkpoint"]["path_type"] == "linear"
    assert [r["layer"] for r in rep["layers"]] == [2, 4] and "probe_top1" not in rep["layers"][0]
    rc, err = _run(argv + ["--model", "SiT-Debug/2", "--encoder-depth", "2"], capsys)
    assert rc == 0, err
    rc, err = _run(argv + ["--model", "SiT-B/2"], capsys)
    assert rc == 2 and "does not fit SiT-B/2" in err and "--model" in err, err


def test_weights_choice(setup, capsys, tmp_path):
    """A training checkpoint holds raw and EMA weights; --weights picks one, an export has only EMA."""
    cfg = {"model": "SiT-Debug/2", "model_kwargs": MODEL_KWARGS, "path": "linear"}
    ckpt = tmp_path / "0000005.pt"
    torch.save({"model": _tiny_model(1).state_dict(), "ema": setup["model"].state_dict(), "config": cfg,
                "step": 5}, ckpt)
    argv = ["--manifest", str(setup["feat"]), "--skip-probe", "--num-images", "20", "--device", "cpu"]
    res = {}
    for w in ("ema", "model"):
        rc, err = _run(argv + ["--ckpt", str(ckpt), "--weights", w, "--out", str(tmp_path / w)], capsys)
        assert rc == 0, err
        res[w] = [r["cknna"] for r in json.loads((tmp_path / w / "alignment.json").read_text())["layers"]]
    rc, err = _run(argv + ["--ckpt", str(setup["export"]), "--out", str(tmp_path / "e")], capsys)
    assert rc == 0, err
    exported = [r["cknna"] for r in json.loads((tmp_path / "e/alignment.json").read_text())["layers"]]
    assert res["ema"] == exported and res["model"] != res["ema"]
    rc, err = _run(argv + ["--ckpt", str(setup["export"]), "--weights", "model", "--out", str(tmp_path / "x")],
                   capsys)
    assert rc == 2 and "--weights model" in err


def test_user_errors(setup, capsys, tmp_path):
    common = ["--ckpt", str(setup["export"]), "--manifest", str(setup["feat"]), "--out", str(tmp_path / "o"),
              "--device", "cpu"]
    cases = [(["--layers", "3-9"], "--layers"), (["--layers", "x"], "--layers"),
             (["--encoder", "dinov2-vit-b"], "dinov2-vit-b"), (["--t", "1.5"], "--t"),
             (["--num-images", "8", "--k", "10"], "--k 10")]
    for extra, needle in cases:
        rc, err = _run(common + extra, capsys)
        assert rc == 2 and needle in err, (extra, err)
    rc, err = _run(["--ckpt", str(tmp_path / "nope.pt"), "--manifest", str(setup["feat"])], capsys)
    assert rc == 2 and "nope.pt" in err


def test_probe_split_too_small():
    from evaluation.align.cli import run_probes
    from evaluation.align.probe import ProbeConfig, heldout_mask
    from common import UserError
    keys = [k for k in (f"img{i}" for i in range(40)) if not heldout_mask([k])[0]][:6]
    feats = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    with pytest.raises(UserError, match="held-out"):
        run_probes({1: feats}, feats, np.arange(6) % 2, keys, 2, ProbeConfig(epochs=1))


@pytest.mark.slow
def test_cli_reports_user_error_in_one_line(setup, tmp_path):
    p = run_module("evaluation", "align", "--ckpt", str(setup["export"]), "--manifest", str(tmp_path / "missing"),
                   "--out", str(tmp_path / "o"), timeout=120)
    assert_user_error(p, "missing")
