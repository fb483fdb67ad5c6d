"""The pipeline's exactly-once shard writer: plain and streaming, truncation, disk full, Ray-wrapped errors."""
from __future__ import annotations

import errno
import io
import json
import os

import numpy as np
import pytest

from common import UserError
from manifests import iter_shard
from pipeline.sources import Item
from pipeline.writer import ShardPlan, clean_tmp, fingerprint, plan_shards, shard_done, tar_path, write_shard_once

# ----------------------------------------------------------------------------------------------- writer
def _plan(tmp_path) -> tuple[ShardPlan, str]:
    items = [Item(key=f"k{i}", label=i, source=f"s{i}", path="-") for i in range(3)]
    return plan_shards(items, 3)[0], fingerprint({"a": 1}, items)


def _samples():
    return [{"__key__": f"k{i}", "cls": i, "latent.npy": np.full((8, 4, 4), i, np.float32)} for i in range(3)]


def test_writer_exactly_once_and_truncation(tmp_path):
    plan, fp = _plan(tmp_path)
    (tmp_path / "shards").mkdir()
    assert not shard_done(tmp_path, plan, fp)
    side = write_shard_once(tmp_path, plan, fp, _samples(), [], {})
    assert shard_done(tmp_path, plan, fp, verify=True) and side["keys"] == ["k0", "k1", "k2"]
    assert [s["__key__"] for s in iter_shard(tar_path(tmp_path, plan))] == side["keys"]
    with open(tar_path(tmp_path, plan), "rb") as f:  # the sidecar's member index points at the bytes
        off, size = side["index"]["k2"]["latent.npy"]
        f.seek(off)
        assert np.load(io.BytesIO(f.read(size)), allow_pickle=False)[0, 0, 0] == 2
    with pytest.raises(UserError, match="different extract"):
        shard_done(tmp_path, plan, "other-fingerprint")
    path = tar_path(tmp_path, plan)
    path.write_bytes(path.read_bytes()[:-700])  # truncated on disk: no longer finished
    assert not shard_done(tmp_path, plan, fp)


def test_writer_disk_full_leaves_nothing_partial(tmp_path, monkeypatch):
    """ENOSPC at the write call: one-line error naming the path; no tmp, no tar, no sidecar."""
    import manifests.io as mio
    plan, fp = _plan(tmp_path)
    (tmp_path / "shards").mkdir()
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(mio, "open", lambda *a, **k: Full(real_open(*a, **k)), raising=False)
    with pytest.raises(UserError) as e:
        write_shard_once(tmp_path, plan, fp, _samples(), [], {})
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and str(tar_path(tmp_path, plan)) in msg
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == []
    assert clean_tmp(tmp_path) == 0


def test_ray_wrapped_user_error_becomes_one_line():
    from ray.exceptions import RayTaskError
    from pipeline.job import _find_user_error
    inner = UserError("cannot write /x/shards/train-000001.tar: No space left on device")
    wrapped = RayTaskError("ShardEncoder.__call__", "Traceback...\nmany lines", inner).as_instanceof_cause()
    outer = RuntimeError("dataset failed")
    outer.__cause__ = wrapped
    got = _find_user_error(outer)
    assert isinstance(got, UserError) and str(got) == str(inner)


def _streaming_actor(tmp_path, batches):
    """A ShardEncoder whose sample stream is given (the streaming writer under test, no models)."""
    from manifests import storage
    from pipeline.config import ExtractConfig
    from pipeline.worker import ShardEncoder
    actor = ShardEncoder.__new__(ShardEncoder)
    actor.cfg = ExtractConfig(source="-", out=str(tmp_path), encoders=[])
    actor.out, actor.fingerprint = storage.path(tmp_path), "fp"
    actor.fields = {}
    actor._samples = lambda crops, metas: batches()
    (tmp_path / "shards").mkdir(exist_ok=True)
    return actor


