"""FD_DINOv2 as EDM2 computes it: the features against timm's ViT called directly with the preprocessing written
out (both resize modes), FD numerics, the metric choice, and reference statistics for both networks."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval_sets import N, RES, evaluate, sets, write_lively_dinov2  # noqa: F401 (sets is a fixture)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def lively(tmp_path_factory):
    return write_lively_dinov2(tmp_path_factory.mktemp("dino") / "tiny.safetensors")


def _independent(weights, images: np.ndarray, resize: str) -> torch.Tensor:
    """EDM2's DINOv2Detector written out over timm's ViT built at 224 directly, with the official hub model's
    position-embedding interpolation (37x37 -> 16x16: bicubic, no antialias, scale factor 16.1/37)."""
    import timm
    from safetensors.torch import load_file
    sd = load_file(str(weights))
    pe = sd["pos_embed"]  # (1, 1 + 37*37, 64)
    grid = pe[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", align_corners=False)
    sd["pos_embed"] = torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, -1)], dim=1)
    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224,
                            embed_dim=64, depth=2, num_heads=2).eval()
    net.load_state_dict(sd)
    if resize == "pil":  # dgm-eval: PIL bicubic on the uint8 image
        x = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.BICUBIC)) for im in images])
        x = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    else:  # EDM2's default: float pixels, bicubic with antialias
        x = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=(224, 224), mode="bicubic",
                          antialias=True)
    x = (x / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return net.forward_features(x)[:, 0]  # the final-norm CLS token


@pytest.mark.parametrize("resize", ["torch", "pil"])
def test_features_match_the_written_out_detector(lively, resize):
    from evaluation.dinov2 import DinoV2Features
    images = np.random.default_rng(1).integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)
    got = DinoV2Features(f"tiny-dinov2={lively}", resize=resize)(images)
    want = _independent(lively, images, resize)
    assert got.shape == (5, 64)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    other = _independent(lively, images, "pil" if resize == "torch" else "torch")
    assert (got - other).abs().max() > 1e-3  # the test tells the two resize modes apart
    assert got.std(dim=0).mean() > 1e-2  # and the features depend on the image


def test_timm_resampling_is_not_the_official_one(lively):
    """timm's own resampling (antialiased, by size) would change the features: we interpolate as the hub does."""
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed

    from evaluation.dinov2 import official_pos_embed
    pe = load_file(str(lively))["pos_embed"]
    ours = official_pos_embed(pe, 16)
    timms = resample_abs_pos_embed(pe, new_size=(16, 16), old_size=(37, 37), num_prefix_tokens=1)
    assert ours.shape == timms.shape == (1, 257, 64)
    assert torch.equal(ours[:, 0], pe[:, 0]) and (ours - timms).abs().max() > 1e-2


