"""Autoguidance (Karras et al. 2024): one step against D_w = D_guide + w (D_main - D_guide), the guidance interval,
DiT's samplers, and `trainer sample --guide-ckpt RUN@STEP` end to end."""
from __future__ import annotations

import pytest
import torch

from common import UserError, run_cli
from manifests import load_manifest
from test_sampler_job import FAST, KW, ckpts, debug_model, images, run_config, same_images, sample  # noqa: F401

from trainer.sampling import job
from trainer.sampling.autoguide import AutoGuided, _first
from trainer.sampling.samplers import sample_ode

W = 2.5


def _velocity(model):
    return job.Velocity(model.eval(), torch.device("cpu"), "fp32", compile_=False)


def test_one_ode_step_is_the_autoguidance_formula():
    """Euler from t=1 to 0 in one step: x = z - D_w with D_w = D_guide + w (D_main - D_guide), the guide called with
    the conditional labels; outside the interval the main model alone. (Planted bugs this catches: the guide given
    the null labels, i.e. CFG of the guide; the halves swapped, i.e. D_main + w (D_guide - D_main).)"""
    main, guide = debug_model(0).eval(), debug_model(1).eval()  # eval: no label dropout
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 2, 3])
    t1 = torch.ones(3)
    with torch.no_grad():
        d_main = main(z, t1, y=y)[0].double()  # (N, C, H, W)
        d_guide = guide(z, t1, y=y)[0].double()
        d_null = main(z, t1, y=torch.full_like(y, KW["num_classes"]))[0].double()
    fn = AutoGuided(_velocity(main), _velocity(guide), null_class=KW["num_classes"])
    got = sample_ode(fn, z, y, steps=1, cfg_scale=W)
    want = z.double() - (d_guide + W * (d_main - d_guide))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (got - (z.double() - (d_null + W * (d_main - d_null)))).abs().max() > 1e-3  # not CFG
    outside = sample_ode(fn, z, y, steps=1, cfg_scale=W, guidance_low=0.0, guidance_high=0.5)
    torch.testing.assert_close(outside, z.double() - d_main, rtol=1e-6, atol=1e-6)


def test_ddpm_model_output_is_the_autoguidance_formula():
    """DiT's sampler mixes the same halves: eps_w = eps_guide + w (eps_main - eps_guide) on the guided channels, the
    main model's variance channels kept."""
    from trainer.models import DiT_models
    from trainer.sampling.ddpm import model_output
    torch.manual_seed(0)
    kw = dict(input_size=8, num_classes=4)
    main, guide = DiT_models["DiT-Debug/2"](**kw).eval(), DiT_models["DiT-Debug/2"](**kw).eval()
    with torch.no_grad():
        for m in (main, guide):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 3])
    t = torch.full((2,), 500)
    with torch.no_grad():
        e_main, e_guide = (_first(m(x, t, y)).double() for m in (main, guide))  # (N, 2C, H, W)
    fn = AutoGuided(_velocity(main), _velocity(guide), null_class=4)
    for rule, ch in (("all", 4), ("3", 3)):
        got = model_output(fn, x.double(), 500, y, cfg_scale=W, use_cfg=True, guide_channels=rule, null_class=4)
        want = e_main.clone()
        want[:, :ch] = e_guide[:, :ch] + W * (e_main[:, :ch] - e_guide[:, :ch])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def weak_run(tmp_path_factory):
    """A second run whose step-3 export holds other weights of the same shape (the 'weaker' model)."""
    from trainer.loop import checkpoint
    run = tmp_path_factory.mktemp("weak") / "run"
    checkpoint.export_ema(run, 3, debug_model(1).state_dict(), run_config())
    return run


def test_sample_with_guide_ckpt(ckpts, weak_run, tmp_path):  # noqa: F811
    """A guide identical to the main model is the main model alone (D_w = D_main for any w): its images equal
    --cfg-scale 1's. A weaker guide changes them, is recorded in the manifest, and re-using the folder with another
    guide is refused."""
    plain, same, weak = tmp_path / "plain", tmp_path / "same", tmp_path / "weak"
    n = ["--num-samples", "4", "--batch-size", "4"]
    assert sample(ckpts["run"], plain, *n) == 0
    assert sample(ckpts["run"], same, *n, "--cfg-scale", "3", "--guide-ckpt", f"{ckpts['run']}@7") == 0
    same_images(images(plain), images(same), exact=False)
    assert sample(ckpts["run"], weak, *n, "--cfg-scale", "3", "--guide-ckpt", f"{weak_run}@3") == 0
    a, b = images(plain), images(weak)
    assert any((a[i][0] != b[i][0]).any() for i in a)
    s = load_manifest(weak, kind="samples").extra["sampler"]
    assert s["guidance"] == "autoguidance" and s["guide"]["step"] == 3 and len(s["guide"]["sha256"]) == 64
    with pytest.raises(UserError, match="other settings"):
        job.main(["--ckpt", str(ckpts["run"]), "--out", str(weak), *FAST, *n, "--cfg-scale", "3",
                  "--guide-ckpt", f"{ckpts['run']}@7"])


def test_bad_guide_is_one_line(ckpts, weak_run, tmp_path):  # noqa: F811
    from trainer.loop import checkpoint
    other = tmp_path / "other"
    cfg = run_config()
    cfg["model_kwargs"] = {**KW, "num_classes": 3}
    import trainer.models as models
    checkpoint.export_ema(other, 1, models.SiT_models["SiT-Debug/2"](**cfg["model_kwargs"]).state_dict(), cfg)
    cases = [(["--guide-ckpt", f"{weak_run}@99", "--cfg-scale", "2"], "no export or checkpoint at step 99"),
             (["--guide-ckpt", f"{tmp_path}/nowhere@3", "--cfg-scale", "2"], "is not a run folder"),
             (["--guide-ckpt", f"{other}@1", "--cfg-scale", "2"], "num_classes 3"),
             (["--guide-ckpt", f"{weak_run}@3"], "needs --cfg-scale > 1")]
    for extra, needle in cases:
        with pytest.raises(UserError, match=needle):
            job.main(["--ckpt", str(ckpts["run"]), "--out", str(tmp_path / "o"), *FAST, "--num-samples", "2",
                      *extra])
    assert run_cli(job.main, ["--ckpt", str(ckpts["run"]), "--out", str(tmp_path / "o"), *FAST,
                              "--guide-ckpt", f"{weak_run}@99", "--cfg-scale", "2"]) == 2
