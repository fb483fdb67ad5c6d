"""The model-family seam (trainer/models/family.py): a family registered here, in the test, is built, saved, loaded
and sampled by the one loader and the sampling job, with no other file knowing it; and the released defaults are
one set, the same for sampling and the alignment analysis."""
from __future__ import annotations

import argparse

import pytest
import torch

from common import UserError, run_cli
from manifests import load_manifest

import trainer.models as models
from trainer.models import Family, ModelSpec, Released
from trainer.models.sit import SIT, SiT, SiT_models
from trainer.sampling import job

KW = dict(input_size=8, in_channels=4, num_classes=4, encoder_depth=2, z_dims=[64], class_dropout_prob=0.1)


class TinyNet(SiT):
    """A SiT under another family's name, with a marker buffer so its state dict is its own."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("tiny_marker", torch.ones(1))


def _resolve(**kwargs):
    return SiT_models["SiT-Debug/2"].resolve(**kwargs)


def _make(**kwargs) -> TinyNet:
    return TinyNet(**_resolve(**kwargs))


_make.resolve = _resolve  # type: ignore[attr-defined]


def _released_config(sd, spec, args):
    return {**SIT.released.config({k: v for k, v in sd.items() if k != "tiny_marker"}, spec, args),
            "model": spec.model or "Tiny/2"}


TINY = Family(name="Tiny", models={"Tiny/2": _make}, conditioning="class", objective=SIT.objective,
              samplers={"ode": SIT.samplers["ode"]},
              released=Released(model="Tiny/2", recognises=lambda sd: "tiny_marker" in sd, config=_released_config),
              hint=SIT.hint, prepare_sampling=SIT.prepare_sampling)


@pytest.fixture
def tiny():
    models.register(TINY)
    try:
        yield TINY
    finally:
        models.unregister(TINY.name)


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    m = models.build_model("Tiny/2", **KW)
    with torch.no_grad():  # adaLN-Zero makes a fresh model's output zero: give it some structure
        for name, p in m.named_parameters():
            if "adaLN" in name or "final_layer" in name:
                p.normal_(0, 0.05)
    return m.state_dict()


def _config() -> dict:
    return {"model": "Tiny/2", "model_kwargs": dict(KW), "path": "linear", "vae": "tiny-vae",
            "latent_scale": 0.18215, "latent_shift": 0.0, "resolution": 64, "classes": ["a", "b", "c", "d"]}


def test_a_registered_family_is_built_and_loaded(tiny, tmp_path):
    assert models.family_for("Tiny/2") is tiny and "Tiny/2" in models.model_names()
    assert isinstance(models.build_model("Tiny/2", **KW), TinyNet)
    sd = _weights()
    torch.save({"ema": sd, "model": sd, "step": 3, "config": _config()}, tmp_path / "ours.pt")
    torch.save(sd, tmp_path / "bare.pt")
    for path, built_from in ((tmp_path / "ours.pt", "config.json"), (tmp_path / "bare.pt", "released defaults")):
        lm = models.load_model(path)
        assert isinstance(lm.model, TinyNet) and lm.family is tiny and lm.name == "Tiny/2", path
        assert lm.built_from == built_from
        assert all(torch.equal(lm.model.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(UserError, match="does not fit SiT-Debug/2"):  # named as another family's model
        models.load_model(tmp_path / "bare.pt", ModelSpec(model="SiT-Debug/2"))


def test_the_sampling_job_uses_the_family(tiny, tmp_path, capsys):
    """The job samples with the family's own sampler entry points and refuses a mode it does not declare."""
    from trainer.loop.checkpoint import export_ema
    export = export_ema(tmp_path / "run", 3, _weights(), _config())
    out = tmp_path / "samples"
    argv = ["--ckpt", str(export), "--out", str(out), "--num-samples", "4", "--steps", "2", "--batch-size", "4"]
    assert run_cli(job.main, argv + ["--mode", "ode"]) == 0
    m = load_manifest(out, kind="samples")
    assert m.extra["sampler"]["model"] == "Tiny/2" and m.num_samples == 4
    assert run_cli(job.main, argv + ["--mode", "sde", "--out", str(tmp_path / "sde")]) == 2
    assert "Tiny samples with ode" in capsys.readouterr().err


