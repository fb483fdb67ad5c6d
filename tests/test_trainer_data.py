"""The training loader's output against the shards read independently (plain tarfile + numpy.load)."""
from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_features_manifest
from manifests import load_manifest
from trainer.data.indexed import FeatureBatches, StepSampler, build_index, make_loader, needed_exts, resolve_fields

NUM, BATCH, STEPS = 24, 4, 16  # 16 batches: 8 per worker with 2 workers, more than a worker's ring of 6


@pytest.fixture(scope="module")
def feats(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loaderfeat")
    make_features_manifest(root, num=NUM, classes=3, shard_size=10, latent_shape=(8, 8, 8), tokens=16,
                           encoders={"enc-a": 8, "enc-b": 4}, hflip=True, seed=5)
    return root


def read_tars(root: Path) -> dict[str, dict[str, object]]:
    """key -> member ext -> value, straight from the tar files the manifest lists."""
    m = load_manifest(root)
    out: dict[str, dict[str, object]] = {}
    for entry in m.shardlist:
        with tarfile.open(root / entry.url) as tar:
            for ti in tar:
                key, _, ext = ti.name.partition(".")
                data = tar.extractfile(ti).read()
                val = np.load(io.BytesIO(data), allow_pickle=False) if ext.endswith("npy") else data
                out.setdefault(key, {})[ext] = val
    return out


@pytest.mark.parametrize("workers,hflip,pin", [(0, False, False), (2, True, False), (1, True, True)])
def test_loader_returns_the_shard_arrays(feats, workers, hflip, pin):
    m = load_manifest(feats)
    spec = resolve_fields(m, None, 2, hflip)
    truth = read_tars(feats)
    dtypes = {name: np.dtype(m.fields[name]["dtype"]) for name in spec.encoders}  # whatever the codec stores
    ds = FeatureBatches(build_index(m, needed_exts(spec, hflip)), spec, seed=11, hflip=hflip)
    sampler = StepSampler(NUM, BATCH, 0, 1, BATCH, 11, 0, STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pin_memory without an accelerator: torch warns and skips pinning
        loader = make_loader(ds, sampler, workers, pin=pin)
        ring = ds.ring_size  # buffers per worker (or in-process)
        assert STEPS // max(workers, 1) > ring  # each ring wraps at least once
        batches = 0
        flips_seen, ptrs = set(), []
        for (step, _, ids), batch in zip(sampler, loader):
            assert batch["step"] == step and int(batch["tag"]) == batch["pos0"]
            keys = batch["keys"]
            assert keys == [f"img{i:05d}" for i in ids]  # the sampler's samples, in its order
            x, y, zs = batch["x"].numpy(), batch["y"].numpy(), [z.numpy() for z in batch["zs"]]
            assert x.dtype == np.float32 and x.shape == (BATCH, 8, 8, 8)  # the moments: the step draws the latent
            ptrs.append(batch["x"].data_ptr())
            for j, key in enumerate(keys):
                t = truth[key]
                assert y[j] == int(t["cls"].decode())
                # The tokens pick the flipped twin or not, exactly; the latent must follow the same choice.
                flip = [k for k in (False, True) if np.array_equal(zs[0][j], t["enc-a.flip.npy" if k else "enc-a.npy"])]
                assert len(flip) == 1, key
                flip = flip[0]
                flips_seen.add(flip)
                sfx = ".flip.npy" if flip else ".npy"
                for k, name in enumerate(spec.encoders):
                    assert zs[k].dtype == dtypes[name]
                    np.testing.assert_array_equal(zs[k][j], t[name + sfx])
                # The moments (mean then std) of the same twin, byte for byte; the posterior draw happens on the
                # device from (seed, step, sample) (trainer/loop/steprng.py, tests/test_trainer_gpu_paths.py).
                np.testing.assert_array_equal(x[j], t["latent" + sfx])
            batches += 1
    assert batches == STEPS
    assert flips_seen == ({False, True} if hflip else {False})
    # The ring wrapped: buffers were reused (no more distinct buffers than the rings hold), and the data above
    # stayed right after every wrap.
    assert len(set(ptrs)) <= ring * max(workers, 1), (ring, len(set(ptrs)))
    if workers and not torch.cuda.is_available():
        # Workers write into rings the main process made before they started: batches are views of those, so no
        # tensor crossed the worker queue (each would cost a file-descriptor handshake).
        assert set(ptrs) <= {slot[0].data_ptr() for worker_ring in ds._shared for slot in worker_ring}


def test_a_worker_sends_a_ring_reference_and_the_pin_thread_copies_it(feats, monkeypatch):
    """What crosses a worker's queue is a RingRef, not tensors; the pin thread's path (torch's `pin_memory` util,
    CUDA only) turns it into copies equal to an in-process read. Page-locking itself needs an accelerator, so here
    `Tensor.pin_memory` is replaced by a copy: this checks the plumbing, not the pinning."""
    from types import SimpleNamespace

    from torch.utils.data._utils.pin_memory import pin_memory
    m = load_manifest(feats)
    spec = resolve_fields(m, None, 2, True)
    index = build_index(m, needed_exts(spec, True))
    sampler = StepSampler(NUM, BATCH, 0, 1, BATCH, 11, 0, STEPS)
    item = next(iter(sampler))
    want = FeatureBatches(index, spec, seed=11, hflip=True)[item]  # in-process: tensors
    ds = FeatureBatches(index, spec, seed=11, hflip=True)
    make_loader(ds, sampler, 2, pin=False)  # makes the workers' rings here
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=1))  # as worker 1
    sent = ds[item]
    assert "x" not in sent and "zs" not in sent and (sent["ring"].worker, sent["ring"].slot) == (1, 0)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: self.clone())
    got = pin_memory(sent)["ring"]
    ring_x = ds._shared[1][0][0]
    assert got["x"].data_ptr() != ring_x.data_ptr() and torch.equal(got["x"], ring_x[:BATCH])  # a copy
    for k in ("x", "y", "tag"):
        assert torch.equal(got[k], want[k]), k
    assert all(torch.equal(a, b) for a, b in zip(got["zs"], want["zs"])) and got["zscales"] == want["zscales"]


