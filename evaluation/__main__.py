"""`python -m evaluation [align|watch] ...`: the metrics job, the alignment analysis, or the FID watcher."""
from __future__ import annotations

import sys
from typing import Sequence

from common import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "align":
        from evaluation.align.cli import main as align_main  # lazy: the metrics job never imports it
        return int(align_main(args[1:]) or 0)
    if args and args[0] == "watch":
        from evaluation.watch import main as watch_main  # lazy, as align
        return int(watch_main(args[1:]) or 0)
    from evaluation.job import main as metrics_main
    return int(metrics_main(args) or 0)


if __name__ == "__main__":
    sys.exit(run_cli(main))
