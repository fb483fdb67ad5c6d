"""One CLI convention for every entry point (docs/cli.md): each flag spelling of the last release still lands on
the same setting as its new name; every command has --config and --dry-run; every package's --help lists its
commands; docs/cli.md's table of old spellings is the parsers' own. In-process: parse functions, no subprocess
per flag."""
from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys

import pytest

from common import UserError
from helpers import REPO, cli_help

# Every option string of the release before the convention (commit a0d4a77), read from its parsers.
OLD_FLAGS = {
    "pipeline synth": "--out --classes --per-class --seed",
    "pipeline extract": (
        "--source --out --name --limit --shard-size --verify --resolution --vae --encoders --hflip "
        "--feature-dtype --batch-size --num-gpus --num-cpus --cpu-actors --precision --ray-address"
    ),
    "pipeline convert": "--manifest --out --feature-dtype --workers --name --verify",
    "pipeline verify": "",
    "trainer train": (
        "--manifest --run-dir --preset --config --init-from --dry-run --model --encoders --encoder-depth "
        "--enc-depth --projector-dim --class-dropout-prob --proj-coeff --proj-loss --ntxent-tau --path "
        "--batch-size --micro-batch --steps --lr --adam-beta1 --adam-beta2 --weight-decay --adam-eps "
        "--grad-clip --ema-decay --precision --loss-scale-init --compile --no-compile --seed --num-workers "
        "--hflip --verify --cache-dir --cache-gb --stream --ckpt-every --log-every --max-nonfinite "
        "--trace-data --report-to --sample-every --sample-steps --sample-grid --keep-last --keep-every "
        "--resume-from --enc-type --max-train-steps --checkpointing-steps --mixed-precision --path-type "
        "--cfg-prob --learning-rate --adam-weight-decay --adam-epsilon --max-grad-norm --data-dir "
        "--per-proc-batch-size --sampling-steps --resume-step --allow-tf32 --fused-attn --no-fused-attn "
        "--no-qk-norm --qk-norm --prediction --weighting --epochs --gradient-accumulation-steps --logging-dir "
        "--resolution --num-classes --output-dir --output_dir --exp-name --exp_name"
    ),
    "trainer sample": (
        "--ckpt --out --preset --config --dry-run --npz --shard-size --num-samples --mode --steps --heun "
        "--cfg-scale --guidance-low --guidance-high --seed --balanced --batch-size --precision --device --vae "
        "--model --encoder-depth --projector-embed-dims --resolution --num-classes --path --num-steps "
        "--num-fid-samples --per-proc-batch-size --sample-dir --global-seed --path-type --guidance_low "
        "--guidance_high --tf32 --no-tf32 --no-heun --fused-attn --no-fused-attn --no-qk-norm --qk-norm "
        "--legacy --no-legacy"
    ),
    "evaluation": (
        "--samples --reference --num-samples --write-reference --resolution --inception-weights --device "
        "--batch-size --num-workers --pr-dtype --pr-k --is-split --recompute-reference-stats --out "
        "--cache-dir --no-cache --no-progress --config --dry-run"
    ),
    "evaluation align": (
        "--ckpt --manifest --encoder --encoders --num-images --num-samples --layers --t --k --label "
        "--cknna-eps --seed --epochs --probe-batch-size --probe-lr --skip-probe --model --encoder-depth "
        "--projector-embed-dims --weights --path --out --pca --pca-images --batch-size --device"
    ),
    "evaluation watch": (
        "--reference --once --latest --until --poll --num-samples --steps --cfg-scale --guidance-high --seed "
        "--nproc --batch-size --sample-precision --inception-weights --eval-batch-size --device --report-to "
        "--cache-dir --keep-samples"
    ),
}

# The command line each check starts from (required settings), and how to parse one command in-process.
BASE = {
    "pipeline synth": "--out o", "pipeline extract": "--source s --out o", "pipeline convert": "--manifest m --out o",
    "pipeline verify": "m", "trainer train": "--manifest m --run-dir r", "trainer sample": "--ckpt c --out o",
    "evaluation": "--samples s --reference r", "evaluation align": "--ckpt c --manifest m",
    "evaluation watch": "run --reference r",
}
# Config files: {name: contents}; a row writes `{cfg}/NAME` for the file's path.
CONFIGS = {"seed.json": {"seed": 7}, "extract.json": {"shard_size": 7}, "convert.json": {"name": "n"},
           "eval.json": {"pr_k": 5}}