def test_loader_pins_memory_only_for_an_accelerator(feats, tmp_path):
    """The trainer's loader pins host memory only when it trains on CUDA: on a CPU run the DataLoader it builds
    does not pin. (The old test asserted torch's own behaviour and could not fail; planted bug that this one
    catches: `pin=True` in trainer/loop/runtime.py's open_loader call.)"""
    from trainer.loop.config import TrainConfig
    from trainer.loop.runtime import setup
    r = setup(TrainConfig(manifest=str(feats), run_dir=str(tmp_path / "run"), model="SiT-Debug/2", batch_size=4,
                          steps=1, precision="fp32", num_workers=0))
    loader = r.loader
    assert r.device.type == "cpu" and loader.pin_memory is (r.device.type == "cuda")


def test_posterior_draw_is_a_function_of_seed_and_step_and_uses_both_moments():
    """The step's latent z = (mean + std·ε)·scale + shift, with ε ~ N(0, 1) fresh per step and per sample."""
    from trainer.loop.steprng import StepRandom, posterior
    r = StepRandom(seed=3, batch=64, shape=(4, 8, 8), drop_prob=0.1, device=torch.device("cpu"))
    a, b = r.draw(5), r.draw(6)
    assert torch.equal(r.draw(5).post, a.post) and not torch.equal(a.post, b.post)
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(64, 4, 8, 8, generator=g), torch.rand(64, 4, 8, 8, generator=g) + 0.5
    z = posterior(torch.cat([mean, std], 1), a.post, 0.18215, 0.1)  # (64, 4, 8, 8)
    eps = ((z - 0.1) / 0.18215 - mean) / std
    torch.testing.assert_close(eps, a.post, rtol=1e-4, atol=1e-4)
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1) < 0.05
    corr = np.corrcoef(eps.reshape(64, -1).numpy())[np.triu_indices(64, 1)]
    assert np.abs(corr).max() < 0.5  # a fresh draw per sample, not one shared noise
    assert torch.equal(r.draw(5).rows(8, 4).post, a.post[8:12])  # a rank's rows are the global batch's rows
