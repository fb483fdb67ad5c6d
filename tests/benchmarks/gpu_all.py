"""Run every GPU benchmark (tests/benchmarks/gpu_*.py) in one go: `make bench-gpu` on one H100."""
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(p for p in HERE.glob("gpu_*.py") if p.name != "gpu_all.py")
    only = os.environ.get("BENCH_ONLY")  # e.g. BENCH_ONLY=trainer,sampler
    if only:
        scripts = [p for p in scripts if p.stem.removeprefix("gpu_") in only.split(",")]
    failed = []
    for p in scripts:
        print(f"== {p.name}", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, str(p), *sys.argv[1:]])
        print(f"== {p.name}: exit {rc} in {time.time() - t0:.0f}s", flush=True)
        if rc != 0:
            failed.append(p.name)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
