"""The kill hook itself (`common/faults.py`): the n-th arrival kills, and `@after` orders a kill after a point."""
from __future__ import annotations

import sys

import pytest

from helpers import run_until_killed

# Two writers in one process: "slow" reaches `done` after 0.4 s; "fast" reaches `sidecar` at once, then finishes.
SCRIPT = """
import sys, threading, time
from pathlib import Path
from common.faults import kill_point
log = Path(sys.argv[1])
def writer(name, delay):
    time.sleep(delay)
    kill_point("sidecar")
    kill_point("done")
    with log.open("a") as f:
        f.write(name + "\\n")
threads = [threading.Thread(target=writer, args=("fast", 0)), threading.Thread(target=writer, args=("slow", 0.4))]
[t.start() for t in threads]
[t.join() for t in threads]
"""


@pytest.mark.parametrize("point,finished", [("sidecar", []), ("sidecar:2", ["fast"]),
                                            ("sidecar@done", ["slow"])])
def test_kill_at_the_nth_arrival_after_a_point(tmp_path, point, finished):
    """`sidecar@done`: the 1st arrival (fast) waits until the slow writer is done, then kills; without `@done` it
    kills at once, before anyone finished."""
    log = tmp_path / "finished.txt"
    log.touch()
    run_until_killed([sys.executable, "-c", SCRIPT, str(log)], point, tmp_path / "kill.log", timeout=60)
    assert log.read_text().split() == finished
