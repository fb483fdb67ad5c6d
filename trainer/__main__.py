"""`python -m trainer train|sample ...`: dispatch to the training loop or the sampling job."""
from __future__ import annotations

import sys
from typing import Sequence

from common import UserError, run_cli

COMMANDS = {"train": "trainer.loop.train", "sample": "trainer.sampling.job"}
USAGE = ("usage: python -m trainer {train,sample} [options]\n"
         "  train   train SiT + REPA from a features manifest (python -m trainer train --help)\n"
         "  sample  generate images from a checkpoint (python -m trainer sample --help)")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args[0] not in COMMANDS:
        raise UserError(f"unknown command {args[0]!r}; expected one of {sorted(COMMANDS)}")
    import importlib
    module = importlib.import_module(COMMANDS[args[0]])  # lazy: sampling does not import the trainer
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(run_cli(main))
