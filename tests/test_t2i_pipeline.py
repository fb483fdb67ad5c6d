"""Text-to-image data through the pipeline (issue 24, section 1): MS-COCO layout and caption tars -> VAE moments,
patch tokens and CLIP text contexts (U-ViT's FrozenCLIPEmbedder numbers), the empty context, bad inputs skipped.

Extractions run in this process (the job's own listing, planning, decode task, encoder actor, exactly-once writer
and manifest assembly; only Ray's scheduling is replaced), so no test starts a Ray cluster.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from common import UserError
from manifests import iter_shard, load_manifest, storage
from manifests.codecs import decode_sample, field_codec
from manifests.schema import empty_context

GOOD = {3: ["a red square on the left", "Red square, left side."], 7: ["a blue circle"],
        15: ["a green triangle at the top", "green triangle", "a picture of a green triangle " + "very " * 90],
        42: ["an orange star"], 1000: ["a gray ring in the centre"]}
TINY = dict(vae="tiny-vae", encoders=["tiny-dinov2"], text_encoder="tiny-clip-text", shard_size=2, batch_size=2)


def _jpeg(seed: int, w: int, h: int) -> bytes:
    """A non-square picture whose left and right differ, so the crop rule shows in the pixels."""
    rng = np.random.default_rng(seed)
    arr = (np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.3, 1, 3) + rng.integers(0, 40, (h, w, 3)))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_coco(root: Path) -> tuple[Path, Path]:
    """MS-COCO's layout: train2014/COCO_train2014_<id>.jpg + annotations/captions_train2014.json, with bad inputs:
    an image without captions (99), a caption that is not text (7's second, and 20's only one), a caption for an
    id the file does not list (12345), an id with no image file (55), a corrupt JPEG (30)."""
    images, anns = root / "train2014", root / "annotations"
    images.mkdir(parents=True)
    anns.mkdir()
    name = "COCO_train2014_{:012d}.jpg".format
    for i, iid in enumerate(sorted(GOOD)):
        (images / name(iid)).write_bytes(_jpeg(iid, 300 + 40 * i, 220))
    for iid in (99, 20):
        (images / name(iid)).write_bytes(_jpeg(iid, 200, 260))
    (images / name(30)).write_bytes(b"not a jpeg at all")
    listed = [*GOOD, 99, 20, 55, 30]
    coco = {"images": [{"id": i, "file_name": name(i), "width": 0, "height": 0} for i in listed[::-1]],
            "annotations": []}
    for iid, caps in GOOD.items():
        coco["annotations"] += [{"image_id": iid, "caption": c} for c in caps]
    coco["annotations"] += [{"image_id": 7, "caption": 5}, {"image_id": 20, "caption": ["a", "list"]},
                            {"image_id": 12345, "caption": "a ghost"}, {"image_id": 55, "caption": "a lost one"},
                            {"image_id": 30, "caption": "a broken one"}]
    for k, a in enumerate(coco["annotations"]):
        a["id"] = 900 + k
    (anns / "captions_train2014.json").write_text(json.dumps(coco))
    return images, anns / "captions_train2014.json"


def extract_inprocess(**kw) -> Path:
    """`pipeline extract` with the job's own code, the Ray part run inline (as tests/benchmarks/codec_curves.py)."""
    import pipeline.job as job
    from pipeline.config import ExtractConfig
    from pipeline.worker import ShardEncoder, decode_shard

    def inline(cfg, out, fp, pending, total):
        enc = ShardEncoder(cfg, fingerprint=fp, out=str(out))
        for p in pending:
            row = decode_shard({"shard": p.index, "resolution": cfg.resolution, "crop": cfg.crop_name,
                                "items": json.dumps([it.to_dict() for it in p.items])})
            enc({k: np.asarray([v], dtype=object) for k, v in row.items()})
    with mock.patch.object(job, "_run_ray", inline):
        return job.run_extract(ExtractConfig(**kw))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    images, captions = write_coco(root)
    out = root / "feat"
    extract_inprocess(source=str(images), captions=str(captions), out=str(out), **TINY)
    return images, captions, out


