"""Pipeline units: ADM crop, encoder token paths and grids, sources, bad inputs, CLI errors (writer: own file)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import assert_user_error, run_module
from common import UserError
from pipeline.sources import list_source, select
from manifests.preprocess import adm_center_crop
from pipeline.transforms import BadImage, decode_crop
from pipeline.worker import decode_shard


# ----------------------------------------------------------------------------------------------- ADM crop
def _reference_crop(arr: np.ndarray, res: int) -> np.ndarray:
    """Independent transcription of ADM's center_crop_arr on arrays: sizes computed up front, offsets by hand."""
    h, w = arr.shape[:2]
    sizes = []
    while min(w, h) >= 2 * res:
        w, h = w // 2, h // 2
        sizes.append((w, h))
    s = res / min(w, h)
    final = (int(round(w * s)), int(round(h * s)))
    img = Image.fromarray(arr)
    for size in sizes:
        img = img.resize(size, Image.BOX)
    out = np.asarray(img.resize(final, Image.BICUBIC))
    y0, x0 = (out.shape[0] - res) // 2, (out.shape[1] - res) // 2
    return out[y0:y0 + res, x0:x0 + res]


@pytest.mark.parametrize("w,h", [(513, 1027), (1025, 517), (255, 301), (511, 777), (600, 450), (256, 256),
                                 (1537, 1031), (333, 1999)])
def test_adm_crop_matches_reference_on_odd_sizes(w, h):
    rng = np.random.default_rng(w * 7919 + h)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    got = np.asarray(adm_center_crop(Image.fromarray(arr), 256))
    assert got.shape == (256, 256, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, _reference_crop(arr, 256))


def test_adm_crop_is_centred_and_converts_modes():
    # A bright column exactly in the middle of a wide image must stay in the middle of the crop.
    arr = np.zeros((300, 901, 3), np.uint8)
    arr[:, 448:453] = 255
    crop = np.asarray(adm_center_crop(Image.fromarray(arr), 256))
    cols = np.nonzero(crop[128, :, 0] > 128)[0]
    assert abs(cols.mean() - 127.5) <= 1.5
    for mode in ("L", "CMYK", "P", "RGBA"):
        img = Image.fromarray(arr).convert(mode)
        out = adm_center_crop(img, 256)
        assert out.mode == "RGB" and out.size == (256, 256)
    assert adm_center_crop(Image.fromarray(arr), 512).size == (512, 512)


def _jpeg(w=400, h=300, mode="RGB") -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def test_bad_inputs_give_reasons():
    good = _jpeg()
    crop, size = decode_crop(good, 256)
    assert crop.shape == (256, 256, 3) and size == (400, 300)
    dht = good.index(b"\xff\xc4")  # a Huffman table whose code counts are impossible: a valid header, bad data
    corrupt = good[:dht + 5] + b"\xff" * 16 + good[dht + 21:]
    cases = {b"": "zero-byte file", b"hello, not an image\n": "not an image (unrecognised format)",
             good[: len(good) // 2]: "truncated image (image file is truncated",
             good[:20] + bytes(200) + good[220:240]: "not an image (unrecognised format)",
             corrupt: "corrupt image (broken data stream"}
    for data, why in cases.items():
        with pytest.raises(BadImage) as e:
            decode_crop(data, 256)
        assert str(e.value).startswith(why), (why, str(e.value))


# ----------------------------------------------------------------------------------------------- encoders
def test_tiny_vae_geometry_and_determinism():
    from pipeline.encoders import load_vae, vae_meta, vae_moments
    a, b = load_vae("tiny-vae"), load_vae("tiny-vae")
    x = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    m = vae_moments(a, x)
    assert m.shape == (2, 8, 32, 32) and m.dtype == torch.float32
    assert torch.equal(m, vae_moments(b, x))
    assert (m[:, 4:] > 0).all()  # the second half is a std
    assert vae_meta("tiny-vae")["pretrained"] is False
    with pytest.raises(UserError, match="unknown VAE 'nope'"):
        load_vae("nope")


def test_dinov2_tokens_equal_explicit_518_resample():
    """timm img_size=224 == the 518-px model with its 37x37 pos embed resampled bicubic+antialias to 16x16."""
    import timm
    from pipeline.encoders import ENCODERS, IMAGENET_MEAN, IMAGENET_STD, load_encoder, tiny_state_dict
    spec = ENCODERS["tiny-dinov2"]
    enc = load_encoder("tiny-dinov2", 256)
    sd = tiny_state_dict(spec)  # the same seeded weights at the native 518 px
    m518 = timm.create_model(spec.arch, pretrained=False, num_classes=0, img_size=518, **spec.tiny_kwargs).eval()
    m518.load_state_dict(sd)
    pe = m518.pos_embed.detach()  # (1, 1 + 37*37, D)
    d = pe.shape[-1]
    grid = pe[:, 1:].reshape(1, 37, 37, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    pe16 = torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, d)], dim=1)  # (1, 257, D)

    crops = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    x = crops.permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=False, align_corners=False)
    with torch.no_grad():
        t = m518.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (N, 256, D)
        t = torch.cat([m518.cls_token.expand(2, -1, -1), t], dim=1) + pe16
        for blk in m518.blocks:
            t = blk(t)
        want = m518.norm(t)[:, 1:]  # final-norm patch tokens, (N, 256, D)
        got = enc(crops)
    assert got.shape == (2, 256, 64) and enc.grid == (16, 16) and enc.input_size == 224
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # (N, 3, H, W) uint8 input gives the same tokens as (N, H, W, 3)
    torch.testing.assert_close(enc(crops.permute(0, 3, 1, 2)), got)


