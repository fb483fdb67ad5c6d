import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
# One intra-op thread per test process: `make test` runs several (xdist), and OpenMP threads of processes sharing
# 2 cores spin-wait on each other (an op goes from ~0.1 ms to ~5 ms).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """In-process torch work on one thread (OMP_NUM_THREADS above is read only if torch was not imported first)."""
    import torch
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def own_caches(tmp_path_factory):
    """The caches the code writes by default (evaluation's Inception statistics, ~66 MB per image set; remote
    inputs) go to this run's temp folder, shared by its xdist workers, not the user's ~/.cache."""
    os.environ["XDG_CACHE_HOME"] = str(_run_root(tmp_path_factory) / "cache")


def pytest_collection_modifyitems(config, items):
    """End-to-end (`slow`) tests first: with `-n 2` the long ones then overlap instead of trailing at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # a stable sort keeps file order


def _run_root(tmp_path_factory) -> Path:
    """This test run's temp folder: common to its xdist workers (each has its own basetemp inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _once(tmp_path_factory, name: str, build) -> Path:
    """A read-only folder built once per test session, shared by every xdist worker under a file lock."""
    import fcntl
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    root = _run_root(tmp_path_factory)
    out, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # a worker that failed half-way
            out.mkdir()
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """The embedded synthetic ImageFolder (small), generated once per test session."""
    from helpers import run_module
    return _once(tmp_path_factory, "synth", lambda out: run_module(
        "pipeline", "synth", "--out", str(out), "--classes", "4", "--per-class", "6", "--seed", "0", check=True))


@pytest.fixture(scope="session")
def tiny_features(synth_dir, tmp_path_factory) -> Path:
    """A real features shard set from `pipeline extract` with the tiny presets; returns its folder."""
    from helpers import run_module
    return _once(tmp_path_factory, "features", lambda out: run_module(
        "pipeline", "extract", "--source", str(synth_dir), "--out", str(out), "--vae", "tiny-vae",
        "--encoders", "tiny-dinov2,tiny-siglip", "--shard-size", "8", "--batch-size", "8", check=True))


@pytest.fixture
def small_disk(tmp_path):
    """A real small filesystem (a 32 MiB tmpfs, filled by the tests) for disk-full tests; skipped, saying why,
    where it cannot be mounted."""
    from helpers import mount_tmpfs
    mnt = tmp_path / "disk"
    unmount = mount_tmpfs(mnt, "32m")
    try:
        yield mnt
    finally:
        unmount()


from s3_fixture import faulty_s3, s3_bucket, s3_server  # noqa: E402,F401 - the moto S3 server fixtures