@pytest.fixture(scope="module")
def tiny_text():
    from pipeline.encoders import load_text_encoder
    return load_text_encoder("tiny-clip-text")


def _samples(out) -> dict[str, dict]:
    m = load_manifest(out)
    return {s["__key__"]: s for url in m.shard_paths() for s in iter_shard(url)}


def test_coco_extract_keeps_every_caption_in_id_order_with_contexts_and_the_empty_one(coco, tiny_text):
    images, captions, out = coco
    m = load_manifest(out, verify=True)
    assert m.preprocess["crop"] == "uvit-center" and m.preprocess["source"] == "coco" and m.classes == []
    ctx = m.field("context", shape=[None, 77, 64], dtype="int8")
    assert ctx["codec"] == "text-context" and ctx["text_encoder"]["name"] == "tiny-clip-text"
    tok = ctx["tokenizer"]
    assert (tok["padding"], tok["max_length"], tok["pad_token"]) == ("max_length", 77, "<|endoftext|>")
    assert tok["pad_token_id"] == tok["eos_token_id"] == tok["vocab_size"] - 1 != 0  # CLIP's rule, not open_clip's 0
    samples = _samples(out)
    assert list(samples) == [f"{i:012d}" for i in sorted(GOOD)]  # COCO ids, sorted; one sample per image
    codec = field_codec("context", ctx)
    for key, s in samples.items():
        caps = GOOD[int(key)]
        assert s["json"]["captions"] == caps  # every caption, in the file's order (7's int caption dropped)
        got = decode_sample(s, "context", codec, where=key)  # (K, 77, 64)
        want = tiny_text(caps).numpy()
        scale = s["context.scale.npy"].astype(np.float32)[..., None]
        # int8 with a per-token scale: each value within half a step of the model's (+ fp32 batch-order noise)
        assert got.shape == want.shape and np.all(np.abs(got - want) <= 0.5 * scale + 1e-5), key
    empty = empty_context(m)
    assert empty.dtype == np.float32 and np.array_equal(empty, tiny_text([""])[0].numpy())
    assert storage.path(out / ctx["empty"]["file"]).is_file()


def test_coco_bad_inputs_are_skipped_with_reasons(coco):
    m = load_manifest(coco[2])
    reasons = {(s["key"], s["reason"].split(" (")[0]) for s in m.skipped}
    assert ("000000000099", "no captions in captions_train2014.json") in reasons
    assert ("000000000007", "caption is not text") in reasons
    assert ("000000000020", "caption is not text") in reasons and \
           ("000000000020", "no captions in captions_train2014.json") in reasons
    assert ("000000012345", "caption for image id 12345, which captions_train2014.json does not list") in reasons
    assert any(k == "000000000055" and r.startswith("image id 55 has no image file") for k, r in reasons)
    assert ("000000000030", "not an image") in reasons
    assert m.num_samples == len(GOOD)


def test_uvit_crop_reaches_the_latents(coco):
    """The stored VAE moments are those of U-ViT's crop (centre square, LANCZOS), not ADM's."""
    from manifests.preprocess import adm_center_crop, uvit_center_crop
    from pipeline.encoders import load_vae, vae_moments
    images, _, out = coco
    s = _samples(out)["000000001000"]
    vae = load_vae("tiny-vae")
    with Image.open(images / s["json"]["source"]) as im:
        crops = {f.__name__: np.asarray(f(im, 256)) for f in (uvit_center_crop, adm_center_crop)}
    lat = {k: vae_moments(vae, torch.from_numpy(v[None].copy()))[0].numpy() for k, v in crops.items()}
    assert np.allclose(s["latent.npy"], lat["uvit_center_crop"], atol=1e-5)
    assert not np.allclose(s["latent.npy"], lat["adm_center_crop"], atol=1e-3)


