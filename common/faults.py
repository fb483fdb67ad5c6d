"""Deterministic fault injection for tests: `REPA_KILL_AT=<point>[:n][@<after>[:m]]` SIGKILLs the job at a point.

Writers call `kill_point("<point>")` at the moments a crash is most harmful (a tar written but not renamed, a
tar renamed but without its sidecar, every sidecar but no manifest). With the variable unset this is one
dictionary lookup. When the n-th arrival (default 1, counted over every process of the job, so it also works
with several Ray actors) reaches the point, the hook SIGKILLs its whole process group, as a machine that dies
would: the driver, Ray's helpers and every actor together. Tests must therefore start the job in its own
session (`subprocess.Popen(..., start_new_session=True)`). Ray puts each worker in its own group, so the first
process that imports this module records its group in the environment, which Ray's workers inherit, and a hook
firing in an actor kills that group (the driver's) as well as its own.

Concurrent writers reach points in any order. `@<after>[:m]` makes a kill independent of that order: the firing
arrival first waits until `<after>` has been reached m times (default 1) by any process of the job. For example
`tar-before-sidecar:2@shard-finished:1` kills with one shard's tar in place and no sidecar, after another shard has
finished, however the two shards' writes interleave.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

KILL_ENV = "REPA_KILL_AT"
# Folder for the arrival counter shared by the job's processes; default: a folder named after the group.
COUNT_DIR_ENV = "REPA_KILL_DIR"
ROOT_GROUP_ENV = "REPA_KILL_PGID"  # the job's process group: the driver's, inherited by Ray workers

if os.environ.get(KILL_ENV) and not os.environ.get(ROOT_GROUP_ENV):
    os.environ[ROOT_GROUP_ENV] = str(os.getpgid(0))


AFTER_TIMEOUT_S = 120.0  # an `@after` point that never comes: kill anyway, so the test fails on its asserts


def _count_dir() -> Path:
    group = os.environ.get(ROOT_GROUP_ENV) or os.getpgid(0)
    return Path(os.environ.get(COUNT_DIR_ENV) or Path(tempfile.gettempdir()) / f"repa-kill-{group}")


def _arrival(point: str) -> int:
    """This arrival's number at `point` over every process of the group: 1, 2, ... (one O_EXCL file each)."""
    folder = _count_dir()
    folder.mkdir(parents=True, exist_ok=True)
    i = 1
    while True:
        try:
            os.close(os.open(folder / f"{point}.{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return i
        except FileExistsError:
            i += 1


def parse_kill_spec(spec: str) -> tuple[str, int, str, int]:
    """'<point>[:n][@<after>[:m]]' -> (point, n, after or '', m); n and m default to 1."""
    target, _, after = spec.partition("@")
    name, _, nth = target.partition(":")
    after_name, _, after_nth = after.partition(":")
    return name, int(nth or 1), after_name, int(after_nth or 1)


def kill_point(point: str) -> None:
    """SIGKILL this process group if REPA_KILL_AT names `point` and this is its n-th arrival."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    name, nth, after_name, after_nth = parse_kill_spec(spec)
    if point != name:
        if point == after_name:
            _arrival(point)  # counted, so that a kill waiting for it can go ahead
        return
    n = _arrival(point)
    if n != nth:
        return
    if after_name:
        mark, deadline = _count_dir() / f"{after_name}.{after_nth}", time.monotonic() + AFTER_TIMEOUT_S
        while not mark.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
    own, root = os.getpgid(0), int(os.environ.get(ROOT_GROUP_ENV) or os.getpgid(0))
    print(f"[test hook] {KILL_ENV}={spec}: killing process groups {sorted({root, own})}", file=sys.stderr, flush=True)
    if root != own:
        os.killpg(root, signal.SIGKILL)
    os.killpg(own, signal.SIGKILL)