# One row per old spelling: "OLD ARGS => NEW ARGS". "=> =" means accepted with no effect (the setting stays the
# base's), "=> !" means refused with a one-line reason (as in the last release). A trailing " ~" allows a result
# equal to the base's (the old spelling sets the default value).
ROWS = {
    "pipeline synth": ["--out o2", "--classes 3", "--per-class 2", "--seed 1", "--captions c.json",
                       "--config {cfg}/seed.json => --seed 7", "--dry-run"],
    "pipeline extract": [
        "--source s2", "--out o2", "--name n", "--limit 5 => --num-samples 5", "--shard-size 7", "--verify",
        "--resolution 512", "--vae tiny-vae", "--encoders tiny-dinov2,tiny-siglip", "--hflip => --store-hflip",
        "--feature-dtype float16", "--batch-size 8 => --micro-batch 8", "--num-gpus 2", "--num-cpus 2",
        "--cpu-actors 2 => --num-workers 2", "--precision fast", "--precision bf16 => --precision fast",
        "--ray-address auto", "--config {cfg}/extract.json => --shard-size 7", "--dry-run",
        # text-to-image (issue 24): COCO captions, the caption encoder, its codec, the crop rule
        "--captions a.json", "--text-encoder tiny-clip-text", "--context-dtype float16", "--crop uvit"],
    "pipeline convert": ["--manifest m2", "--out o2", "--feature-dtype float16", "--workers 2 => --num-workers 2",
                         "--name n", "--verify", "--config {cfg}/convert.json => --name n", "--dry-run"],
    "pipeline verify": ["--config {cfg}/seed.json => !", "--dry-run"],
    "trainer train": [
        "--manifest m2", "--run-dir r2", "--preset sit-b2-repa", "--config {cfg}/seed.json => --seed 7",
        "--init-from x.pt", "--dry-run", "--model SiT-B/2", "--encoders a,b", "--encoder-depth 4",
        "--enc-depth 4 => --encoder-depth 4", "--projector-dim 512 => --projector-hidden-dim 512",
        "--class-dropout-prob 0.2", "--proj-coeff 0.7", "--proj-loss ntxent", "--ntxent-tau 0.2",
        "--path cosine", "--batch-size 64", "--micro-batch 8", "--steps 10 => --train-steps 10", "--lr 2e-4",
        "--adam-beta1 0.8", "--adam-beta2 0.95", "--weight-decay 0.01", "--adam-eps 1e-6", "--grad-clip 2",
        "--ema-decay 0.99", "--precision bf16", "--loss-scale-init 1024", "--compile", "--no-compile",
        "--seed 3", "--num-workers 1", "--hflip => --use-hflip", "--verify", "--cache-dir c", "--cache-gb 5",
        "--stream", "--ckpt-every 5", "--log-every 5", "--max-nonfinite 5", "--trace-data", "--report-to none",
        "--sample-every 5", "--sample-steps 3 => --sample-num-steps 3",
        "--sample-grid 4 => --sample-num-samples 4", "--keep-last 1", "--keep-every 5", "--resume-from 5",
        # the DiT family (issue 25): its names and Table 3's presets
        "--model DiT-XL/2", "--preset dit-l2", "--preset dit-xl2-repa",
        # REPA's train.py names
        "--enc-type a,B => --encoders a,b", "--max-train-steps 10 => --train-steps 10",
        "--checkpointing-steps 5 => --ckpt-every 5", "--mixed-precision no => --precision fp32",
        "--path-type cosine => --path cosine", "--cfg-prob 0.2 => --class-dropout-prob 0.2",
        "--learning-rate 2e-4 => --lr 2e-4", "--adam-weight-decay 0.01 => --weight-decay 0.01",
        "--adam-epsilon 1e-6 => --adam-eps 1e-6", "--max-grad-norm 2 => --grad-clip 2",
        "--data-dir m2 => --manifest m2", "--per-proc-batch-size 32 => --batch-size 32",
        "--sampling-steps 5 => --sample-every 5", "--resume-step 5 => --resume-from 5", "--allow-tf32 => !",
        "--fused-attn => =", "--no-fused-attn => =", "--no-qk-norm => =", "--qk-norm => !",
        "--prediction v => =", "--weighting uniform => =", "--epochs 3 => !",
        "--gradient-accumulation-steps 2 => !", "--logging-dir x => !", "--resolution 256 => !",
        "--num-classes 10 => !"],
    "trainer sample": [
        "--ckpt c2", "--out o2", "--preset paper-cfg", "--config {cfg}/seed.json => --seed 7", "--dry-run",
        "--npz", "--shard-size 7", "--num-samples 5", "--mode ode", "--steps 9 => --num-steps 9",
        "--mode ode --heun", "--cfg-scale 1.5", "--guidance-low 0.1", "--guidance-high 0.7", "--seed 3",
        "--balanced", "--batch-size 8", "--precision bf16", "--device cpu", "--vae tiny-vae", "--model SiT-B/2",
        "--encoder-depth 4", "--projector-embed-dims 768,1024", "--resolution 512", "--num-classes 10",
        "--path cosine", "--num-steps 9",
        # the DiT family's samplers and CFG rule (issue 25)
        "--mode ddpm", "--mode ddim", "--cfg-channels 3", "--preset dit-nocfg", "--preset dit-cfg-1.5",
        "--model DiT-XL/2",
        # REPA's generate.py names
        "--num-fid-samples 5 => --num-samples 5", "--per-proc-batch-size 8 => --batch-size 8",
        "--sample-dir o2 => --out o2", "--global-seed 3 => --seed 3", "--path-type cosine => --path cosine",
        "--guidance_low 0.1 => --guidance-low 0.1", "--guidance_high 0.7 => --guidance-high 0.7",
        "--tf32 => --precision tf32 ~", "--no-tf32 => --precision fp32", "--no-heun => =", "--fused-attn => =",
        "--no-fused-attn => =", "--no-qk-norm => =", "--qk-norm => !", "--legacy => =", "--no-legacy => ="],
    "evaluation": [
        "--samples s2", "--reference r2", "--num-samples 5", "--write-reference w.npz", "--resolution 64",
        "--inception-weights random:0", "--device cpu", "--batch-size 5", "--num-workers 13",
        "--pr-dtype float16 => --precision fp16", "--pr-dtype float32 => --precision fp32 ~", "--pr-k 4",
        "--is-split 10", "--recompute-reference-stats", "--out x.json", "--cache-dir c", "--no-cache",
        "--no-progress", "--config {cfg}/eval.json => --pr-k 5", "--dry-run"],
    "evaluation align": [
        "--ckpt c2", "--manifest m2", "--encoder e => --encoders e", "--encoders e",
        "--num-images 12 => --num-samples 12", "--num-samples 12", "--layers 1-4", "--t 0.3", "--k 5",
        "--label real", "--cknna-eps 1e-6", "--seed 3", "--epochs 2", "--probe-batch-size 16", "--probe-lr 0.1",
        "--skip-probe", "--model SiT-B/2", "--model DiT-XL/2", "--encoder-depth 4", "--projector-embed-dims 768", "--weights model",
        "--path cosine", "--out x", "--pca", "--pca-images 2", "--batch-size 8", "--device cpu",
        "--config {cfg}/seed.json => --seed 7", "--dry-run"],
    "evaluation watch": [
        "--reference r2", "--once", "--latest", "--until 5", "--poll 2", "--num-samples 5",
        "--steps 9 => --num-steps 9", "--cfg-scale 1.5", "--guidance-high 0.7", "--seed 3",
        "--nproc 2 => --num-gpus 2", "--batch-size 8", "--sample-precision bf16 => --precision bf16",
        "--inception-weights random:0", "--eval-batch-size 8", "--device cpu", "--report-to none",
        "--cache-dir c", "--keep-samples", "--config {cfg}/seed.json => --seed 7", "--dry-run"],
}
# Rows that bring their own required settings (REPA's run folder is OUTPUT_DIR/EXP_NAME instead of --run-dir).
OWN_BASE = {"trainer train": ["--manifest m --output-dir o --exp-name e => --manifest m --run-dir o/e",
                              "--manifest m --output_dir o --exp_name e => --manifest m --run-dir o/e",
                              "--manifest m --exp-name e => --manifest m --run-dir exps/e"]}


