"""`python -m trainer train|sample ...`: the training loop or the sampling job (flag convention: docs/cli.md)."""
from __future__ import annotations

import sys
from typing import Sequence

from common import run_cli
from common.cli import Command, dispatch

COMMANDS = (  # modules imported only when chosen: sampling never imports the training loop
    Command("train", "train SiT + REPA from a features manifest", "trainer.loop.train"),
    Command("sample", "generate images from a checkpoint into PNG shards and a samples manifest",
            "trainer.sampling.job"),
)
EPILOG = """examples:
  python -m trainer train --manifest feats/ --run-dir runs/xl --preset sit-xl2-repa
  python -m trainer sample --ckpt runs/xl --out samples --preset paper-cfg --npz
Each command's own options: python -m trainer COMMAND --help."""


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch("python -m trainer", "Train SiT + REPA, and sample from its checkpoints (DESIGN §4, §5).",
                    COMMANDS, argv, epilog=EPILOG)


if __name__ == "__main__":
    sys.exit(run_cli(main))
