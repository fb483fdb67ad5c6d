"""`python -m evaluation [metrics|align|watch] ...`: the metrics job (the default), the alignment analysis, or the
FID watcher (flag convention: docs/cli.md)."""
from __future__ import annotations

import sys
from typing import Sequence

from common import run_cli
from common.cli import Command, dispatch

COMMANDS = (  # modules imported only when chosen: the metrics job never imports the align code
    Command("metrics", "FID, sFID, IS, precision and recall of a sample set against a reference", "evaluation.job"),
    Command("align", "layer-wise CKNNA and linear probing of a checkpoint's hidden states", "evaluation.align.cli"),
    Command("watch", "evaluate every new EMA export of a training run (FID over training)", "evaluation.watch"),
)
EPILOG = """examples:
  python -m evaluation --samples samples/ --reference VIRTUAL_imagenet256_labeled.npz
  python -m evaluation align --ckpt RUN/export/ema-0400000.safetensors --manifest val --out align
  python -m evaluation watch runs/xl --reference VIRTUAL_imagenet256_labeled.npz
Each command's own options: python -m evaluation COMMAND --help."""


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch("python -m evaluation", "Score sample sets and checkpoints (DESIGN §6).", COMMANDS, argv,
                    default="metrics", epilog=EPILOG)


if __name__ == "__main__":
    sys.exit(run_cli(main))