def test_streaming_writer_abandons_tar_when_encoding_fails(tmp_path):
    def batches():
        yield _samples()[:2]
        raise RuntimeError("CUDA error: device lost")
    actor = _streaming_actor(tmp_path, batches)
    plan = ShardPlan(0, ())
    with pytest.raises(RuntimeError, match="device lost"):
        actor._encode_and_write(plan, None, [{}] * 3, [])
    assert list((tmp_path / "shards").iterdir()) == []  # no tar, no sidecar, no tmp


def test_streaming_writer_disk_full_is_one_line_and_nothing_partial(tmp_path, monkeypatch):
    import manifests.io as mio

    def batches():
        for s in _samples():
            yield [s]
    actor = _streaming_actor(tmp_path, batches)
    real_open = open

    def full_open(path, *a, **k):
        f = real_open(path, *a, **k)
        f.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return f
    monkeypatch.setattr(mio, "open", full_open, raising=False)
    with pytest.raises(UserError, match="No space left on device") as e:
        actor._encode_and_write(ShardPlan(0, ()), None, [{}] * 3, [])
    assert "train-000000.tar" in str(e.value)
    assert list((tmp_path / "shards").iterdir()) == []
    monkeypatch.undo()
    side = _streaming_actor(tmp_path, batches)._encode_and_write(ShardPlan(0, ()), None, [{}] * 3, [])
    assert side["nsamples"] == 3 and [s["__key__"] for s in iter_shard(tar_path(tmp_path, ShardPlan(0, ())))] == \
        ["k0", "k1", "k2"]


def test_actor_encodes_the_next_shard_while_the_last_one_is_written(tmp_path, monkeypatch):
    """Two concurrent calls of one actor (as job.actor_pool lets Ray make them): the second shard's encoding runs
    while the first shard's writer is still finishing, and encoding itself never runs twice at once."""
    import threading
    import time as _time

    from pipeline import worker
    from pipeline.job import actor_pool
    from pipeline.sources import list_source
    from pipeline.synth import synthesize
    from pipeline.config import ExtractConfig
    from pipeline.worker import ShardEncoder, decode_shard
    assert actor_pool(1).max_concurrent_calls_per_actor == 2  # this Ray supports the overlap
    synthesize(tmp_path / "src", classes=2, per_class=2)
    items = list_source(str(tmp_path / "src")).items
    rows = [decode_shard({"shard": i, "resolution": 256, "items": json.dumps([items[i].to_dict()])}) for i in (0, 1)]
    (tmp_path / "out" / "shards").mkdir(parents=True)
    actor = ShardEncoder(ExtractConfig(source=str(tmp_path / "src"), out=str(tmp_path / "out"), vae="tiny-vae",
                                       encoders=["tiny-dinov2"], batch_size=4), fingerprint="f")
    events, inside = [], []
    real_write, real_iter = worker.write_shard_once, actor._encode_iter

    def slow_write(out, plan, fp, samples, skipped, fields):
        side = real_write(out, plan, fp, list(samples), skipped, fields)
        events.append(("written", plan.index, _time.perf_counter()))
        _time.sleep(1.5)  # a slow disk or object store at the end of the shard
        events.append(("returned", plan.index, _time.perf_counter()))
        return side

    def encode_iter(crops):
        inside.append(1)
        assert len(inside) == 1, "two encodes at once"
        events.append(("encode", None, _time.perf_counter()))
        try:
            yield from real_iter(crops)
        finally:
            inside.pop()

    monkeypatch.setattr(worker, "write_shard_once", slow_write)
    monkeypatch.setattr(actor, "_encode_iter", encode_iter)
    first = threading.Thread(target=actor, args=({k: np.asarray([v], dtype=object) for k, v in rows[0].items()},))
    first.start()
    while not any(e[0] == "written" for e in events):
        _time.sleep(0.01)
    actor({k: np.asarray([v], dtype=object) for k, v in rows[1].items()})
    first.join()
    second_encode = [e[2] for e in events if e[0] == "encode"][1]
    first_returned = [e[2] for e in events if e[0] == "returned" and e[1] == 0][0]
    assert second_encode < first_returned  # shard 1 was encoded while shard 0's writer was still busy
    assert sorted(p.name for p in (tmp_path / "out" / "shards").glob("*.tar")) == ["train-000000.tar",
                                                                                    "train-000001.tar"]
