"""`python -m evaluation` bad-input matrix: every user mistake is one line and exit code 2."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_user_error, run_module
from manifests import Manifest, ShardEntry, write_manifest, write_shard
from common import run_cli

from eval_sets import N, RES, _tmp_files, evaluate, one_line_error, png_bytes, sets, write_folder, write_samples_manifest  # noqa: F401 (sets is a fixture)


@pytest.fixture(scope="module")
def bad(sets, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(2)
    np.savez(root / "no_arr0.npz", images=sets.images)
    np.savez(root / "object.npz", arr_0=np.array([{"a": 1}, None], dtype=object))
    np.savez(root / "float.npz", arr_0=sets.images.astype(np.float32))
    np.savez(root / "small.npz", arr_0=rng.integers(0, 256, (N, 24, 24, 3), dtype=np.uint8))
    np.savez(root / "mu_only.npz", arr_0=sets.images, mu=np.zeros(2048))
    np.savez(root / "bad_mu.npz", arr_0=sets.images, mu=np.zeros(100), sigma=np.eye(100))
    np.savez(root / "object_mu.npz", arr_0=sets.images, mu=np.array([None] * 3, dtype=object))
    mixed = write_folder(root / "mixed", list(sets.images[:5]))
    Image.fromarray(rng.integers(0, 256, (RES + 2, RES, 3), dtype=np.uint8)).save(mixed / "0005.png")
    corrupt = write_folder(root / "corrupt", list(sets.images[:5]))
    (corrupt / "0002.png").write_bytes(png_bytes(sets.images[2])[:60])
    (root / "empty").mkdir()
    badshard = root / "badshard"
    write_samples_manifest(badshard, sets.images)
    imgs = sets.images.copy()
    entries = []
    samples = [{"__key__": f"sample_{i:07d}", "png": png_bytes(imgs[i]) if i != 3 else b"\x89PNG not really",
                "cls": 0} for i in range(N)]
    info = write_shard(root / "badpng" / "shards" / "samples-000000.tar", samples)
    entries.append(ShardEntry(url=f"shards/{info.path.name}", nsamples=N, sha256=info.sha256, bytes=info.bytes))
    write_manifest(Manifest(root=root / "badpng", name="bad", shardlist=entries, kind="samples", num_samples=N,
                            fields={"png": {"dtype": "uint8", "shape": [RES, RES, 3], "codec": "png"}}))
    (root / "afile").write_text("x")
    torch.save({"conv.weight": torch.zeros(1)}, root / "wrong_keys.pth")
    return root


BAD_CASES = {
    "missing samples": (lambda s, b: ["--samples", str(b / "nope"), "--reference", str(s.ref)], ["not found", "nope"]),
    "missing reference": (lambda s, b: ["--samples", str(s.npz), "--reference", str(b / "nope.npz")], ["nope.npz"]),
    "empty folder": (lambda s, b: ["--samples", str(b / "empty"), "--reference", str(s.ref)], ["no .png"]),
    "size mismatch": (lambda s, b: ["--samples", str(s.npz), "--reference", str(b / "small.npz")],
                      ["32x32", "24x24"]),
    "npz without arr_0": (lambda s, b: ["--samples", str(b / "no_arr0.npz"), "--reference", str(s.ref)],
                          ["'arr_0'", "no_arr0.npz"]),
    "object array npz": (lambda s, b: ["--samples", str(b / "object.npz"), "--reference", str(s.ref)],
                         ["object array", "allow_pickle=False"]),
    "object array stats": (lambda s, b: ["--samples", str(s.npz), "--reference", str(b / "object_mu.npz")],
                           ["object array"]),
    "non-uint8": (lambda s, b: ["--samples", str(b / "float.npz"), "--reference", str(s.ref)], ["float32", "uint8"]),
    "too few samples": (lambda s, b: ["--samples", str(s.npz), "--reference", str(s.ref), "--num-samples", "50"],
                        ["fewer than --num-samples 50"]),
    "zero count": (lambda s, b: ["--samples", str(s.npz), "--reference", str(s.ref), "--num-samples", "0"],
                   ["--num-samples"]),
    "mixed sizes": (lambda s, b: ["--samples", str(b / "mixed"), "--reference", str(s.ref)],
                    ["0005.png", "mixed image sizes"]),
    "corrupt png": (lambda s, b: ["--samples", str(b / "corrupt"), "--reference", str(s.ref)], ["0002.png"]),
    "corrupt png in shard": (lambda s, b: ["--samples", str(b / "badpng"), "--reference", str(s.ref)],
                             ["sample_0000003"]),
    "mu without sigma": (lambda s, b: ["--samples", str(s.npz), "--reference", str(b / "mu_only.npz")],
                         ["'mu' without 'sigma'"]),
    "bad stats shape": (lambda s, b: ["--samples", str(s.npz), "--reference", str(b / "bad_mu.npz")],
                        ["'mu' has shape [100]"]),
    "unwritable out": (lambda s, b: ["--samples", str(s.npz), "--reference", str(s.ref), "--out",
                                     str(b / "afile" / "r.json")], ["not writable", "afile"]),
    "no samples": (lambda s, b: ["--reference", str(s.ref)], ["--samples is required"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_line_exit_2(case, sets, bad, tmp_path, capsys):
    make_args, needles = BAD_CASES[case]
    args = make_args(sets, bad)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "r.json")]
    rc, _, err = evaluate(capsys, *args, cache=sets.cache)  # the reference's entry hits: failures come fast
    one_line_error(rc, err, *needles)
    assert not _tmp_files(sets.cache) and not (tmp_path / "r.json").exists()


def test_weights_errors(sets, bad, tmp_path, capsys, monkeypatch):
    base = ["--samples", str(sets.npz), "--reference", str(sets.ref), "--out", str(tmp_path / "r.json")]
    rc, _, err = evaluate(capsys, *base, weights=str(tmp_path / "missing.pth"))
    one_line_error(rc, err, "Inception weights not found", "missing.pth")
    rc, _, err = evaluate(capsys, *base, weights=str(bad / "wrong_keys.pth"))
    one_line_error(rc, err, "wrong_keys.pth", "do not match")
    rc, _, err = evaluate(capsys, *base, weights="random:abc")
    one_line_error(rc, err, "random:SEED")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torchhome"))
    from evaluation.__main__ import main
    capsys.readouterr()
    rc = run_cli(main, [*base, "--no-cache", "--no-progress"])
    one_line_error(rc, capsys.readouterr().err, "download", str(tmp_path / "torchhome" / "hub" / "checkpoints"),
                   "--inception-weights")
    if not torch.cuda.is_available():
        rc, _, err = evaluate(capsys, *base, "--device", "cuda")
        one_line_error(rc, err, "--device cuda")


def test_bad_input_subprocess_has_no_traceback(sets, tmp_path):
    p = run_module("evaluation", "--samples", str(tmp_path / "missing.npz"), "--reference", str(sets.ref),
                   "--inception-weights", "random:0", timeout=120)
    assert_user_error(p, "missing.npz")


def test_align_is_dispatched_lazily(monkeypatch):
    import types

    from evaluation.__main__ import main
    seen = {}
    stub = types.ModuleType("evaluation.align.cli")
    stub.main = lambda argv: seen.setdefault("argv", list(argv)) and 0
    monkeypatch.setitem(sys.modules, "evaluation.align.cli", stub)
    assert main(["align", "--k", "10"]) == 0
    assert seen["argv"] == ["--k", "10"]