def test_context_matches_transformers_clip_folder(tmp_path):
    """`clip-vit-l-text=PATH` reads a Hugging Face CLIP folder (openai/clip-vit-large-patch14's layout: the whole
    CLIPModel plus its tokenizer files) as is, and gives CLIPTextModel's last_hidden_state on ids padded with
    <|endoftext|> to 77, as U-ViT's FrozenCLIPEmbedder does: checked against ids built by hand here."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from pipeline.encoders import load_text_encoder
    from pipeline.text import tiny_tokenizer_files
    (tmp_path / "tok").mkdir()
    tiny_tokenizer_files(tmp_path / "tok")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tok", model_max_length=77)
    text = dict(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    folder = tmp_path / "clip-vit-large-patch14"
    clip.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    enc = load_text_encoder(f"clip-vit-l-text={folder}")
    caps = ["a red circle at the top left", "", "Zebra!! " * 60]  # the last one is truncated to 77
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = []
    for c in caps:
        body = tokenizer(c, add_special_tokens=False)["input_ids"][:75]
        ids.append([bos, *body, eos] + [eos] * (75 - len(body)))  # end-of-text padding, not zeros
    ids = torch.tensor(ids)  # (3, 77)
    assert torch.equal(enc.tokenize(caps), ids)
    with torch.no_grad():
        want = clip.text_model(input_ids=ids).last_hidden_state  # (3, 77, 48)
        zero_pad = clip.text_model(input_ids=torch.where(torch.arange(77) > 8, 0, ids[:1])).last_hidden_state
    got = enc(caps)
    assert got.shape == (3, 77, 48) and torch.allclose(got, want, atol=1e-5)
    # pad positions carry numbers (no mask hides them), so open_clip's zero padding gives other contexts
    assert not torch.allclose(zero_pad[0, 9:], want[0, 9:], atol=1e-3)
    assert np.array_equal(enc.empty(), want[1].numpy())
    assert enc.meta["text_encoder"]["weights"] == str(folder)


def test_tiny_clip_text_is_offline_and_seeded(tiny_text):
    from pipeline.encoders import load_text_encoder
    again = load_text_encoder("TINY-clip-text")
    for a, b in zip(tiny_text.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    ids = tiny_text.tokenize(["a red circle at the top left"])[0]
    eos = tiny_text.tokenizer.eos_token_id
    assert int((ids != eos).sum()) == 8  # <|startoftext|> + one token per demo word
    with pytest.raises(UserError, match="unknown text encoder 'clip-vit-b-text'"):
        load_text_encoder("clip-vit-b-text")
    with pytest.raises(UserError, match="text encoder folder not found"):
        load_text_encoder("clip-vit-l-text=/no/such/folder")


def test_int8_context_fidelity(tiny_text):
    """Measured: int8 contexts (one float16 scale per token) keep every token's direction (cosine > 0.9999) and
    0.7% relative error on the tiny encoder's demo captions; float16 ~0.02%."""
    from manifests.codecs import decode, encode, get_codec
    from pipeline.synth import captions_for
    caps = [c for k in range(10) for c in captions_for(k, 10, gray=False)]
    x = tiny_text(caps)  # (30, 77, 64)
    for codec, max_rel in (("int8", 0.01), ("float16", 0.001)):
        q, s = encode(x, get_codec(codec))
        y = decode(q, s, get_codec(codec))
        rel = float((y - x).norm() / x.norm())
        cos = float(torch.nn.functional.cosine_similarity(x, y, dim=-1).min())
        assert rel < max_rel and cos > 0.9999, (codec, rel, cos)


def test_bad_annotation_file_is_one_line(tmp_path, coco):
    from helpers import assert_user_error, run_module
    images = coco[0]
    for text, needle in (("{not json", "is not valid JSON"), (json.dumps([1, 2]), "is not COCO JSON"),
                         (json.dumps({"images": [{"file_name": "x.jpg"}], "annotations": []}), "images[0]"),
                         (json.dumps({"images": [], "annotations": [{"caption": "x"}]}), "annotations[0]")):
        bad = tmp_path / "captions.json"
        bad.write_text(text)
        with pytest.raises(UserError, match=needle.replace("[", r"\[")) as e:
            extract_inprocess(source=str(images), captions=str(bad), out=str(tmp_path / "o"), **TINY)
        assert "\n" not in str(e.value)
    p = run_module("pipeline", "extract", "--source", str(images), "--captions", str(bad), "--out",
                   str(tmp_path / "o"), "--text-encoder", "tiny-clip-text", "--vae", "tiny-vae")
    assert_user_error(p, "is not COCO JSON")
    p = run_module("pipeline", "extract", "--source", str(images), "--captions", str(bad), "--out",
                   str(tmp_path / "o"))
    assert_user_error(p, "--captions needs --text-encoder")


