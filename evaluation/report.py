"""The paper-style results table (REPA Table 2 columns) and report.json."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from manifests import atomic_write_json

COLUMNS = (("fid", "FID↓", "{:.2f}"), ("sfid", "sFID↓", "{:.2f}"), ("is", "IS↑", "{:.1f}"),
           ("precision", "Prec.↑", "{:.2f}"), ("recall", "Rec.↑", "{:.2f}"))
NOT_COMPARABLE = "not comparable: random Inception weights (tests/demo only), numbers mean nothing"


def _fmt(fmt: str, v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def format_table(name: str, count: int, metrics: dict[str, float | None], comparable: bool) -> str:
    """A small text table: one row per evaluated sample set, the paper's Table 2 metric columns."""
    head = f"{'Samples':<32}{'#Images':>9}" + "".join(f"{h:>9}" for _, h, _ in COLUMNS)
    row = f"{name[-32:]:<32}{count:>9}" + "".join(f"{_fmt(f, metrics.get(k)):>9}" for k, _, f in COLUMNS)
    lines = [head, "-" * len(head), row]
    if not comparable:
        lines.append(f"({NOT_COMPARABLE})")
    return "\n".join(lines)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """report.json, atomically."""
    atomic_write_json(path, report)
