"""The GPU benchmark harness (`make bench-gpu`) in its tiny CPU mode: every script runs, each gets an entry."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
def test_bench_gpu_tiny_mode_writes_an_entry_per_benchmark(tmp_path):
    out, md = tmp_path / "bench-gpu.json", tmp_path / "bench-gpu.md"
    p = subprocess.run([sys.executable, "tests/benchmarks/gpu_all.py", "--tiny", "--out", str(out), "--md", str(md)],
                       cwd=REPO, capture_output=True, text=True, timeout=1800)
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-tiny"
    bench = report["benchmarks"]
    assert sorted(bench) == ["evaluation", "pipeline", "sampler", "trainer"]
    for name, r in bench.items():
        assert r["status"] == "ok", (name, r["status"], r["log_tail"][-10:])
    assert p.returncode == 0, p.stdout[-2000:]
    # Each script measured something real, through the product's own code paths.
    assert bench["trainer"]["result"]["img_per_s"] > 0 and bench["trainer"]["result"]["micro_batch"] == 4
    assert bench["trainer"]["result"]["steps"] == 3 and len(bench["trainer"]["result"]["intervals_img_per_s"]) == 3
    dev = bench["pipeline"]["result"]["fast_vs_default"]
    assert 0 < dev["vae_mean_err_over_std"]["max"] < 1 and 0.99 < dev["token_cosine"]["min"] <= 1
    assert set(bench["pipeline"]["result"]["img_per_s"]) == {"default", "fast"}
    assert set(bench["sampler"]["result"]["samples_per_s"]) == {"tf32", "bf16"}
    assert bench["evaluation"]["result"]["n"] == 8 and bench["evaluation"]["result"]["wall_s"] > 0
    table = md.read_text()
    assert all(f"| {name} | ok |" in table for name in bench)
