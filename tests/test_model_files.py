"""`NAME=PATH` loading: a saved file of the real architecture (random weights) loads through the product's path."""
from __future__ import annotations

import pytest
import torch

from pipeline.encoders import ENCODERS, load_encoder, load_vae, vae_meta, vae_moments


@pytest.mark.parametrize("name,native_grid", [("dinov2-vit-s", 37), ("siglip-vit-b", 16)])
def test_encoder_name_equals_path_loads_the_file(tmp_path, name, native_grid):
    """The real timm architecture at its native size (DINOv2: 518 px, a 37x37 position table) saved as
    safetensors; `NAME=PATH` must load exactly those weights, with the table resampled to the 16x16 grid."""
    import timm
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed
    spec = ENCODERS[name]
    torch.manual_seed(0)
    native = timm.create_model(spec.arch, pretrained=False, num_classes=0, img_size=spec.native_size)
    sd = {k: v.contiguous() for k, v in native.state_dict().items()}
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, str(path))
    enc = load_encoder(f"{name}={path}", 256)
    assert enc.meta["weights"] == str(path) and enc.grid == (16, 16)
    got = enc.model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        if k == "pos_embed":
            prefix = 0 if native.no_embed_class else native.num_prefix_tokens
            want = resample_abs_pos_embed(v, (16, 16), (native_grid, native_grid), num_prefix_tokens=prefix)
            torch.testing.assert_close(got[k], want)
        else:
            assert torch.equal(got[k], v), k  # the file's weights, not a seeded or hub init
    tokens = enc(torch.randint(0, 256, (1, 256, 256, 3), dtype=torch.uint8))
    assert tokens.shape == (1, 256, native.embed_dim) and torch.isfinite(tokens).all()
    with pytest.raises(Exception, match="not found"):
        load_encoder(f"{name}={tmp_path / 'missing.safetensors'}", 256)


def test_vae_name_equals_path_loads_the_diffusers_folder(tmp_path):
    """SD's VAE architecture (4 levels, 128-512 channels, 2 layers per block) saved with save_pretrained."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        sample_size=256, scaling_factor=0.18215)
    folder = tmp_path / "sd-vae"
    vae.save_pretrained(folder)
    loaded = load_vae(f"sd-vae-ft-ema={folder}")
    want = vae.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items()) and set(want) == \
        set(loaded.state_dict())
    meta = vae_meta(f"sd-vae-ft-ema={folder}")
    assert meta["weights"] == str(folder) and meta["scaling_factor"] == 0.18215
    m = vae_moments(loaded, torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8))
    assert m.shape == (1, 8, 8, 8) and (m[:, 4:] > 0).all()
