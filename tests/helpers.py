"""Test helpers: small hand-built shard sets that follow the manifest contract (no pipeline needed)."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from manifests import SD_VAE_SCALE, Manifest, ShardEntry, storage, write_manifest, write_shard

REPO = Path(__file__).resolve().parents[1]


def make_features_manifest(root: str | os.PathLike, *, num: int = 32, classes: int = 4, shard_size: int = 16,
                           encoders: dict[str, int] | None = None, latent_shape=(8, 32, 32), tokens: int = 256,
                           hflip: bool = False, seed: int = 0, codec: str = "float16") -> Manifest:
    """Write a features shard set of random arrays with the contract's layout and return its manifest.

    `codec` is the token codec (manifests/codecs.py): float16 writes the random tokens as before; int8 or
    float8_e4m3 encodes the same float32 draws into codes + per-token scales.
    """
    from manifests.codecs import encode_members, get_codec, token_field
    encoders = {"tiny-dinov2": 64} if encoders is None else encoders
    root = storage.path(root)  # a folder or an object-store URL
    rng = np.random.default_rng(seed)
    entries, keys = [], []
    samples = []
    for i in range(num):
        c, h, w = latent_shape
        mean = rng.standard_normal((c // 2, h, w)).astype(np.float32)
        std = np.full((c // 2, h, w), 0.1, np.float32)
        s = {"__key__": f"img{i:05d}", "cls": i % classes, "latent.npy": np.concatenate([mean, std]),
             "json": {"source": f"synthetic/{i}.jpg", "size": [h * 8, w * 8]}}
        for name, d in encoders.items():
            for flip in (False, True) if hflip else (False,):
                draw = rng.standard_normal((tokens, d))
                if codec == "float16":
                    s[f"{name}.flip.npy" if flip else f"{name}.npy"] = draw.astype(np.float16)
                    continue
                for f, arr in encode_members(name, draw.astype(np.float32), get_codec(codec)).items():
                    s[f"{f}.flip.npy" if flip else f"{f}.npy"] = arr
        if hflip:
            s["latent.flip.npy"] = np.concatenate([mean[..., ::-1], std])
        samples.append(s)
        keys.append(s["__key__"])
    for j in range(0, num, shard_size):
        info = write_shard(root / "shards" / f"train-{j // shard_size:06d}.tar", samples[j:j + shard_size])
        entries.append(ShardEntry(url=f"shards/{info.path.name}", nsamples=len(info.keys), sha256=info.sha256,
                                  bytes=info.bytes))
    fields = {"latent": {"dtype": "float32", "shape": list(latent_shape), "codec": "vae-moments",
                         "vae": {"name": "tiny-vae", "scaling_factor": SD_VAE_SCALE, "shift": 0.0}}}
    for name, d in encoders.items():
        fields[name] = {"dtype": "float16", "shape": [tokens, d], "codec": "patch-tokens",
                        "encoder": {"name": name, "pretrained": False, "grid": [16, 16]}}
        if codec != "float16":
            fields[name].update(token_field(codec, tokens, d, name))
    m = Manifest(root=root, name="test-features", shardlist=entries, kind="features", num_samples=num,
                 fields=fields, classes=[f"class{c:03d}" for c in range(classes)],
                 preprocess={"resolution": latent_shape[1] * 8, "crop": "adm-center", "hflip": hflip},
                 created_by={"version": "test", "command": "tests/helpers.py"})
    write_manifest(m)
    return m


@functools.lru_cache(maxsize=None)
def cli_help(*cmd: str) -> str:
    """`python -m <cmd> --help` as printed at 80 columns, run in this process (a process would cost a torch import)."""
    import contextlib
    import importlib
    import io
    from unittest import mock
    main = importlib.import_module(f"{cmd[0]}.__main__").main
    out = io.StringIO()
    # argparse wraps to the terminal's width; a captured subprocess sees 80 columns
    with mock.patch.dict(os.environ, {"COLUMNS": "80"}), contextlib.redirect_stdout(out):
        try:
            rc = main([*cmd[1:], "--help"])
        except SystemExit as e:
            rc = e.code
    assert rc in (0, None), f"{' '.join(cmd)} --help exited {rc}"
    return out.getvalue()


def run_module(*args: str, cwd: str | os.PathLike | None = None, env: dict | None = None, timeout: float = 600,
               check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m <args>` with this interpreter, capturing output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        p = subprocess.run([sys.executable, "-m", *args], cwd=cwd or REPO, env=full_env, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # what it printed, whole, not the repr pytest cuts short
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        raise AssertionError(f"{' '.join(args)} still running after {timeout:g} s; its stderr ends:\n{err[-6000:]}")
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def assert_user_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, one line on stderr, no traceback, and it names the culprit."""
    err = p.stderr.strip()
    assert p.returncode == 2, f"exit {p.returncode}, stderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1, err
    for n in needles:
        assert n in lines[-1], f"{n!r} not in {lines[-1]!r}"


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports that are free now (torchrun's --master-port, a Ray head's), so overlapping runs never
    collide: all n are held open together while they are picked."""
    import socket
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of a process group this test started in its own session (Ray or torchrun helpers)."""
    import signal
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_until_killed(cmd: list[str], point: str, log: Path, *, env: dict | None = None, timeout: float = 300,
                     marker: str | None = None) -> str:
    """Run `cmd` in its own session with REPA_KILL_AT=point; assert the hook SIGKILLed it there; return stderr.

    The hook's arrival counter files (`<log>.kills/<point>.<n>`) show it fired, even when it fired in a Ray actor
    whose last words never reach the driver's stderr. Processes whose command line holds `marker` (Ray's
    temp folder) are the job's stragglers in other groups: they are killed and waited for.
    """
    from common.faults import parse_kill_spec
    name, nth, _, _ = parse_kill_spec(point)
    kills = log.with_name(log.name + ".kills")
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {}), "REPA_KILL_AT": point,
                "REPA_KILL_DIR": str(kills)}
    with open(log, "w") as err_file:  # a file, not a pipe: helpers of the job must not keep the test waiting
        p = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.DEVNULL, stderr=err_file,
                             start_new_session=True)
        try:
            p.wait(timeout=timeout)
        finally:
            kill_group(p.pid)
            p.wait()
            if marker:
                kill_marked(marker)
    err = log.read_text()
    assert p.returncode == -9, f"{point}: expected SIGKILL at the hook, got exit {p.returncode}:\n{err[-3000:]}"
    assert (kills / f"{name}.{nth}").exists(), f"{point}: the hook did not fire:\n{err[-3000:]}"
    return err


