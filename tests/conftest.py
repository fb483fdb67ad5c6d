import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """The embedded synthetic ImageFolder (small), generated once per test session."""
    from helpers import run_module
    out = tmp_path_factory.mktemp("synth")
    run_module("pipeline", "synth", "--out", str(out), "--classes", "4", "--per-class", "6", "--seed", "0",
               check=True)
    return out


@pytest.fixture(scope="session")
def tiny_features(synth_dir, tmp_path_factory) -> Path:
    """A real features shard set from `pipeline extract` with the tiny presets; returns its folder."""
    from helpers import run_module
    out = tmp_path_factory.mktemp("features")
    run_module("pipeline", "extract", "--source", str(synth_dir), "--out", str(out), "--vae", "tiny-vae",
               "--encoders", "tiny-dinov2,tiny-siglip", "--shard-size", "8", "--batch-size", "8", check=True)
    return out


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


from s3_fixture import s3_bucket, s3_server  # noqa: E402,F401 - the moto S3 server fixtures