@pytest.mark.parametrize("res,grid", [(256, 16), (512, 32)])
def test_encoder_grids(res, grid):
    from pipeline.encoders import load_encoder
    x = torch.randint(0, 256, (1, res, res, 3), dtype=torch.uint8)
    for name, size in (("tiny-siglip", 256 * res // 256), ("tiny-dinov2", 224 * res // 256)):
        enc = load_encoder(name, res)
        tok = enc(x)
        assert enc.grid == (grid, grid) and tok.shape == (1, grid * grid, enc.dim) and enc.input_size == size
        assert enc.meta["pretrained"] is False and enc.meta["grid"] == [grid, grid]
        if name == "tiny-siglip":
            assert enc.meta["mean"] == [0.5, 0.5, 0.5] and enc.meta["std"] == [0.5, 0.5, 0.5]
            assert enc.model.num_prefix_tokens == 0


def test_unknown_encoder_is_user_error():
    from pipeline.encoders import load_encoder
    with pytest.raises(UserError, match="unknown encoder 'dino-xl'"):
        load_encoder("dino-xl")


# ----------------------------------------------------------------------------------------------- sources
def _folder(root: Path, classes=("b_cls", "a_cls"), n=2) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True)
        for j in range(n):
            (root / c / f"{c}_{j}.JPEG").write_bytes(_jpeg(300 + 10 * j, 400))
    return root


def test_imagefolder_labels_follow_sorted_folders(tmp_path):
    lst = list_source(_folder(tmp_path / "src"))
    assert lst.classes == ["a_cls", "b_cls"]
    assert [(it.key, it.label) for it in lst.items] == [("a_cls_0", 0), ("a_cls_1", 0), ("b_cls_0", 1),
                                                        ("b_cls_1", 1)]
    assert [it.key for it in select(lst.items, 2)] == ["a_cls_0", "b_cls_0"]  # spread over classes


def test_webdataset_source_reads_jpg_cls(tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    with tarfile.open(src / "shard-000.tar", "w") as tar:
        for i, (key, cls) in enumerate([("img_b", 3), ("img_a", 1), ("nolabel", None)]):
            for ext, data in (("jpg", _jpeg(320 + i, 300)), ("cls", None if cls is None else str(cls).encode())):
                if data is None:
                    continue
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
        for bad in ("../evil.jpg", "/abs.jpg"):  # path traversal in a tar: rejected, never read
            ti = tarfile.TarInfo(bad)
            ti.size = 3
            tar.addfile(ti, io.BytesIO(b"bad"))
    lst = list_source(src)
    assert lst.kind == "webdataset" and [(it.key, it.label) for it in lst.items] == [("img_b", 3), ("img_a", 1)]
    assert lst.classes == ["0", "1", "2", "3"]
    reasons = {s["source"].split(":", 1)[1]: s["reason"] for s in lst.skipped}
    assert "unsafe" in reasons["../evil.jpg"] and "unsafe" in reasons["/abs.jpg"] and "nolabel" in reasons
    row = decode_shard({"shard": 0, "resolution": 256, "items": json.dumps([it.to_dict() for it in lst.items])})
    assert row["n"] == 2 and len(row["images"]) == 2 * 256 * 256 * 3
    assert json.loads(row["meta"])["samples"][0]["size"] == [320, 300]


def test_duplicate_keys_in_a_source_are_skipped_with_reason(tmp_path):
    """Two inputs with one file stem: the first in sorted order is kept, the other is skipped, naming the first."""
    src = _folder(tmp_path / "src", n=1)
    (src / "b_cls" / "a_cls_0.png").write_bytes(_jpeg(310, 300))  # same stem as a_cls/a_cls_0.JPEG
    lst = list_source(src)
    assert [it.key for it in lst.items] == ["a_cls_0", "b_cls_0"]
    assert lst.skipped == [{"key": "a_cls_0", "source": "b_cls/a_cls_0.png",
                            "reason": "duplicate key (same file stem as a_cls/a_cls_0.JPEG)"}]
    wds = tmp_path / "wds"  # across WebDataset tars too
    wds.mkdir()
    for t in range(2):
        with tarfile.open(wds / f"shard-{t}.tar", "w") as tar:
            for ext, data in (("cls", b"1"), ("jpg", _jpeg(300 + t, 300))):
                ti = tarfile.TarInfo(f"same.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    lst = list_source(wds)
    assert [it.source for it in lst.items] == ["shard-0.tar:same.jpg"]
    assert [(s["source"], s["reason"]) for s in lst.skipped] == [
        ("shard-1.tar:same.jpg", "duplicate key (same file stem as shard-0.tar:same.jpg)")]


def test_truncated_webdataset_tar_is_one_line_error(tmp_path):
    """A source tar cut short (a broken download) stops the job before any work, naming the tar: it is not a bad
    image to skip, as that would silently drop the rest of the tar."""
    src = tmp_path / "wds"
    src.mkdir()
    with tarfile.open(src / "shard-000.tar", "w") as tar:
        for i in range(3):
            for ext, data in (("cls", str(i).encode()), ("jpg", _jpeg(300 + i, 300))):
                ti = tarfile.TarInfo(f"k{i}.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    path = src / "shard-000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # inside k1.jpg
    with pytest.raises(UserError, match="cannot read WebDataset shard .*shard-000.tar: unexpected end of data"):
        list_source(src)
    p = run_module("pipeline", "extract", "--source", str(src), "--out", str(tmp_path / "o"), "--vae", "tiny-vae",
                   "--encoders", "tiny-dinov2")
    assert_user_error(p, "cannot read WebDataset shard", str(path))
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(UserError, match="source not found"):
        list_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is empty"):
        list_source(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("extra,needle", [
    (["--encoders", "tiny-dinov2,nope"], "unknown encoder 'nope'"),
    (["--vae", "nope"], "unknown VAE 'nope'"),
    (["--shard-size", "0"], "--shard-size"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--limit", "-1"], "--limit"),
    (["--resolution", "300"], "--resolution"),
])
def test_extract_bad_arguments(tmp_path, extra, needle):
    src = _folder(tmp_path / "src", n=1)
    p = run_module("pipeline", "extract", "--source", str(src), "--out", str(tmp_path / "o"), "--vae", "tiny-vae",
                   "--encoders", "tiny-dinov2", *extra)
    assert_user_error(p, needle)


def test_extract_bad_paths(tmp_path):
    src = _folder(tmp_path / "src", n=1)
    (tmp_path / "empty").mkdir()
    base = ["pipeline", "extract", "--vae", "tiny-vae", "--encoders", "tiny-dinov2"]
    assert_user_error(run_module(*base, "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o")),
                      "source not found", str(tmp_path / "missing"))
    assert_user_error(run_module(*base, "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "o")),
                      "empty")
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the output folder should be: not writable as a folder
    assert_user_error(run_module(*base, "--source", str(src), "--out", str(blocker / "out")), str(blocker))
    p = run_module("pipeline", "synth", "--out", str(tmp_path / "s"), "--classes", "0")
    assert_user_error(p, "--classes")