def test_caption_tars(tmp_path, tiny_text):
    """WebDataset tars of jpg + txt / json captions; a sample with no caption or a non-text one is skipped."""
    from pipeline.coco import list_captioned
    members = {"a.jpg": _jpeg(1, 300, 200), "a.txt": b"a red circle\n",
               "b.jpg": _jpeg(2, 200, 300), "b.json": json.dumps({"captions": ["one", "two"]}).encode(),
               "c.jpg": _jpeg(3, 200, 200), "c.json": json.dumps({"caption": 7}).encode(),
               "d.jpg": _jpeg(4, 200, 200), "e.txt": b"no image"}
    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "part-000.tar", "w") as tar:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    listing = list_captioned(str(tmp_path / "wds"), None)
    assert [(it.key, it.captions) for it in listing.items] == [("a", ("a red circle",)), ("b", ("one", "two"))]
    assert {s["key"]: s["reason"].split(" (")[0] for s in listing.skipped} == {
        "c": "caption is not text", "d": "no captions", "e": "no image member"}
    out = extract_inprocess(source=str(tmp_path / "wds"), out=str(tmp_path / "feat"), **TINY)
    m = load_manifest(out)
    assert m.preprocess["crop"] == "uvit-center" and m.num_samples == 2
    s = _samples(tmp_path / "feat")["b"]
    assert s["context.npy"].shape == (2, 77, 64) and s["json"]["captions"] == ["one", "two"]


def test_schema_checks_the_context_field(coco, tmp_path):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(coco[2], out)
    path = out / "manifest.json"
    raw = json.loads(path.read_text())
    data = (out / "context_empty.npy").read_bytes()
    (out / "context_empty.npy").write_bytes(data[:-4] + b"\0\0\0\0")  # same size, other numbers
    with pytest.raises(UserError, match="empty-caption context .* fails its sha256"):
        load_manifest(out, verify=True)
    del raw["repa"]["fields"]["context"]["empty"]
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match="needs 'empty'"):
        load_manifest(out)


def test_synth_writes_coco_captions(synth_dir):
    from pipeline.coco import list_coco
    listing = list_coco(str(synth_dir), str(synth_dir / "captions.json"))
    assert len(listing.items) == 24 and not listing.skipped  # 4 classes x 6, ids 1.. in file order
    first = listing.items[0]  # class 0, image 0: grayscale (every 9th), a circle in the centre
    assert first.source == "n00000000/n00000000_0.JPEG" and first.captions[0] == "a gray circle in the centre"
    assert listing.items[1].captions[0] == "a red circle in the centre"
    assert listing.items[6].captions[0] == "a violet square at the top left"  # class 1 of 4: hue 270


@pytest.mark.slow
def test_coco_extract_on_object_storage_is_byte_identical(coco, s3_bucket):
    """The same COCO layout in a bucket (images, annotations and output all s3://): the very shard bytes and
    empty context of the local run."""
    images, captions, local = coco
    for p in sorted(images.iterdir()):
        storage.path(f"{s3_bucket}/coco/train2014/{p.name}").write_bytes(p.read_bytes())
    storage.path(f"{s3_bucket}/coco/annotations/{captions.name}").write_bytes(captions.read_bytes())
    out = f"{s3_bucket}/feat"
    extract_inprocess(source=f"{s3_bucket}/coco/train2014", captions=f"{s3_bucket}/coco/annotations/{captions.name}",
                      out=out, **TINY)
    m = load_manifest(out, verify=True)
    assert m.num_samples == len(GOOD) and m.preprocess["crop"] == "uvit-center"
    for url in (e.url for e in m.shardlist):
        assert storage.path(f"{out}/{url}").read_bytes() == (local / url).read_bytes(), url
    assert storage.path(f"{out}/context_empty.npy").read_bytes() == (local / "context_empty.npy").read_bytes()
    assert len(m.skipped) == len(load_manifest(local).skipped)
