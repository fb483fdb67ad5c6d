"""REPA's train.py and generate.py flag names, mapped onto ours (docs/coming-from-repa.md).

Our own old spellings (e.g. --enc-depth) are not here: they are second names of the same flag
(common.cli.flag), listed in docs/cli.md.

Each row is one of REPA's flags: the flag of ours it means, or why it has no meaning here. The tables are the
single source for `--help` (one heading per command) and for the README mapping table.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from common.aliases import Alias, add_aliases, times_world

HEADING = "REPA {} names (aliases of the flags above)"
PER_GPU = "REPA's is per GPU; ours is global: multiplied by WORLD_SIZE"
SDPA = "attention always runs through PyTorch SDPA"
NO_QK = "this SiT has no QK-norm (REPA's default is off)"


def _mixed_precision(text: str) -> str:
    return {"no": "fp32"}.get(text, text)  # accelerate's 'no' is full fp32


def _resume_step(text: str) -> str | None:
    """REPA's --resume-step 0 means 'do not resume'; ours: no --resume-from (the bug was 'no checkpoint for step 0')."""
    return None if text.strip() == "0" else text


TRAIN_ALIASES: tuple[Alias, ...] = (
    Alias("--enc-type", "--encoders", "comma list; names are case-insensitive"),
    Alias("--max-train-steps", "--train-steps"),
    Alias("--checkpointing-steps", "--ckpt-every"),
    Alias("--mixed-precision", "--precision", "'no' -> fp32", value=_mixed_precision),
    Alias("--path-type", "--path"),
    Alias("--cfg-prob", "--class-dropout-prob"),
    Alias("--learning-rate", "--lr"),
    Alias("--adam-weight-decay", "--weight-decay"),
    Alias("--adam-epsilon", "--adam-eps"),
    Alias("--max-grad-norm", "--grad-clip"),
    Alias("--data-dir", "--manifest", "a features manifest from `pipeline extract`, not REPA's folder layout"),
    Alias("--per-proc-batch-size", "--batch-size", PER_GPU, value=times_world),
    Alias("--sampling-steps", "--sample-every"),
    Alias("--resume-step", "--resume-from", "0 = REPA's 'do not resume': no --resume-from (a new run folder "
          "starts fresh)", value=_resume_step),
    Alias("--report-to", "--report-to"),
    # Refused, not ignored: REPA turns TF32 on for fp32 matmuls, this trainer never does (--mixed-precision no is
    # pure fp32 here), so accepting the flag would promise numerics the run does not have.
    Alias("--allow-tf32", why="this trainer has no TF32 mode: its fp32 ops run in full fp32; use --precision bf16 "
                              "or fp16 for speed"),
    Alias("--fused-attn", noop=True, why=SDPA),
    Alias("--no-fused-attn", noop=True, why=SDPA),
    Alias("--no-qk-norm", noop=True, why=NO_QK),
    Alias("--qk-norm", why=NO_QK),
    Alias("--prediction", noop=True, only="v", why="the model predicts velocity"),
    Alias("--weighting", noop=True, only="uniform", why="t ~ U(0, 1)"),
    Alias("--epochs", why="training length is --train-steps, in optimiser steps (REPA --max-train-steps)"),
    Alias("--gradient-accumulation-steps", why="--batch-size is the optimiser batch here; --micro-batch splits "
                                               "it into passes without changing the step"),
    Alias("--logging-dir", why="logs go to RUN/log.txt, RUN/stats.jsonl and RUN/tb/"),
    Alias("--resolution", why="the resolution comes from the features manifest (pipeline extract --resolution)"),
    Alias("--num-classes", why="the class count comes from the features manifest's class list"),
)

SAMPLE_ALIASES: tuple[Alias, ...] = (
    Alias("--num-steps", "--num-steps"),  # the same name as ours (docs/cli.md)
    Alias("--num-fid-samples", "--num-samples"),
    Alias("--per-proc-batch-size", "--batch-size", PER_GPU, value=times_world),
    Alias("--sample-dir", "--out"),
    Alias("--global-seed", "--seed"),
    Alias("--path-type", "--path"),
    Alias("--guidance_low", "--guidance-low"),
    Alias("--guidance_high", "--guidance-high"),
    Alias("--tf32", "--precision", const="tf32"),
    Alias("--no-tf32", "--precision", const="fp32"),
    Alias("--no-heun", "--heun", const="false"),
    Alias("--fused-attn", noop=True, why=SDPA),
    Alias("--no-fused-attn", noop=True, why=SDPA),
    Alias("--no-qk-norm", noop=True, why=NO_QK),
    Alias("--qk-norm", why=NO_QK),
    Alias("--legacy", noop=True, why="the legacy decoder_blocks layout is detected from the checkpoint's keys"),
    Alias("--no-legacy", noop=True, why="the legacy layout is detected from the checkpoint's keys"),
)

def add_train_aliases(p: argparse.ArgumentParser) -> dict[str, str]:
    dests = add_aliases(p, TRAIN_ALIASES, HEADING.format("train.py"))
    g = [a for a in p._action_groups if a.title == HEADING.format("train.py")][0]
    g.add_argument("--output-dir", "--output_dir", dest="output_dir", metavar="DIR",
                   help="with --exp-name: --run-dir DIR/EXP_NAME (default DIR: exps)")
    g.add_argument("--exp-name", "--exp_name", dest="exp_name", metavar="NAME", help="see --output-dir")
    return dests


def add_sample_aliases(p: argparse.ArgumentParser) -> dict[str, str]:
    return add_aliases(p, SAMPLE_ALIASES, HEADING.format("generate.py"))


def finish_aliases(values: dict[str, Any]) -> dict[str, Any]:
    """Fold the aliases that set part of a setting: AdamW betas, and REPA's output-dir/exp-name run folder."""
    b1, b2 = values.pop("adam_beta1", None), values.pop("adam_beta2", None)
    if b1 is not None or b2 is not None:
        base = tuple(values.get("betas") or (0.9, 0.999))
        values["betas"] = (base[0] if b1 is None else b1, base[1] if b2 is None else b2)
    out_dir, exp = values.pop("output_dir", None), values.pop("exp_name", None)
    if exp is not None and not values.get("run_dir"):
        values["run_dir"] = os.path.join(out_dir or "exps", exp)
    elif out_dir is not None and exp is None and not values.get("run_dir"):
        from common import UserError
        raise UserError("--output-dir needs --exp-name (the run folder is OUTPUT_DIR/EXP_NAME), or use --run-dir")
    return values


def mapping_rows() -> list[tuple[str, str, str]]:
    """(command, REPA flag, ours or why not) for the README table."""
    rows = []
    for cmd, table in (("train", TRAIN_ALIASES), ("sample", SAMPLE_ALIASES)):
        for a in table:
            if a.noop:
                ours = f"accepted, no effect ({a.why})" if a.only is None else f"'{a.only}' only ({a.why})"
            elif a.target is None:
                ours = f"error: {a.why}"
            else:
                ours = f"`{a.target}{' ' + a.const if a.const else ''}`" + (f" ({a.why})" if a.why else "")
            rows.append((cmd, a.flag, ours))
    return rows
