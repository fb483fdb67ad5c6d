"""`make bench-gpu`: every GPU benchmark in its own process with its own time cap -> bench-gpu.json + a table.

On a CUDA machine it runs the full benchmarks (sized to finish within 8 minutes on one H100, install included);
without CUDA it runs the same harness with each script's tiny CPU mode, so the harness itself is tested in CI.
One failing or timed-out benchmark is recorded as such and does not stop the others.

    python3 tests/benchmarks/gpu_all.py [--out bench-gpu.json] [--md bench-gpu.md] [--only trainer,sampler] [--tiny]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
# name -> (script, seconds allowed on one H100, seconds allowed in the tiny CPU mode). The GPU caps sum to 470 s.
BENCHES = {"trainer": ("gpu_trainer.py", 170, 420), "pipeline": ("gpu_pipeline.py", 90, 420),
           "sampler": ("gpu_sampler.py", 110, 420), "evaluation": ("gpu_evaluation.py", 100, 420)}
TINY_ARGS = {"trainer": ["--device", "cpu", "--tiny"], "pipeline": ["--device", "cpu", "--tiny"],
             "sampler": ["--device", "cpu", "--tiny"], "evaluation": ["--device", "cpu", "--n", "8", "--ref-n", "8"]}


def run_one(name: str, tiny: bool, env: dict) -> dict:
    script, cap_gpu, cap_cpu = BENCHES[name]
    cap = int(os.environ.get(f"BENCH_CAP_{name.upper()}", cap_cpu if tiny else cap_gpu))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(HERE / script), *(TINY_ARGS[name] if tiny else []), "--json", str(out)]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=cap)
            status = "ok" if p.returncode == 0 and out.is_file() else f"failed (exit {p.returncode})"
            log = p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            status = f"timeout after {cap} s"
            log = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace") \
                if isinstance(e.stdout, bytes) or e.stdout is None else str(e.stdout) + str(e.stderr or "")
        wall = time.perf_counter() - t0
        result = json.loads(out.read_text()) if out.is_file() else {}
    print(f"== {name}: {status} in {wall:.0f} s", flush=True)
    print("\n".join(log.strip().splitlines()[-15:]), flush=True)
    return {"status": status, "wall_s": round(wall, 1), "cap_s": cap, "command": " ".join(cmd[1:]),
            "result": result, "log_tail": log.strip().splitlines()[-40:]}


def headline(name: str, r: dict) -> str:
    """The one figure each benchmark is judged by (the issue's targets)."""
    res = r.get("result") or {}
    if name == "trainer" and res:
        return (f"{res['img_per_s']:.1f} img/s, MFU {res['mfu']:.1%}" if res.get("mfu") is not None
                else f"{res['img_per_s']:.1f} img/s") + (f", peak {res['peak_gib']:.1f} GiB" if res.get("peak_gib")
                                                         else "") + f", micro-batch {res.get('micro_batch')}, " \
            f"{'n/a (CPU)' if res.get('host_syncs_per_step') is None else res['host_syncs_per_step']} host syncs/step"
    if name == "pipeline" and res:
        return ", ".join(f"{k} {v:.1f} img/s" for k, v in res.get("img_per_s", {}).items())
    if name == "sampler" and res:
        return ", ".join(f"{k} {v:.2f} samples/s" for k, v in res.get("samples_per_s", {}).items())
    if name == "evaluation" and res:
        return f"{res.get('wall_s', float('nan')):.1f} s end to end ({res.get('n')} vs {res.get('ref_n')})"
    return r["status"]


TARGETS = {"trainer": ">= 500 img/s, MFU >= 35%", "pipeline": ">= 400 img/s (fast)",
           "sampler": ">= 2 (tf32), >= 4 (bf16) samples/s", "evaluation": "<= 90 s"}


def markdown(report: dict) -> str:
    rows = ["| Benchmark | Status | Result | Target (one H100) | Wall |", "|---|---|---|---|---|"]
    for name, r in report["benchmarks"].items():
        rows.append(f"| {name} | {r['status']} | {headline(name, r)} | {TARGETS[name]} | {r['wall_s']:.0f} s |")
    head = f"Device: {report['device']}; torch {report['torch']}; mode: {report['mode']}"
    return head + "\n\n" + "\n".join(rows) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-gpu.json")
    ap.add_argument("--md", default="bench-gpu.md")
    ap.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""), help="comma list of " + ",".join(BENCHES))
    ap.add_argument("--tiny", action="store_true", help="the tiny CPU mode even where CUDA is present")
    a = ap.parse_args()
    if a.tiny:  # the scripts import torch themselves; here its version is enough
        from importlib.metadata import version
        tiny, torch_version = True, version("torch")
    else:
        import torch
        tiny, torch_version = not torch.cuda.is_available(), torch.__version__
    device = "cpu (tiny mode)" if tiny else torch.cuda.get_device_name(0)
    names = [n for n in BENCHES if not a.only or n in a.only.split(",")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    print(f"bench-gpu: {device}, torch {torch_version}, python {platform.python_version()}: {', '.join(names)}",
          flush=True)
    t0 = time.perf_counter()
    report = {"device": device, "mode": "cpu-tiny" if tiny else "gpu", "torch": torch_version,
              "python": platform.python_version(), "host": platform.node(), "started": time.time(),
              "benchmarks": {n: run_one(n, tiny, env) for n in names}}
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    from manifests.io import atomic_write_bytes
    atomic_write_bytes(Path(a.out), (json.dumps(report, indent=2) + "\n").encode())
    md = markdown(report)
    atomic_write_bytes(Path(a.md), md.encode())
    print("\n" + md + f"\nwrote {a.out} and {a.md} in {report['wall_s']:.0f} s", flush=True)
    return 0 if all(r["status"] == "ok" for r in report["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
