"""REPA's command-line names, --config files and presets resolve to exactly the settings our own flags give."""
from __future__ import annotations

import json

import pytest

from helpers import assert_user_error, cli_help, run_module
from common import UserError

REPA_TRAIN = ("--data-dir feats --output-dir exps --exp-name e1 --model SiT-B/2 --enc-type dinov2-vit-b,clip-vit-L "
              "--encoder-depth 4 --proj-coeff 0.7 --mixed-precision no --max-train-steps 10 --checkpointing-steps 5 "
              "--learning-rate 2e-4 --adam-beta1 0.8 --adam-beta2 0.95 --adam-weight-decay 0.01 --adam-epsilon 1e-6 "
              "--max-grad-norm 2 --path-type cosine --cfg-prob 0.2 --prediction v --weighting uniform "
              "--fused-attn --no-qk-norm --batch-size 64 --seed 3 --num-workers 1")
OURS_TRAIN = ("--manifest feats --run-dir exps/e1 --model SiT-B/2 --encoders dinov2-vit-b,clip-vit-l "
              "--encoder-depth 4 --proj-coeff 0.7 --precision fp32 --steps 10 --ckpt-every 5 --lr 2e-4 "
              "--adam-beta1 0.8 --adam-beta2 0.95 --weight-decay 0.01 --adam-eps 1e-6 --grad-clip 2 --path cosine "
              "--class-dropout-prob 0.2 --batch-size 64 --seed 3 --num-workers 1")


def test_repa_train_command_equals_ours():
    from trainer.loop.config import resolve
    repa, _ = resolve(REPA_TRAIN.split())
    ours, _ = resolve(OURS_TRAIN.split())
    assert repa == ours
    assert ours.betas == (0.8, 0.95) and ours.encoders == ["dinov2-vit-b", "clip-vit-l"]
    old, _ = resolve("--manifest f --run-dir r --enc-depth 4".split())  # the old spelling still works
    assert old.enc_depth == 4


def test_the_two_misleading_flags():
    """--allow-tf32 is refused with one line (this trainer has no TF32 mode, so accepting it promised numerics the
    run did not have); --resume-step 0 is REPA's 'do not resume', not 'no checkpoint for step 0' (issue 26)."""
    from trainer.loop.config import resolve
    with pytest.raises(UserError, match="--allow-tf32 .*no TF32 mode"):
        resolve("--manifest f --run-dir r --allow-tf32".split())
    assert resolve("--manifest f --run-dir r --resume-step 0".split())[0].resume_from is None
    assert resolve("--manifest f --run-dir r --resume-step 5".split())[0].resume_from == "5"


def test_512_training_preset_checks_the_manifest(tmp_path):
    from helpers import make_features_manifest
    from trainer.loop.config import resolve
    make_features_manifest(tmp_path / "f256", num=2, shard_size=2)
    with pytest.raises(UserError, match="512 px recipe, but manifest .* is 256 px"):
        resolve(["--manifest", str(tmp_path / "f256"), "--run-dir", "r", "--preset", "sit-xl2-repa-512"])
    make_features_manifest(tmp_path / "f512", num=2, shard_size=2, latent_shape=(8, 64, 64), tokens=1024)
    cfg, _ = resolve(["--manifest", str(tmp_path / "f512"), "--run-dir", "r", "--preset", "sit-xl2-repa-512"])
    assert cfg.model == "SiT-XL/2" and cfg.steps == 1_000_000


def test_per_proc_batch_size_is_per_gpu(monkeypatch):
    from trainer.loop.config import resolve
    from trainer.sampling.config import per_rank_batch, resolve as sample_resolve
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg, _ = resolve("--manifest f --run-dir r --per-proc-batch-size 32".split())
    assert cfg.batch_size == 256  # 32 per GPU x 8 GPUs: our --batch-size is global
    s, _ = sample_resolve("--ckpt c --out o --per-proc-batch-size 32".split())
    assert s.batch_size == 256 and per_rank_batch(s, 8) == 32


@pytest.mark.parametrize("flag,why", [("--epochs 1400", "--train-steps"), ("--epochs=1400", "--train-steps"),
                                      ("--gradient-accumulation-steps 2", "--micro-batch"),
                                      ("--qk-norm", "QK-norm"), ("--prediction eps", "velocity"),
                                      ("--resolution 512", "manifest"), ("--mixed-precision fp8", "invalid choice")])
def test_meaningless_train_flags_say_why(flag, why):
    from trainer.loop.config import resolve
    with pytest.raises(UserError, match=why) as e:
        resolve(["--manifest", "f", "--run-dir", "r", *flag.split()])
    assert "\n" not in str(e.value)


def test_help_lists_aliases_under_one_heading_and_cli_error_is_one_line():
    from trainer.repa_flags import SAMPLE_ALIASES, TRAIN_ALIASES
    for cmd, table, heading in (("train", TRAIN_ALIASES, "REPA train.py names"),
                                ("sample", SAMPLE_ALIASES, "REPA generate.py names")):
        text = cli_help("trainer", cmd)
        section = text.split(heading, 1)[1]
        for a in table:
            if a.flag == a.target:  # the same flag exists natively: listed with our own flags, not as an alias
                assert a.flag in text.split(heading, 1)[0], (cmd, a.flag)
                continue
            assert a.flag in section, (cmd, a.flag)
    assert_user_error(run_module("trainer", "train", "--manifest", "f", "--run-dir", "r", "--epochs", "3"),
                      "--epochs", "--train-steps")