MODULES = {"trainer train": "trainer.loop.config", "trainer sample": "trainer.sampling.config",
           "evaluation": "evaluation.job", "evaluation align": "evaluation.align.cli",
           "evaluation watch": "evaluation.watch"}


def resolver(cmd: str):
    """The command's in-process parse: argv -> (config, dry_run)."""
    if cmd.startswith("pipeline "):
        from pipeline.__main__ import resolve
        return lambda argv: resolve(cmd.split()[1], argv)
    return importlib.import_module(MODULES[cmd]).resolve


def parser(cmd: str):
    if cmd.startswith("pipeline "):
        from pipeline.__main__ import PARSERS
        return PARSERS[cmd.split()[1]]()
    return importlib.import_module(MODULES[cmd]).build_parser()


def _old_flags(cmd: str) -> list[str]:
    return OLD_FLAGS[cmd].split()


@pytest.fixture(scope="module")
def cfg_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    for name, values in CONFIGS.items():
        (d / name).write_text(json.dumps(values))
    return d


@pytest.mark.parametrize("cmd", list(OLD_FLAGS))
def test_every_old_flag_lands_on_the_same_setting(cmd, cfg_dir, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # REPA's per-GPU batch x 1
    resolve = resolver(cmd)
    base = BASE[cmd].split()
    base_result = resolve(base)
    covered = set()
    for row in ROWS[cmd] + OWN_BASE.get(cmd, []):
        if row in OWN_BASE.get(cmd, []):
            base, base_result = [], None
        old, _, new = (part.strip() for part in row.partition("=>"))
        new = new or old
        may_equal = new.endswith(" ~")
        new = new.removesuffix(" ~")
        old_argv = old.format(cfg=cfg_dir).split()
        covered.update(w for w in old_argv if w.startswith("--"))
        if new == "!":
            with pytest.raises(UserError) as e:
                resolve(base + old_argv)
            assert "\n" not in str(e.value), row
            continue
        got = resolve(base + old_argv)
        if new == "=":
            assert got == base_result, row
            continue
        want = resolve(base + new.format(cfg=cfg_dir).split())
        assert got == want, row
        assert may_equal or got != base_result, f"{row}: the flag changed nothing"
    missing = set(_old_flags(cmd)) - covered
    assert not missing, f"{cmd}: old flags with no row: {sorted(missing)}"


@pytest.mark.parametrize("cmd", list(OLD_FLAGS))
def test_old_spellings_are_still_flags_and_help_shows_the_new_name(cmd):
    p = parser(cmd)
    have = {s for a in p._actions for s in a.option_strings}
    assert not set(_old_flags(cmd)) - have
    assert {"--config", "--dry-run"} <= have, f"{cmd} lacks --config or --dry-run"
    words = cmd.split()
    text = cli_help(*words)
    for old, new in _renamed(p).items():
        shown = r"^  {}(?=[ ,\n])"  # an option line: two spaces, the flag, then its metavar or the help
        assert re.search(shown.format(re.escape(new)), text, flags=re.M), (cmd, new)
        assert not re.search(shown.format(re.escape(old)), text, flags=re.M), f"{cmd}: {old} shown as a flag"
        assert re.search(rf"\[old:\s[^\]]*{re.escape(old)}[,\]]", text), (cmd, old)


def _renamed(p) -> dict[str, str]:
    from common.cli import renamed_flags
    return renamed_flags(p)


def test_docs_table_of_old_spellings_is_the_parsers():
    text = (REPO / "docs" / "cli.md").read_text()
    section = text.split("## Old spellings", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([^`]+)` \| `(--[^`]+)` \| `(--[^`]+)` \|$", section, flags=re.M))
    want = {(cmd, old, new) for cmd in OLD_FLAGS for old, new in _renamed(parser(cmd)).items()}
    assert rows == want
    precision = text.split("## `--precision`", 1)[1].split("\n## ", 1)[0]
    for cmd in ("pipeline extract", "trainer train", "trainer sample", "evaluation watch", "evaluation"):
        p = parser(cmd)
        act = next(a for a in p._actions if "--precision" in a.option_strings)
        values = act.choices or re.findall(r"\w+", act.metavar or "")
        line = next(ln for ln in precision.splitlines() if ln.startswith(f"| `{cmd}`"))
        for v in values:
            assert f"`{v}`" in line, (cmd, v)


@pytest.mark.parametrize("pkg,commands", [("pipeline", ("synth", "extract", "convert", "verify")),
                                          ("trainer", ("train", "sample")),
                                          ("evaluation", ("metrics", "align", "watch"))])
def test_package_help_lists_its_commands(pkg, commands):
    text = cli_help(pkg)
    assert text.startswith("usage: ")
    for c in commands:
        assert re.search(rf"^\s+{c}\s+\S", text, flags=re.M), (pkg, c)
    if pkg == "evaluation":  # the default command's options follow
        assert "--reference" in text and "--precision" in text


def test_dispatch_errors_and_the_default_command(capsys):
    from evaluation.__main__ import main as evaluation_main
    from pipeline.__main__ import main as pipeline_main
    from trainer.__main__ import main as trainer_main
    for main, word in ((pipeline_main, "extrac"), (trainer_main, "sampl"), (evaluation_main, "algin")):
        with pytest.raises(UserError, match=f"unknown command '{word}'"):
            main([word])
    for argv in (["--samples", "s", "--reference", "r", "--dry-run"],
                 ["metrics", "--samples", "s", "--reference", "r", "--dry-run"]):
        assert evaluation_main(argv) == 0
        assert json.loads(capsys.readouterr().out)["reference"] == "r"


@pytest.mark.parametrize("argv", [
    ["pipeline", "synth", "--out", "o"], ["pipeline", "extract", "--source", "s", "--out", "o", "--vae", "tiny-vae",
                                          "--encoders", "tiny-dinov2"],
    ["pipeline", "convert", "--manifest", "m", "--out", "o"], ["pipeline", "verify", "m"],
    ["trainer", "sample", "--ckpt", "c", "--out", "o"], ["evaluation", "--samples", "s", "--reference", "r"],
    ["evaluation", "align", "--ckpt", "c", "--manifest", "m"], ["evaluation", "watch", "run", "--reference", "r"]],
    ids=lambda a: " ".join(a[:2]))
def test_dry_run_prints_the_config_through_the_package_entry_point(argv, tmp_path, capsys):
    main = importlib.import_module(f"{argv[0]}.__main__").main
    (tmp_path / "c.json").write_text(json.dumps({"num_samples": 3} if "sample" in argv or "align" in argv or
                                                "watch" in argv else {}))
    assert main([*argv[1:], "--config", str(tmp_path / "c.json"), "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, dict) and out
    if "sample" in argv or "watch" in argv:
        assert out["num_samples"] == 3
    if "align" in argv:
        assert out["num_images"] == 3


def test_train_dry_run_through_the_entry_point(tmp_path, capsys):
    from helpers import make_features_manifest
    from trainer.__main__ import main
    make_features_manifest(tmp_path / "f", num=2, shard_size=2)
    (tmp_path / "c.yaml").write_text("train_steps: 9\nmodel: SiT-Debug/2\n")
    assert main(["train", "--manifest", str(tmp_path / "f"), "--run-dir", str(tmp_path / "r"), "--config",
                 str(tmp_path / "c.yaml"), "--encoders", "none", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["steps"] == 9
    assert not (tmp_path / "r").exists()


def test_device_is_one_resolver():
    import argparse

    import torch

    from common.device import device_flag, resolve_device
    assert device_flag("CUDA:1") == "cuda:1" and device_flag("auto") == "auto"
    with pytest.raises(argparse.ArgumentTypeError):
        device_flag("gpu")
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu" and resolve_device(None) == "cpu"
        with pytest.raises(UserError, match="--device cuda:0"):
            resolve_device("cuda:0")
    from evaluation.align.cli import resolve
    with pytest.raises(UserError, match="--device"):
        resolve(["--ckpt", "c", "--manifest", "m", "--device", "tpu"])


def test_watch_batch_size_is_global():
    """The watcher hands --batch-size to `trainer sample --batch-size` (global) as is; its default scales with GPUs."""
    from pathlib import Path

    from evaluation.watch import resolve, sample_command
    cfg, _ = resolve(["run", "--reference", "r", "--num-gpus", "4"])
    assert cfg.batch_size == 256
    cmd = sample_command(cfg, Path("ckpt"), Path("out"))
    assert cmd[cmd.index("--batch-size") + 1] == "256" and cmd[cmd.index("--nproc-per-node") + 1] == "4"
    cfg, _ = resolve(["run", "--reference", "r", "--nproc", "4", "--batch-size", "32"])
    cmd = sample_command(cfg, Path("ckpt"), Path("out"))
    assert cmd[cmd.index("--batch-size") + 1] == "32"
    from trainer.sampling.config import per_rank_batch, resolve as sample_resolve
    s, _ = sample_resolve(cmd[cmd.index("sample") + 1:])
    assert s.batch_size == 32 and per_rank_batch(s, 4) == 8 and s.steps == cfg.num_steps


def test_commands_import_only_what_they_run():
    """`trainer sample` never imports the training loop; the metrics job never imports the alignment code."""
    code = ("import sys, io, contextlib\n"
            "from trainer.__main__ import main as t\nfrom evaluation.__main__ import main as e\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    t(['sample', '--ckpt', 'c', '--out', 'o', '--dry-run'])\n"
            "    e(['--samples', 's', '--reference', 'r', '--dry-run'])\n"
            "bad = [m for m in sys.modules if m.startswith(('trainer.loop', 'evaluation.align'))]\n"
            "assert not bad, bad\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