def test_register_refuses_a_name_twice(tiny):
    with pytest.raises(ValueError, match="already registered"):
        models.register(TINY)
    with pytest.raises(ValueError, match="reuses the model names"):
        models.register(Family(name="Other", models={"SiT-XL/2": SiT_models["SiT-XL/2"]}, conditioning="class",
                               objective=SIT.objective, samplers=SIT.samplers, released=SIT.released))


def test_released_defaults_are_one_set():
    """An unnamed official file of SiT-XL/2's shapes gets REPA's defaults: SiT-XL/2, encoder depth 8, one 768-d
    projector, 256 px, 1000 classes, the linear path (shapes on the meta device: no memory)."""
    from trainer.models.checkpoints import _detect_size
    with torch.device("meta"):
        sd = SiT_models["SiT-XL/2"](z_dims=[768]).state_dict()
    assert models.recognise(sd) is SIT
    conf = SIT.released.config(sd, ModelSpec(), {})
    kw = conf["model_kwargs"]
    assert conf["model"] is None and _detect_size(SIT, sd, kw) == "SiT-XL/2"
    assert (kw["encoder_depth"], kw["z_dims"], kw["num_classes"], kw["input_size"]) == (8, [768], 1000, 32)
    assert (conf["resolution"], conf["path"], conf["vae"]) == (256, "linear", "sd-vae-ft-ema")
    # Flags, then the file's own options, then shapes: a Namespace's values beat the shapes, a flag beats both.
    conf = SIT.released.config(sd, ModelSpec(encoder_depth=4), {"encoder_depth": 6, "path_type": "cosine"})
    assert conf["model_kwargs"]["encoder_depth"] == 4 and conf["path"] == "cosine"


def test_sampling_and_alignment_load_a_bare_file_alike(tmp_path):
    """The same bare state dict, no flags: both stages detect the same model and load the same weights."""
    from evaluation.align.model import load_model as align_load
    torch.manual_seed(0)
    sd = SiT_models["SiT-Debug/2"](**KW).state_dict()
    torch.save(sd, tmp_path / "last.pt")
    a = job.load_model(job.parse(["--ckpt", str(tmp_path / "last.pt"), "--out", str(tmp_path / "o")]))
    b = align_load(str(tmp_path / "last.pt"), ModelSpec(), torch.device("cpu"))
    assert a.name == b.name == "SiT-Debug/2" and a.record.path == b.path == "linear"
    assert a.record.resolution == 64 and a.model.num_classes == b.model.num_classes == 4
    bsd = b.model.state_dict()
    assert all(torch.equal(v, bsd[k]) for k, v in a.model.state_dict().items())  # projectors dropped in a only


def test_official_namespace_args(tmp_path):
    """An official training dict: its argparse options name the model; --weights model takes the raw weights."""
    torch.manual_seed(0)
    ema, raw = SiT_models["SiT-Debug/2"](**KW).state_dict(), SiT_models["SiT-Debug/2"](**KW).state_dict()
    args = argparse.Namespace(model="SiT-Debug/2", encoder_depth=2, resolution=64, num_classes=4, path_type="cosine")
    torch.save({"ema": ema, "model": raw, "args": args, "steps": 9}, tmp_path / "official.pt")
    lm = models.load_model(tmp_path / "official.pt")
    assert lm.record.path == "cosine" and lm.checkpoint.step == 9 and lm.model.encoder_depth == 2
    assert all(torch.equal(lm.model.state_dict()[k], v) for k, v in ema.items())
    lm = models.load_model(tmp_path / "official.pt", ModelSpec(weights="model"))
    assert all(torch.equal(lm.model.state_dict()[k], v) for k, v in raw.items())
