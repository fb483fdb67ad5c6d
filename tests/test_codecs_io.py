"""`pipeline convert` (exactly once, byte-preserving) and bad coded inputs: one line naming shard and sample, exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_features_manifest, run_module
from manifests import load_manifest, sha256_file, write_manifest, write_shard
from common import run_cli
from manifests.codecs import decode, encode, get_codec
from manifests.io import TMP_MARK
from manifests.shards import iter_shard
from pipeline.__main__ import main as pipeline_main
from trainer.__main__ import main as trainer_main


def train_args(manifest, run, *extra: str) -> list[str]:
    return ["train", "--manifest", str(manifest), "--run-dir", str(run), "--model", "SiT-Debug/2", "--batch-size",
            "4", "--steps", "4", "--ckpt-every", "4", "--log-every", "1", "--precision", "fp32", "--num-workers",
            "0", *extra]


def one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    assert rc == 2 and errors == lines[-1:] and "Traceback" not in err, err
    for n in needles:
        assert n in lines[-1], (n, lines[-1])


def mutate(root: Path, key: str, fn) -> None:
    """Rewrite the shard holding `key` with fn(sample) applied to it, and re-seal the manifest (sizes, sha256)."""
    m = load_manifest(root)
    for entry in m.shardlist:
        path = m.root / entry.url
        samples = list(iter_shard(path, decode=False))
        if key in [s["__key__"] for s in samples]:
            write_shard(path, [fn(dict(s)) if s["__key__"] == key else s for s in samples])
            entry.sha256, entry.bytes = sha256_file(path), path.stat().st_size
    write_manifest(m)


def npy(arr: np.ndarray) -> bytes:
    from manifests import encode_npy
    return encode_npy(arr)


@pytest.fixture()
def int8_set(tmp_path) -> Path:
    make_features_manifest(tmp_path / "i8", num=8, shard_size=4, codec="int8")
    return tmp_path / "i8"


def _drop(ext):
    def fn(s):
        s.pop(ext)
        return s
    return fn


def _set(ext, arr):
    def fn(s):
        s[ext] = npy(arr)
        return s
    return fn


def test_bad_coded_inputs_name_shard_and_sample(int8_set, tmp_path, capsys):
    scale = np.ones(256, np.float16)
    cases = [
        (_drop("tiny-dinov2.scale.npy"), ["shard 'shards/train-000000.tar'", "sample 'img00002'",
                                          "no member '.tiny-dinov2.scale.npy'"], "0"),
        (_set("tiny-dinov2.scale.npy", scale[:255]), ["train-000000.tar", "'img00002.tiny-dinov2.scale.npy'",
                                                      "has shape [255] float16", "[256] float16"], "0"),
        (_set("tiny-dinov2.scale.npy", np.where(np.arange(256) == 7, np.inf, scale).astype(np.float16)),
         ["train-000000.tar", "'img00002.tiny-dinov2.scale.npy'", "non-finite scale"], "0"),
        (_set("tiny-dinov2.scale.npy", np.full(256, np.nan, np.float16)),  # through a loader worker process
         ["train-000000.tar", "'img00002.tiny-dinov2.scale.npy'", "non-finite scale"], "1"),
    ]
    for i, (fn, needles, workers) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        make_features_manifest(bad, num=8, shard_size=4, codec="int8")
        mutate(bad, "img00002", fn)
        rc = run_cli(trainer_main, train_args(bad, tmp_path / f"run{i}", "--num-workers", workers))
        one_line_error(rc, capsys.readouterr().err, *needles)


def test_unknown_codec_is_one_line_for_every_reader(int8_set, tmp_path, capsys):
    raw = json.loads((int8_set / "manifest.json").read_text())
    raw["repa"]["fields"]["tiny-dinov2"]["token_codec"]["name"] = "int4"
    (int8_set / "manifest.json").write_text(json.dumps(raw))
    for cli, argv in ((trainer_main, train_args(int8_set, tmp_path / "r")),
                      (pipeline_main, ["verify", str(int8_set)]),
                      (pipeline_main, ["convert", "--manifest", str(int8_set), "--out", str(tmp_path / "o")])):
        rc = run_cli(cli, argv)
        one_line_error(rc, capsys.readouterr().err, "field 'tiny-dinov2' uses token codec 'int4'",
                       "does not know")


def test_convert_fp16_to_int8_is_exact_and_exactly_once(tmp_path, capsys):
    src, out = tmp_path / "f16", tmp_path / "i8"
    make_features_manifest(src, num=10, shard_size=4, hflip=True, encoders={"tiny-dinov2": 64, "tiny-siglip": 32})
    assert run_cli(pipeline_main, ["convert", "--manifest", str(src), "--out", str(out)]) == 0  # int8: the default
    err = capsys.readouterr().err
    assert "3 to convert" in err and "convert: 100%" in err
    m_in, m = load_manifest(src), load_manifest(out, verify=True)
    assert m.num_samples == 10 and m.classes == m_in.classes and m.preprocess == m_in.preprocess
    assert m.fields["tiny-dinov2"]["dtype"] == "int8" and m.fields["tiny-dinov2"]["encoder"]["name"] == "tiny-dinov2"
    assert m.fields["latent"] == m_in.fields["latent"]
    c = get_codec("int8")
    a = {s["__key__"]: s for p in m_in.shard_paths() for s in iter_shard(p, decode=False)}
    b = {s["__key__"]: s for p in m.shard_paths() for s in iter_shard(p)}
    assert list(a) == list(b)
    for key, s in b.items():
        for ext in ("cls", "json", "latent.npy", "latent.flip.npy"):  # copied byte for byte
            assert next(iter_shard_raw(m, key))[ext] == a[key][ext]
        for field in ("tiny-dinov2", "tiny-siglip"):
            for suf in (".npy", ".flip.npy"):
                x = torch.from_numpy(np.load(__import__("io").BytesIO(a[key][f"{field}{suf}"]))).float()
                q, sc = encode(x, c)
                assert np.array_equal(s[f"{field}{suf}"], q.numpy())
                assert np.array_equal(s[f"{field}.scale{suf}"], sc.numpy())
    manifest_bytes = (out / "manifest.json").read_bytes()
    # Re-run: nothing to do. Then lose shard 1 mid-write (tmp file, no tar, no sidecar): only it is rebuilt.
    assert run_cli(pipeline_main, ["convert", "--manifest", str(src), "--out", str(out)]) == 0
    assert "3 finished, 0 to convert" in capsys.readouterr().err
    tar1 = out / "shards" / "train-000001.tar"
    good = tar1.read_bytes()
    tar1.unlink()
    (out / "shards" / "train-000001.json").unlink()
    (out / "shards" / f"{TMP_MARK}train-000001.tar.123.abcd").write_bytes(good[:1000])
    assert run_cli(pipeline_main, ["convert", "--manifest", str(src), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "2 finished, 1 to convert" in err and "removed 1 half-written" in err
    assert tar1.read_bytes() == good and not list((out / "shards").glob(f"{TMP_MARK}*"))
    m2 = json.loads((out / "manifest.json").read_text())
    assert m2["shardlist"] == json.loads(manifest_bytes)["shardlist"]


def iter_shard_raw(m, key):
    for p in m.shard_paths():
        for s in iter_shard(p, decode=False):
            if s["__key__"] == key:
                yield s


def test_convert_back_to_float16_and_bad_inputs(int8_set, tmp_path, capsys):
    out = tmp_path / "back"
    assert run_cli(pipeline_main, ["convert", "--manifest", str(int8_set), "--out", str(out),
                                   "--feature-dtype", "float16"]) == 0
    capsys.readouterr()
    m = load_manifest(out)
    assert m.fields["tiny-dinov2"]["dtype"] == "float16"
    s8 = next(iter_shard(load_manifest(int8_set).shard_paths()[0]))
    s16 = next(iter_shard(m.shard_paths()[0]))
    want = decode(torch.from_numpy(s8["tiny-dinov2.npy"]), torch.from_numpy(s8["tiny-dinov2.scale.npy"]),
                  get_codec("int8")).half().numpy()
    assert np.array_equal(s16["tiny-dinov2.npy"], want) and "tiny-dinov2.scale.npy" not in s16
    rc = run_cli(pipeline_main, ["convert", "--manifest", str(int8_set), "--out", str(int8_set)])
    one_line_error(rc, capsys.readouterr().err, "is the input set's folder")
    rc = run_cli(pipeline_main, ["convert", "--manifest", str(int8_set), "--out", str(tmp_path / "x"),
                                 "--feature-dtype", "int4"])
    one_line_error(rc, capsys.readouterr().err, "--feature-dtype", "int4")
    mutate(int8_set, "img00005", _set("tiny-dinov2.scale.npy", np.full(256, np.inf, np.float16)))
    rc = run_cli(pipeline_main, ["convert", "--manifest", str(int8_set), "--out", str(tmp_path / "y")])
    one_line_error(rc, capsys.readouterr().err, "shard 'shards/train-000001.tar'", "sample 'img00005'",
                   "non-finite scale")
    mutate(int8_set, "img00002", _drop("tiny-dinov2.scale.npy"))  # shard 0 comes first: it stops there
    rc = run_cli(pipeline_main, ["convert", "--manifest", str(int8_set), "--out", str(tmp_path / "z")])
    one_line_error(rc, capsys.readouterr().err, "shard 'shards/train-000000.tar'", "sample 'img00002'",
                   "scale member '.tiny-dinov2.scale.npy' missing")


@pytest.mark.slow
def test_convert_cli_real_process(int8_set, tmp_path):
    p = run_module("pipeline", "convert", "--manifest", str(int8_set), "--out", str(tmp_path / "f8"),
                   "--feature-dtype", "float8_e4m3", "--workers", "2", timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "float8_e4m3fn[256, 64]" in p.stdout
    f = load_manifest(tmp_path / "f8").fields["tiny-dinov2"]
    assert f["token_codec"]["storage"] == "uint8" and "numpy has no float8_e4m3fn" in f["token_codec"]["note"]


def test_extract_actor_encodes_tokens_on_the_device(tmp_path):
    """The extract actor stores codes + scales computed from the float32 tokens (flipped twins too)."""
    from pipeline.sources import list_source
    from pipeline.synth import synthesize
    from pipeline.config import ExtractConfig
    from pipeline.worker import ShardEncoder, decode_shard
    synthesize(tmp_path / "src", classes=2, per_class=2)
    items = list_source(str(tmp_path / "src")).items
    row = decode_shard({"shard": 0, "resolution": 256, "items": json.dumps([it.to_dict() for it in items])})
    crops = torch.from_numpy(np.frombuffer(row["images"], np.uint8).reshape(-1, 256, 256, 3).copy())
    got = {}
    for codec in ("float16", "int8"):
        (tmp_path / codec / "shards").mkdir(parents=True)
        actor = ShardEncoder(ExtractConfig(source=str(tmp_path / "src"), out=str(tmp_path / codec), vae="tiny-vae",
                                           encoders=["tiny-dinov2"], batch_size=4, hflip=True, feature_dtype=codec),
                             fingerprint="f")
        actor({k: np.asarray([v], dtype=object) for k, v in row.items()})
        assert actor.fields["tiny-dinov2"]["dtype"] == codec
        got[codec] = list(iter_shard(tmp_path / codec / "shards" / "train-000000.tar"))
    enc = actor.encoders[0]
    ref, ref_flip = enc(crops), enc(crops.flip(2))  # (4, 256, 64) float32 each
    c = get_codec("int8")
    for j, (s16, s8) in enumerate(zip(got["float16"], got["int8"])):
        assert s16["latent.npy"].tobytes() == s8["latent.npy"].tobytes()  # latents do not depend on the codec
        for suf, r in ((".npy", ref[j]), (".flip.npy", ref_flip[j])):
            assert np.array_equal(s16[f"tiny-dinov2{suf}"], r.half().numpy())
            q, sc = encode(r, c)
            assert np.array_equal(s8[f"tiny-dinov2{suf}"], q.numpy())
            assert np.array_equal(s8[f"tiny-dinov2.scale{suf}"], sc.numpy())
