"""The paper-style results table (REPA Table 2 columns, plus FD_DINOv2 when computed), the spread over several
sample sets (EDM2 reports its metrics over seeds), and report.json."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from manifests import atomic_write_json

COLUMNS = (("fid", "FID↓", "{:.2f}"), ("sfid", "sFID↓", "{:.2f}"), ("is", "IS↑", "{:.1f}"),
           ("precision", "Prec.↑", "{:.2f}"), ("recall", "Rec.↑", "{:.2f}"))
DINO_COLUMN = ("fd_dinov2", "FD_DINOv2↓", "{:.2f}")
CLIP_COLUMN = ("clip_score", "CLIP↑", "{:.2f}")
NOT_COMPARABLE = "not comparable: random Inception weights (tests/demo only), numbers mean nothing"
NOT_COMPARABLE_DINO = "not comparable: random DINOv2 weights (tests/demo only), FD_DINOv2 means nothing"
NOT_COMPARABLE_CLIP = "not comparable: random CLIP weights (tests/demo only), CLIP score means nothing"
SUMMARY_ROWS = ("mean", "std", "min")  # the table's rows under the per-set rows


def _fmt(fmt: str, v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _columns(rows: Sequence[dict[str, Any]]) -> tuple:
    extra = tuple(c for c in (DINO_COLUMN, CLIP_COLUMN) if any(r.get(c[0]) is not None for r in rows))
    return COLUMNS + extra


def format_table(name: str, count: int, metrics: dict[str, float | None], comparable: bool,
                 notes: Sequence[str] = ()) -> str:
    """A small text table: one row per evaluated sample set, the paper's Table 2 metric columns."""
    return format_rows([(name, count, metrics)], comparable, notes=notes)


def format_rows(rows: Sequence[tuple[str, int | str, dict[str, float | None]]], comparable: bool,
                summary: dict[str, dict[str, float]] | None = None, notes: Sequence[str] = ()) -> str:
    """One row per sample set; with `summary`, then the mean, std and min of each metric over the sets."""
    cols = _columns([m for _, _, m in rows])
    head = f"{'Samples':<32}{'#Images':>9}" + "".join(f"{h:>{max(9, len(h) + 1)}}" for _, h, _ in cols)
    lines = [head, "-" * len(head)]

    def line(name: str, count, values: dict[str, float | None]) -> str:
        return f"{name[-32:]:<32}{count!s:>9}" + "".join(f"{_fmt(f, values.get(k)):>{max(9, len(h) + 1)}}"
                                                         for k, h, f in cols)
    lines += [line(name, count, m) for name, count, m in rows]
    if summary:
        lines.append("-" * len(head))
        for stat in SUMMARY_ROWS:
            lines.append(line(f"{stat} of {len(rows)}", "", {k: v.get(stat) for k, v in summary.items()}))
    if not comparable:
        lines.append(f"({NOT_COMPARABLE})")
    lines += [f"({n})" for n in notes]
    return "\n".join(lines)


def summarize(per_set: Sequence[dict[str, float | None]]) -> dict[str, dict[str, Any]]:
    """Each metric over the sample sets: mean, min, max, std (sample standard deviation, n-1) and the values."""
    out = {}
    for k in dict.fromkeys(k for m in per_set for k in m):
        vals = [m.get(k) for m in per_set]
        if any(v is None for v in vals):
            continue
        a = np.asarray(vals, dtype=np.float64)
        out[k] = {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()),
                  "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size), "values": a.tolist()}
    return out


def write_report(path: Path, report: dict[str, Any]) -> None:
    """report.json, atomically."""
    atomic_write_json(path, report)