def kill_marked(marker: str, timeout: float = 30) -> None:
    """SIGKILL every process whose command line or environment holds `marker` (a test's own Ray temp or run folder)."""
    import signal
    import time
    end = time.time() + timeout
    while True:
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    # Ray workers retitle themselves, so the inherited environment is searched too.
                    if any(marker in (d / f).read_bytes().decode(errors="replace") for f in ("cmdline", "environ")):
                        pids.append(int(d.name))
                except OSError:
                    pass
        if not pids or time.time() > end:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.1)


def fill_disk(folder: str | os.PathLike) -> None:
    """Write a filler file into `folder` until the filesystem is really full (ENOSPC): the next write fails."""
    import errno
    path = Path(folder) / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            data = bytes(chunk)
            while True:
                try:
                    os.write(fd, data)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
    finally:
        os.close(fd)


def filled_before(fn, folder: str | os.PathLike):
    """Wrap `fn` so that the disk holding `folder` is filled just before it runs: the real writer then meets a
    full disk at its real write call (the wrapper only picks the moment)."""
    def wrapper(*a, **k):
        fill_disk(folder)
        return fn(*a, **k)
    return wrapper


def mount_tmpfs(path: str | os.PathLike, size: str):
    """Mount a tmpfs of `size` (e.g. '600k') at `path` and return an unmount function; pytest.skip (saying why)
    where that is impossible (not root, no mount permission)."""
    import pytest
    Path(path).mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("disk-full tests mount a tmpfs, which needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode})")
    return lambda: subprocess.run(["umount", "-l", str(path)], capture_output=True)
