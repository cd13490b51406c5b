"""Building a latent restorer from a local Stable Diffusion folder (a fabricated tiny one with the real layout)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from facereward.models.restorer import ModelFolderError, Restorer


@pytest.fixture
def tiny_sd(tmp_path, make_clip_tokenizer):
    folder = tmp_path / "sd"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "face</w>": 3}
    make_clip_tokenizer(vocab, model_max_length=6).save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=6, bos_token_id=0, eos_token_id=1, pad_token_id=1)).save_pretrained(folder / "text_encoder")
    AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  latent_channels=4, norm_num_groups=8, layers_per_block=1).save_pretrained(folder / "vae")
    UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                         cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8).save_pretrained(folder / "unet")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(folder / "scheduler")
    return folder


def test_from_stable_diffusion_builds_a_working_latent_restorer(tiny_sd, tmp_path):
    restorer = Restorer.from_stable_diffusion(tiny_sd, size=32)
    assert restorer.mode == "latent"
    assert restorer.prompt_embeds.shape == (1, 6, 16)
    # DiffBIR's initialisation: the UNet's first conv with 4 zero channels appended for the condition latent
    w = restorer.controlnet.conv_in.weight
    assert w.shape[1] == 8 and torch.equal(w[:, :4], restorer.unet.conv_in.weight) and not w[:, 4:].any()
    assert not any("cond_embedding" in n for n, _ in restorer.controlnet.named_parameters())
    assert all(not p.any() for n, p in restorer.controlnet.named_parameters() if n.startswith("controlnet_"))
    # the ControlNet starts as a copy of the UNet encoder with zero-initialised outputs: eps equals the bare UNet's
    z = torch.randn(1, 4, 16, 16)
    t = torch.tensor([500])
    with torch.no_grad():
        bare = restorer.unet(z, t, encoder_hidden_states=restorer.prompt_embeds).sample
        eps = restorer.predict_eps(z, t, torch.randn(1, 4, 16, 16))
    assert torch.allclose(eps, bare, atol=1e-6)
    out = restorer.restore(torch.rand(1, 3, 32, 32), steps=3, generator=torch.Generator().manual_seed(0))
    assert out["restored"].shape == (1, 3, 32, 32)
    restorer.save_pretrained(tmp_path / "saved")
    again = Restorer.from_pretrained(tmp_path / "saved")
    assert torch.equal(again.prompt_embeds, restorer.prompt_embeds)


def test_from_stable_diffusion_names_missing_parts(tiny_sd, tmp_path):
    import shutil

    shutil.rmtree(tiny_sd / "text_encoder")
    with pytest.raises(ModelFolderError, match="missing text_encoder"):
        Restorer.from_stable_diffusion(tiny_sd)
    with pytest.raises(ModelFolderError, match="no such Stable Diffusion folder"):
        Restorer.from_stable_diffusion(tmp_path / "nothing")


def test_build_restorer_command_from_sd(tiny_sd, tmp_path):
    from typer.testing import CliRunner

    from facereward.cli import app

    result = CliRunner().invoke(app, ["build-restorer", str(tmp_path / "r"), "--from-sd", str(tiny_sd), "--size", "32",
                                      "--set", "cleaner_kwargs={channels: 8, num_blocks: 1}"])
    assert result.exit_code == 0, result.output
    assert Restorer.from_pretrained(tmp_path / "r").mode == "latent"
