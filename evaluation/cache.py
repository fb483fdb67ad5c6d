"""The activation cache's size bound: least-recently-used sample sets are evicted, references never.

Each use of an entry sets its mtime (its last use). An entry that was ever a reference gets a `KEY.ref` marker
beside it and is never evicted. The other entries are grouped by image set (the `set_id` attribute: the
Inception and DINOv2 entries of one sample set go together), and whole sets go, oldest last use first, until the
cache fits its bound. Entries of the running job are never evicted.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

DEFAULT_CACHE_GB = 20.0  # ~20 sample sets of 50k with FD_DINOv2 (about 1 GB each); references come on top
GIB = 1 << 30


def touch(entry: Path) -> None:
    """Record a use of `entry` (its mtime is its last use)."""
    with contextlib.suppress(OSError):
        os.utime(entry)


def reference_marker(entry: Path) -> Path:
    return entry.with_suffix(".ref")


def mark_reference(entry: Path) -> None:
    """Pin `entry`: it holds a reference's activations."""
    marker = reference_marker(entry)
    if not marker.exists():
        with contextlib.suppress(OSError):
            marker.touch()


def _set_of(entry: Path) -> str:
    """The image set an entry belongs to (its own name for entries written before sets were recorded)."""
    import h5py
    try:
        with h5py.File(entry, "r") as f:
            return str(f.attrs.get("set_id", entry.stem))
    except (OSError, ValueError):
        return entry.stem


def evict(cache_dir: Path, limit_gb: float, keep: set[Path] = frozenset()) -> list[Path]:
    """Delete whole sample sets, least recently used first, until the cache's entries fit in `limit_gb` GiB.

    References (entries with a marker) and `keep` (this job's entries) are never deleted; returns what was.
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    entries = []
    for p in cache_dir.glob("*.h5"):
        with contextlib.suppress(OSError):
            st = p.stat()
            entries.append((p, st.st_size, st.st_mtime))
    total = sum(size for _, size, _ in entries)
    limit = int(limit_gb * GIB)
    if total <= limit:
        return []
    keep = {Path(k).resolve() for k in keep}
    sets: dict[str, list[tuple[Path, int, float]]] = {}
    for e in entries:
        if e[0].resolve() in keep or reference_marker(e[0]).exists():
            continue
        sets.setdefault(_set_of(e[0]), []).append(e)
    removed = []
    for members in sorted(sets.values(), key=lambda m: max(t for _, _, t in m)):  # oldest last use first
        if total <= limit:
            break
        for p, size, _ in members:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
            total -= size
    if total > limit:
        print(f"warning: cache {cache_dir} holds {total / GIB:.2f} GiB after eviction, over --cache-gb "
              f"{limit_gb:g}: the rest are references or this evaluation's own entries", file=sys.stderr)
    return removed
