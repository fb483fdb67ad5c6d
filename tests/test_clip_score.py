"""CLIP score (text-to-image evaluation): the scorer against the CLIP towers with the preprocessing written out, and
`python -m evaluation --clip-model` on a samples manifest whose shards carry `txt` captions."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from common import UserError, run_cli
from manifests import Manifest, ShardEntry, write_manifest, write_shard

CAPTIONS = ["a red circle at the top left", "a blue square", "a green triangle at the bottom", "an orange star",
            "a gray ring in the centre", "a red square on the left"]
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _images(n: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def scorer():
    from evaluation.clip_score import ClipScorer
    return ClipScorer("tiny-clip")


def test_scores_are_the_towers_cosine_with_the_preprocessing_written_out(scorer):
    """max(100 cos, 0) of image and caption embeddings: PIL bicubic resize to 224, centre crop, OpenAI mean/std;
    captions tokenized to at most 77. (Planted bugs this catches: ImageNet's mean/std instead of OpenAI's; the
    clip at 0 dropped; images and captions paired off by one.)"""
    imgs = _images(4)
    got = scorer(imgs, CAPTIONS[:4])
    m, tok = scorer.model, scorer.processor.tokenizer
    with torch.no_grad():
        x = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.Resampling.BICUBIC)) for im in imgs])
        x = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) \
            / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
        img = m.visual_projection(m.vision_model(pixel_values=x).pooler_output)  # (N, P)
        ids = tok(CAPTIONS[:4], padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = m.text_projection(m.text_model(**ids).pooler_output)  # (N, P)
        cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    want = (100 * cos).clamp(min=0).double().numpy()
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert not np.allclose(got, scorer(imgs, CAPTIONS[1:5]), atol=1e-3)  # the pairing matters


def _samples_set(root, captions: list[str] | None, n: int = 6):
    imgs = _images(n)
    samples = [{"__key__": f"sample_{i:07d}", "png": _png(im), "cls": 0,
                **({"txt": captions[i]} if captions is not None else {})} for i, im in enumerate(imgs)]
    info = write_shard(root / "shards" / "samples-000000.tar", samples)
    m = Manifest(root=root, name="t2i-samples", kind="samples", num_samples=n,
                 shardlist=[ShardEntry(url="shards/samples-000000.tar", nsamples=n, sha256=info.sha256,
                                       bytes=info.bytes)],
                 fields={"png": {"dtype": "uint8", "shape": [64, 64, 3], "codec": "png"},
                         "cls": {"dtype": "int64", "shape": [], "codec": "int"}},
                 classes=[], preprocess={"resolution": 64}, created_by={"version": "test"})
    write_manifest(m)
    return imgs


def _png(im: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="PNG")
    return buf.getvalue()


def test_cli_adds_clip_score_from_the_shards_captions(scorer, tmp_path, capsys):
    from evaluation.__main__ import main
    smp, ref = tmp_path / "smp", tmp_path / "ref"
    imgs = _samples_set(smp, CAPTIONS)
    ref.mkdir()
    for i, im in enumerate(_images(6)[::-1]):
        Image.fromarray(im).save(ref / f"{i}.png")
    out = tmp_path / "report.json"
    argv = ["--samples", str(smp), "--reference", str(ref), "--clip-model", "tiny-clip", "--metrics", "fid",
            "--inception-weights", "random:0", "--no-cache", "--batch-size", "4", "--out", str(out), "--no-progress"]
    assert run_cli(main, argv) == 0
    rep = json.loads(out.read_text())
    assert rep["metrics"]["clip_score"] == pytest.approx(float(scorer(imgs, CAPTIONS).mean()), abs=1e-4)  # batch rounding
    assert rep["clip"]["model"] == "tiny-clip" and rep["comparable"] is False
    assert "CLIP" in capsys.readouterr().out
    bare = tmp_path / "bare"
    _samples_set(bare, None)
    with pytest.raises(UserError, match=r"has no caption \('.txt' member\)"):
        main([*argv[:1], str(bare), *argv[2:]])
    with pytest.raises(UserError, match="unknown CLIP model 'clip-vit-b'"):
        main([*argv[:5], "clip-vit-b", *argv[6:]])
