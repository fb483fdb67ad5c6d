"""Several sample sets in one report (mean, min, std against numpy and the per-set reports), the cache's size bound
(LRU over sample sets, references never evicted), --no-cache-samples, and the watcher's FD_DINOv2 panel."""
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from eval_sets import RES, evaluate, sets  # noqa: F401 (sets is a fixture)


@pytest.fixture(scope="module")
def seeds(sets):
    """Three 'seeds': the same kind of images, drawn differently."""
    out = []
    for s in range(3):
        imgs = np.random.default_rng(10 + s).integers(0, 256, (6, RES, RES, 3), dtype=np.uint8)
        imgs[:, : 8 + 4 * s] //= 2
        np.savez(sets.root / f"seed{s}.npz", arr_0=imgs)
        out.append(sets.root / f"seed{s}.npz")
    return out


def test_several_sets_report_each_and_their_spread(sets, seeds, tmp_path, capsys):
    singles = []
    for i, s in enumerate(seeds):
        out = tmp_path / f"one{i}.json"
        rc, _, err = evaluate(capsys, "--samples", str(s), "--reference", str(sets.ref), "--out", str(out),
                              "--dinov2", "tiny-dinov2", cache=sets.cache)
        assert rc == 0, err
        singles.append(json.loads(out.read_text())["metrics"])
    out = tmp_path / "all.json"
    rc, stdout, err = evaluate(capsys, "--samples", *map(str, seeds), "--reference", str(sets.ref), "--out", str(out),
                               "--dinov2", "tiny-dinov2", cache=sets.cache)
    assert rc == 0, err
    rep = json.loads(out.read_text())
    assert [s["samples"]["path"] for s in rep["sets"]] == [str(s) for s in seeds]
    names = ("fid", "sfid", "is", "precision", "recall", "fd_dinov2")
    for one, got in zip(singles, rep["sets"]):
        assert got["metrics"] == pytest.approx(one, rel=1e-9)  # the same numbers as evaluated alone
    for k in names:
        v = np.array([m[k] for m in singles])
        s = rep["summary"][k]
        assert s["mean"] == pytest.approx(v.mean(), rel=1e-9) and s["min"] == pytest.approx(v.min(), rel=1e-9)
        assert s["std"] == pytest.approx(v.std(ddof=1), rel=1e-9) and s["n"] == 3
        assert rep["metrics"][k] == s["mean"]
    lines = stdout.splitlines()
    assert "FD_DINOv2↓" in lines[0] and sum(".npz" in ln and "seed" in ln for ln in lines) == 3
    for stat in ("mean", "std", "min"):
        row = next(ln for ln in lines if ln.startswith(f"{stat} of 3"))
        assert f"{rep['summary']['fid'][stat]:.2f}" in row
    assert rep["settings"]["samples"] == [str(s) for s in seeds]


def _entry(cache: Path, name: str, set_id: str, size: int, mtime: float, reference: bool = False) -> Path:
    p = cache / f"{name}.h5"
    with h5py.File(p, "w") as f:
        f.attrs["set_id"] = set_id
        f.create_dataset("pad", data=np.zeros(size // 8))  # about `size` bytes
    os.utime(p, (mtime, mtime))
    if reference:
        (cache / f"{name}.ref").touch()
    return p


def test_lru_evicts_the_oldest_sample_set_whole_and_never_a_reference(tmp_path):
    from evaluation.cache import GIB, evict
    cache = tmp_path / "cache"
    cache.mkdir()
    now = time.time()
    ref = _entry(cache, "ref", "R", 400_000, now - 1000, reference=True)  # the oldest of all, pinned
    old = [_entry(cache, "a_inc", "A", 300_000, now - 500), _entry(cache, "a_dino", "A", 100_000, now - 400)]
    mid = [_entry(cache, "b_inc", "B", 300_000, now - 300)]
    new = [_entry(cache, "c_inc", "C", 300_000, now - 100)]
    total = sum(p.stat().st_size for p in cache.glob("*.h5"))
    limit = (total - 150_000) / GIB  # one set must go: the least recently used, A, with both its entries
    removed = evict(cache, limit)
    assert sorted(removed) == sorted(old)
    assert ref.exists() and all(p.exists() for p in mid + new)
    assert not evict(cache, limit)  # within the bound now
    removed = evict(cache, 1e-9, keep={new[0]})  # everything that may go, goes
    assert removed == mid and ref.exists() and new[0].exists()


def test_cache_bound_and_no_cache_samples_end_to_end(sets, seeds, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "r.json"
    args = ("--reference", str(sets.ref), "--out", str(out))
    assert evaluate(capsys, "--samples", str(seeds[0]), *args, cache=cache)[0] == 0
    first = json.loads(out.read_text())
    assert len(list(cache.glob("*.h5"))) == 2 and len(list(cache.glob("*.ref"))) == 1
    rc, _, err = evaluate(capsys, "--samples", str(seeds[1]), *args, "--cache-gb", "1e-6", cache=cache)
    assert rc == 0, err
    second = json.loads(out.read_text())
    left = {p.name for p in cache.glob("*.h5")}
    assert Path(first["samples"]["cache_path"]).name not in left  # the older sample set was evicted
    assert left == {Path(second["samples"]["cache_path"]).name, Path(first["reference"]["cache_path"]).name}
    assert "over --cache-gb" in err  # the bound cannot be met: the reference and this job's entries stay
    rc, _, err = evaluate(capsys, "--samples", str(seeds[2]), *args, "--no-cache-samples", cache=cache)
    assert rc == 0, err
    third = json.loads(out.read_text())
    assert third["samples"]["cache"] == "off" and third["reference"]["cache"] == "hit"
    assert {p.name for p in cache.glob("*.h5")} == left


def test_watcher_passes_the_metrics_and_plots_fd_dinov2(tmp_path):
    from evaluation.watch import draw_fid_png, fid_figure, metrics_command, resolve
    cfg, _ = resolve(["run", "--reference", "r", "--metrics", "fid,fd_dinov2", "--dinov2", "tiny-dinov2",
                      "--resize", "pil"])
    argv = metrics_command(cfg, Path("s"), Path("r.json"))
    assert argv[argv.index("--metrics") + 1] == "fid,fd_dinov2" and argv[argv.index("--resize") + 1] == "pil"
    assert argv[argv.index("--dinov2") + 1] == "tiny-dinov2"
    rows = [{"step": s, "fid": 30 / s, "sfid": 9.0, "is": 50.0, "precision": 0.5, "recall": 0.4,
             "fd_dinov2": 400 / s, "num_samples": 8} for s in (1, 2, 4)]
    titles = [ax.get_title() for ax in fid_figure(rows).axes]
    assert len(titles) == 4 and "FD_DINOv2" in titles[3]
    ax = fid_figure(rows).axes[3]
    assert list(ax.lines[0].get_ydata()) == [400.0, 200.0, 100.0] and ax.get_yscale() == "log"
    assert len(fid_figure([{k: v for k, v in r.items() if k != "fd_dinov2"} for r in rows]).axes) == 3
    draw_fid_png(rows, tmp_path / "fid.png")
    assert (tmp_path / "fid.png").read_bytes()[:4] == b"\x89PNG"