def test_config_file_layers_flags_over_file_over_preset(tmp_path):
    from trainer.loop.config import resolve
    (tmp_path / "c.yaml").write_text("preset: sit-b2-repa\nmanifest: feats\nrun_dir: r\nmax_train_steps: 7\n"
                                     "enc-type: [dinov2-vit-b, mocov3-vit-b]\nlr: 3.0e-4\nbetas: [0.5, 0.6]\n")
    cfg, _ = resolve(["--config", str(tmp_path / "c.yaml"), "--lr", "5e-5"])
    assert cfg.model == "SiT-B/2" and cfg.enc_depth == 4  # from the preset
    assert cfg.steps == 7 and cfg.encoders == ["dinov2-vit-b", "mocov3-vit-b"] and cfg.betas == (0.5, 0.6)  # file
    assert cfg.lr == 5e-5  # the flag wins over the file
    (tmp_path / "bad.json").write_text(json.dumps({"manifest": "f", "run_dir": "r", "stepz": 3}))
    with pytest.raises(UserError, match="unknown setting 'stepz'"):
        resolve(["--config", str(tmp_path / "bad.json")])
    (tmp_path / "bad2.json").write_text(json.dumps({"manifest": "f", "run_dir": "r", "epochs": 3}))
    with pytest.raises(UserError, match="--epochs has no meaning here"):
        resolve(["--config", str(tmp_path / "bad2.json")])


def test_run_config_json_feeds_back(tmp_path):
    """A run's config.json (its `train` section) reproduces the run's settings; flags still override."""
    from trainer.loop.config import resolve
    cfg, _ = resolve(OURS_TRAIN.split() + ["--preset", "sit-l2-repa", "--micro-batch", "8", "--hflip"])
    (tmp_path / "config.json").write_text(json.dumps({"model": cfg.model, "resolution": 256,
                                                      "train": cfg.to_json()}))
    again, _ = resolve(["--config", str(tmp_path / "config.json")])
    assert again == cfg
    longer, _ = resolve(["--config", str(tmp_path / "config.json"), "--steps", "20"])
    assert longer.steps == 20 and longer.model == cfg.model


def test_repa_generate_command_and_presets(tmp_path, capsys):
    from trainer.sampling.config import resolve
    repa, _ = resolve("--ckpt SiT-XL-2-256.pt --sample-dir s --num-fid-samples 100 --num-steps 250 --mode sde "
                      "--cfg-scale 1.8 --guidance_low 0 --guidance_high 0.7 --path-type linear --global-seed 4 "
                      "--vae mse --no-tf32 --encoder-depth 8 --projector-embed-dims 768 --fused-attn "
                      "--no-heun".split())
    ours, _ = resolve("--ckpt SiT-XL-2-256.pt --out s --num-samples 100 --preset paper-cfg --path linear "
                      "--seed 4 --vae sd-vae-ft-mse --precision fp32 --encoder-depth 8 "
                      "--projector-embed-dims 768".split())
    ours.preset = None
    assert repa == ours and ours.vae == "sd-vae-ft-mse"
    nocfg, _ = resolve("--ckpt c --out o --preset paper-nocfg --cfg-scale 1.5".split())
    assert (nocfg.mode, nocfg.steps, nocfg.cfg_scale) == ("sde", 250, 1.5)  # the flag overrides the preset
    p512, _ = resolve("--ckpt c --out o --preset paper-512-cfg".split())
    assert p512.cfg_scale == 1.35 and p512.expect_resolution == 512
    from trainer.sampling.config import check_resolution
    with pytest.raises(UserError, match="512 px setting"):
        check_resolution(p512, 256)
    (tmp_path / "s.yaml").write_text("ckpt: c\nout: o\npreset: paper-cfg\nnum_fid_samples: 10\n")
    from_file, _ = resolve(["--config", str(tmp_path / "s.yaml")])
    assert from_file.num_samples == 10 and from_file.cfg_scale == 1.8 and from_file.guidance_high == 0.7
    with pytest.raises(UserError, match="QK-norm"):
        resolve("--ckpt c --out o --qk-norm".split())
    from trainer.sampling.job import main
    assert main(["--config", str(tmp_path / "s.yaml"), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 10


def test_evaluation_config_and_dry_run(tmp_path, capsys):
    from evaluation.job import main
    (tmp_path / "e.json").write_text(json.dumps({"samples": "s.npz", "reference": "ref.npz", "pr_dtype": "float16",
                                                 "batch_size": 8}))
    assert main(["--config", str(tmp_path / "e.json"), "--batch-size", "16", "--dry-run"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["pr_dtype"] == "float16" and d["batch_size"] == 16 and d["reference"] == "ref.npz"
    (tmp_path / "bad.json").write_text(json.dumps({"samples": "s.npz", "reference": "r", "pr_dtype": "int4"}))
    with pytest.raises(UserError, match="pr_dtype"):
        main(["--config", str(tmp_path / "bad.json"), "--dry-run"])


def test_docs_map_every_repa_flag():
    from helpers import REPO
    from trainer.repa_flags import mapping_rows
    page = (REPO / "docs" / "coming-from-repa.md").read_text()
    for cmd, flag, _ in mapping_rows():
        assert f"`{flag}`" in page, (cmd, flag)


def test_one_spelling_for_encoders_and_counts_across_commands():
    """align takes --encoders / --num-samples like train and sample (its old --encoder / --num-images still work)."""
    from evaluation.align.cli import build_parser
    p = build_parser()
    new = p.parse_args("--ckpt c --manifest m --encoders tiny-clip --num-samples 12".split())
    old = p.parse_args("--ckpt c --manifest m --encoder tiny-clip --num-images 12".split())
    assert vars(new) == vars(old) and new.encoder == "tiny-clip" and new.num_images == 12