def test_fd_of_a_set_with_itself_is_zero_and_a_closed_form_gaussian_matches():
    from evaluation.metrics import frechet_distance, statistics
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((3000, 1024)) @ (rng.standard_normal((1024, 1024)) / 32)  # (N, 1024), DINOv2-L
    mu, sigma = statistics(feats.astype(np.float32))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    shift = rng.standard_normal(1024)  # same covariance, shifted mean: FD = |shift|^2 exactly
    mu2, sigma2 = statistics(feats.astype(np.float32) + shift.astype(np.float32))
    assert frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(float(shift.astype(np.float32) @
                                                                           shift.astype(np.float32)), rel=1e-6)
    a, b = rng.uniform(0.5, 2, 1024), rng.uniform(0.5, 2, 1024)  # diagonal Gaussians
    m1, m2 = rng.standard_normal(1024), rng.standard_normal(1024)
    want = ((m1 - m2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-9)


def test_fd_dinov2_end_to_end_and_against_itself(sets, lively, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc, stdout, err = evaluate(capsys, "--samples", str(sets.npz), "--reference", str(sets.npz), "--out", str(out),
                               "--metrics", "fid,fd_dinov2", "--dinov2", f"tiny-dinov2={lively}")
    assert rc == 0, err
    rep = json.loads(out.read_text())
    assert set(rep["metrics"]) == {"fid", "fd_dinov2"}
    assert rep["metrics"]["fd_dinov2"] == pytest.approx(0.0, abs=1e-6)
    assert rep["dinov2"]["model"] == "tiny-dinov2" and rep["dinov2"]["resize"] == "torch"
    assert rep["dinov2"]["comparable"] is False and "FD_DINOv2↓" in stdout.splitlines()[0]
    rc, _, err = evaluate(capsys, "--samples", str(sets.npz), "--reference", str(sets.ref), "--out", str(out),
                          "--metrics", "fd_dinov2", "--dinov2", f"tiny-dinov2={lively}", "--resize", "pil")
    assert rc == 0, err
    rep = json.loads(out.read_text())
    assert set(rep["metrics"]) == {"fd_dinov2"} and rep["metrics"]["fd_dinov2"] > 0
    assert "inception" not in rep  # no Inception metric asked for: the network is not even loaded


def test_default_adds_fd_dinov2_only_when_its_weights_are_here(sets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    rc, _, err = evaluate(capsys, "--samples", str(sets.npz), "--reference", str(sets.ref), "--out", str(out))
    assert rc == 0, err
    notes = [ln for ln in err.splitlines() if "FD_DINOv2" in ln]
    assert len(notes) == 1 and "vit_large_patch14_dinov2" in notes[0]
    assert "fd_dinov2" not in json.loads(out.read_text())["metrics"]
    rc, _, err = evaluate(capsys, "--samples", str(sets.npz), "--reference", str(sets.ref), "--out", str(out),
                          "--dinov2", "tiny-dinov2")  # a preset that needs no download
    assert rc == 0, err
    assert set(json.loads(out.read_text())["metrics"]) == {"fid", "sfid", "is", "precision", "recall", "fd_dinov2"}
    rc, _, err = evaluate(capsys, "--samples", str(sets.npz), "--reference", str(sets.ref), "--dinov2", "dinov2-vit-q")
    assert rc == 2 and "unknown DINOv2 model 'dinov2-vit-q'" in err
    rc, _, err = evaluate(capsys, "--samples", str(sets.npz), "--reference", str(sets.ref), "--metrics", "fid,kid")
    assert rc == 2 and "unknown metric 'kid'" in err


def test_written_reference_alone_equals_the_images(sets, lively, tmp_path, capsys, monkeypatch):
    """--write-reference stores both networks' statistics and pool3: evaluating against the .npz alone runs no
    network over the reference and gives the numbers of evaluating against the images."""
    ref_npz, direct, via = tmp_path / "ref.npz", tmp_path / "direct.json", tmp_path / "via.json"
    dino = ["--dinov2", f"tiny-dinov2={lively}", "--metrics", "fid,sfid,is,pr,fd_dinov2"]
    rc, _, err = evaluate(capsys, "--reference", str(sets.ref), "--write-reference", str(ref_npz), "--resolution",
                          str(RES), *dino)
    assert rc == 0, err
    with np.load(ref_npz, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    assert arrays["pool3"].shape == (N, 2048) and arrays["mu_dinov2"].shape == (64,)
    assert arrays["sigma_dinov2"].shape == (64, 64) and str(arrays["dinov2_weights"]).startswith("dinov2:tiny")
    assert {"arr_0", "mu", "sigma", "mu_s", "sigma_s", "inception_weights"} <= set(arrays)
    assert evaluate(capsys, "--samples", str(sets.npz), "--reference", str(sets.ref), "--out", str(direct),
                    *dino)[0] == 0

    import evaluation.features as features
    descs = []
    real = features.compute_activations

    def spy(images, *a, **k):
        descs.append(k.get("desc"))
        return real(images, *a, **k)
    monkeypatch.setattr(features, "compute_activations", spy)
    rc, _, err = evaluate(capsys, "--samples", str(sets.npz), "--reference", str(ref_npz), "--out", str(via), *dino)
    assert rc == 0, err
    assert descs == ["samples"]  # nothing was computed for the reference
    a, b = json.loads(direct.read_text()), json.loads(via.read_text())
    assert b["reference"]["stats_source"] == b["reference"]["dinov2_stats_source"] == "npz"
    assert b["reference"]["cache"] == "stored"
    for k in ("fid", "sfid", "fd_dinov2"):
        assert b["metrics"][k] == pytest.approx(a["metrics"][k], rel=1e-9, abs=1e-9)
    for k in ("is", "precision", "recall"):
        assert b["metrics"][k] == a["metrics"][k]
    # Another resize mode is another network input: the stored DINOv2 statistics no longer apply.
    rc, _, err = evaluate(capsys, "--samples", str(sets.npz), "--reference", str(ref_npz), "--out", str(via),
                          *dino, "--resize", "pil")
    assert rc == 0, err
    rep = json.loads(via.read_text())
    assert rep["reference"]["dinov2_stats_source"].startswith("computed") and rep["reference"]["stats_source"] == "npz"
