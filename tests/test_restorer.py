"""The DiffBIR-shaped restorer (docs/methods.md 0): build, restore, save/load, gradients, the cleaner."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from facereward.models import cleaner as cleaner_mod
from facereward.models.cleaner import ResidualCleaner, build_cleaner, register_cleaner
from facereward.models.restorer import ModelFolderError, Restorer, RestorerConfig


def _lq(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _restore(r: Restorer, lq: torch.Tensor, seed: int = 5, steps: int = 4, eta=1.0) -> dict[str, torch.Tensor]:
    return r.restore(lq, steps=steps, eta=eta, generator=torch.Generator().manual_seed(seed))


def _assert_state_dicts_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


# ---- build / restore ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pixel", "latent"])
def test_build_and_restore_shapes_and_range(mode, pixel_restorer, latent_restorer):
    r = pixel_restorer if mode == "pixel" else latent_restorer
    assert r.mode == mode and not r.training
    lq = _lq()
    out = _restore(r, lq)
    assert set(out) == {"clean", "restored"}
    for key in ("clean", "restored"):
        x = out[key]
        assert x.shape == lq.shape and x.dtype == torch.float32, key
        assert torch.isfinite(x).all(), key
        assert x.min() >= 0 and x.max() <= 1, key
    assert out["restored"].std() > 0  # not a constant (e.g. everything clamped away)
    expected_latent = (2, 3, 32, 32) if mode == "pixel" else (2, 4, 16, 16)
    assert r.latent_shape(2, 32, 32) == expected_latent
    assert r.stage2_trainable() is (r.unet if mode == "pixel" else r.controlnet)


def test_build_rejects_bad_size_and_mode(pixel_config):
    pixel_config.size = 30
    with pytest.raises(ValueError, match="multiple of 8"):
        Restorer.build(pixel_config)
    with pytest.raises(ValueError, match="mode"):
        Restorer.build(RestorerConfig(mode="other", size=32))  # type: ignore[arg-type]


# ---- save / load -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pixel", "latent"])
def test_save_load_round_trip_is_exact(mode, pixel_restorer, latent_restorer, tmp_path):
    r = pixel_restorer if mode == "pixel" else latent_restorer
    # make the cleaner non-trivial so its weights matter
    with torch.no_grad():
        r.cleaner.tail.weight.normal_(0, 0.01)
    folder = tmp_path / "restorer"
    r.save_pretrained(folder)
    expected = {"facereward.json", "cleaner", "scheduler", "unet"}
    if mode == "latent":
        expected |= {"vae", "controlnet", "prompt_embeds.safetensors"}
    assert {p.name for p in folder.iterdir()} == expected
    assert not (tmp_path / "restorer.tmp-save").exists()

    loaded = Restorer.from_pretrained(folder)
    assert not loaded.training
    assert loaded.config == r.config
    _assert_state_dicts_equal(r, loaded)
    if mode == "latent":
        assert torch.equal(loaded.prompt_embeds, r.prompt_embeds)  # a non-persistent buffer: saved on its own
        assert not any(p.requires_grad for p in loaded.vae.parameters())
        assert not any(p.requires_grad for p in loaded.unet.parameters())
    assert loaded.scheduler.config.num_train_timesteps == r.scheduler.config.num_train_timesteps
    assert torch.equal(loaded.scheduler.alphas_cumprod, r.scheduler.alphas_cumprod)

    lq = _lq(seed=3)
    a, b = _restore(r, lq, seed=9), _restore(loaded, lq, seed=9)
    assert torch.equal(a["clean"], b["clean"])
    assert torch.equal(a["restored"], b["restored"])

    # saving again over an existing folder replaces it cleanly
    loaded.save_pretrained(folder)
    assert not (tmp_path / "restorer.tmp-old").exists()
    _assert_state_dicts_equal(r, Restorer.from_pretrained(folder))


@pytest.mark.parametrize("mode", ["pixel", "latent"])
def test_from_pretrained_with_torch_dtype_restores(mode, pixel_restorer, latent_restorer, tmp_path):
    r = pixel_restorer if mode == "pixel" else latent_restorer
    r.save_pretrained(tmp_path / "r")
    loaded = Restorer.from_pretrained(tmp_path / "r", torch_dtype=torch.bfloat16)
    assert loaded.unet.dtype == torch.bfloat16
    lq = _lq(batch=1)
    out = _restore(loaded, lq, steps=2)
    ref = _restore(r, lq, steps=2)
    for key in ("clean", "restored"):
        assert out[key].dtype == torch.float32 and out[key].shape == lq.shape
        assert torch.isfinite(out[key]).all() and out[key].min() >= 0 and out[key].max() <= 1
    assert (out["restored"] - ref["restored"]).abs().mean() < 0.1  # same model, lower precision


def test_restore_from_given_x_T(pixel_restorer):
    r = pixel_restorer
    lq = _lq(batch=2)
    x_T = torch.randn(r.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(1))
    # eta = 0: the output depends on x_T only, not on the generator
    a = r.restore(lq, steps=3, eta=0.0, generator=torch.Generator().manual_seed(2), x_T=x_T)["restored"]
    b = r.restore(lq, steps=3, eta=0.0, generator=torch.Generator().manual_seed(3), x_T=x_T)["restored"]
    assert torch.equal(a, b)
    # drawing x_T from the generator is the same as passing that draw
    c = r.restore(lq, steps=3, eta=1.0, generator=torch.Generator().manual_seed(1))["restored"]
    g = torch.Generator().manual_seed(1)
    drawn = torch.randn(r.latent_shape(2, 32, 32), generator=g)
    d = r.restore(lq, steps=3, eta=1.0, generator=g, x_T=drawn)["restored"]
    assert torch.equal(c, d)


def _assert_one_line_error(err: pytest.ExceptionInfo, folder, *words: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    assert str(folder) in msg
    for w in words:
        assert w in msg, (w, msg)


def test_from_pretrained_missing_folder(tmp_path):
    folder = tmp_path / "nope"
    with pytest.raises(ModelFolderError) as err:
        Restorer.from_pretrained(folder)
    _assert_one_line_error(err, folder, "no such model folder")
    assert isinstance(err.value, ValueError)


def test_from_pretrained_without_metadata(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "unet").mkdir()
    with pytest.raises(ModelFolderError) as err:
        Restorer.from_pretrained(folder)
    _assert_one_line_error(err, folder, "facereward.json")


def test_from_pretrained_bad_metadata(tmp_path, pixel_restorer):
    folder = tmp_path / "r"
    pixel_restorer.save_pretrained(folder)
    (folder / "facereward.json").write_text("{not json")
    with pytest.raises(ModelFolderError) as err:
        Restorer.from_pretrained(folder)
    _assert_one_line_error(err, folder, "unreadable restorer config")

    meta = {"format_version": 999, "config": {"mode": "pixel", "size": 32}}
    (folder / "facereward.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFolderError) as err:
        Restorer.from_pretrained(folder)
    _assert_one_line_error(err, folder, "format version 999")


def test_from_pretrained_missing_controlnet(tmp_path, latent_restorer):
    folder = tmp_path / "latent"
    latent_restorer.save_pretrained(folder)
    shutil.rmtree(folder / "controlnet")
    with pytest.raises(ModelFolderError) as err:
        Restorer.from_pretrained(folder)
    _assert_one_line_error(err, folder, "missing", "controlnet")
    assert "vae" not in str(err.value)  # names only what is missing


@pytest.mark.parametrize("target", ["cleaner/model.safetensors", "unet/diffusion_pytorch_model.safetensors", "prompt_embeds.safetensors"])
def test_from_pretrained_corrupt_weights(tmp_path, latent_restorer, target):
    folder = tmp_path / "r"
    latent_restorer.save_pretrained(folder)
    assert (folder / target).is_file()
    (folder / target).write_bytes(b"garbage")
    with pytest.raises(ModelFolderError) as err:
        Restorer.from_pretrained(folder)
    _assert_one_line_error(err, folder, "could not load")


# ---- gradients ---------------------------------------------------------------------------


def test_latent_gradients_reach_controlnet_only(latent_restorer):
    r = latent_restorer
    assert not any(p.requires_grad for p in r.vae.parameters())
    assert not any(p.requires_grad for p in r.unet.parameters())
    assert all(p.requires_grad for p in r.controlnet.parameters())
    lq = _lq(batch=2)
    with torch.no_grad():
        cond = r.condition(r.clean(lq))
    assert cond.shape == (2, 4, 16, 16)
    x_t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([981, 21])
    eps, residuals = r.predict_eps(x_t, t, cond, return_residuals=True)
    assert eps.shape == x_t.shape
    assert len(residuals) == len(r.controlnet.controlnet_down_blocks) + 1
    assert all(h.requires_grad for h in residuals)

    (eps.square().mean() + sum(h.square().mean() for h in residuals)).backward()
    cn_grads = [p.grad for p in r.controlnet.parameters() if p.grad is not None]
    assert cn_grads and any(g.abs().sum() > 0 for g in cn_grads)
    assert all(torch.isfinite(g).all() for g in cn_grads)
    assert all(p.grad is None for p in r.vae.parameters())
    assert all(p.grad is None for p in r.unet.parameters())
    assert all(p.grad is None for p in r.cleaner.parameters())

    # without residuals: the plain eps, identical to the one above
    with torch.no_grad():
        assert torch.equal(r.predict_eps(x_t, t, cond), eps.detach())


def test_pixel_residuals_are_eps_and_grads_reach_unet(pixel_restorer):
    r = pixel_restorer
    lq = _lq(batch=1)
    cond = r.condition(r.clean(lq)).detach()
    x_t = torch.randn(1, 3, 32, 32)
    eps, residuals = r.predict_eps(x_t, torch.tensor([501]), cond, return_residuals=True)
    assert len(residuals) == 1 and residuals[0] is eps
    eps.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in r.unet.parameters())


# ---- spaces ------------------------------------------------------------------------------


def test_pixel_encode_decode_round_trip(pixel_restorer):
    r = pixel_restorer
    x = _lq(seed=4)
    z = r.encode(x)
    assert torch.equal(z, x * 2 - 1)
    assert torch.equal(r.decode(z), (z + 1) / 2)
    torch.testing.assert_close(r.decode(z), x, rtol=0, atol=1e-7)
    # 8-bit images (k / 256, exactly representable) come back bit for bit
    x8 = torch.randint(0, 257, (2, 3, 8, 8)).float() / 256
    assert torch.equal(r.decode(r.encode(x8)), x8)
    # decode does not clamp (so gradients pass everywhere)
    assert torch.equal(r.decode(torch.full((1, 3, 2, 2), 3.0)), torch.full((1, 3, 2, 2), 2.0))


def test_latent_encode_decode_shapes(latent_restorer):
    r = latent_restorer
    x = _lq(batch=1)
    with torch.no_grad():
        z = r.encode(x)
        assert z.shape == (1, 4, 16, 16)
        # encode uses the latent mean (deterministic) and the VAE scaling factor
        again = r.vae.encode(x * 2 - 1).latent_dist.mean * r.vae.config.scaling_factor
        assert torch.equal(z, again)
        assert r.decode(z).shape == x.shape


# ---- the cleaner -------------------------------------------------------------------------


def test_cleaner_starts_as_identity(pixel_restorer, latent_restorer):
    lq = _lq(seed=6)
    lq[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    for r in (pixel_restorer, latent_restorer):
        assert isinstance(r.cleaner, ResidualCleaner)
        with torch.no_grad():
            assert torch.equal(r.cleaner(lq), lq)
            assert torch.equal(r.clean(lq), lq)
    fresh = ResidualCleaner(channels=4, num_blocks=1, downscale=1)
    assert torch.equal(fresh(lq), lq)
    # once the tail is trained it is no longer the identity, and stays in [0, 1]
    with torch.no_grad():
        fresh.tail.bias.fill_(0.5)
        out = fresh(lq)
    assert not torch.equal(out, lq) and out.min() >= 0 and out.max() <= 1


class _ScaleCleaner(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        return (lq * self.scale).clamp(0, 1)


def test_register_cleaner_saves_and_loads_by_name(monkeypatch, tmp_path, pixel_config):
    register_cleaner("test_scale", _ScaleCleaner)
    request_cleanup = lambda: cleaner_mod._CLEANERS.unregister("test_scale")  # noqa: E731
    pixel_config.cleaner = "test_scale"
    pixel_config.cleaner_kwargs = {"scale": 0.5}
    r = Restorer.build(pixel_config)
    assert isinstance(r.cleaner, _ScaleCleaner) and r.cleaner.scale.item() == 0.5
    with torch.no_grad():
        r.cleaner.scale.fill_(0.25)  # a trained value, differs from the builder's
    r.save_pretrained(tmp_path / "custom")
    meta = json.loads((tmp_path / "custom" / "facereward.json").read_text())
    assert meta["config"]["cleaner"] == "test_scale"

    loaded = Restorer.from_pretrained(tmp_path / "custom")
    assert isinstance(loaded.cleaner, _ScaleCleaner)
    assert loaded.cleaner.scale.item() == 0.25
    lq = _lq(batch=1)
    assert torch.equal(loaded.clean(lq), (lq * 0.25).clamp(0, 1))

    # without the registration the folder cannot be loaded (and says why)
    request_cleanup()
    with pytest.raises(ValueError, match="test_scale"):
        Restorer.from_pretrained(tmp_path / "custom")


def test_unknown_cleaner_name_raises(pixel_config):
    with pytest.raises(ValueError, match="unknown cleaner 'nope'"):
        build_cleaner("nope", {})
    pixel_config.cleaner = "nope"
    with pytest.raises(ValueError, match="register_cleaner"):
        Restorer.build(pixel_config)


def test_cleaner_rejects_bad_downscale():
    with pytest.raises(ValueError, match="downscale"):
        ResidualCleaner(channels=4, num_blocks=1, downscale=3)


def test_colour_fix_matches_diffbirs_wavelet_reconstruction():
    import diffbir_reference as R

    from facereward.models.colour_fix import wavelet_colour_fix

    g = torch.Generator().manual_seed(0)
    content, style = torch.rand(2, 3, 40, 48, generator=g), torch.rand(2, 3, 40, 48, generator=g)
    torch.testing.assert_close(wavelet_colour_fix(content, style), R.reference_wavelet_reconstruction(content, style),
                               rtol=0, atol=1e-6)
    # a uniformly shifted colour is moved back exactly onto the reference's: the shift is all low band
    assert torch.allclose(wavelet_colour_fix(style + 0.3, style), style, atol=1e-5)


def test_format_1_latent_folders_say_how_to_rebuild(tmp_path):
    import json

    from facereward.models.restorer import LatentConfig

    r = Restorer.build(RestorerConfig(mode="latent", size=16, latent=LatentConfig(vae_block_out_channels=[16, 16],
                       unet_block_out_channels=[16, 16], cross_attention_dim=8, attention_head_dim=4, norm_num_groups=8)))
    r.save_pretrained(tmp_path / "m")
    meta_path = tmp_path / "m" / "facereward.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 1
    meta["config"]["latent"]["condition_embedding_channels"] = 32
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelFolderError, match="rebuild it with `facereward build-restorer`") as info:
        Restorer.from_pretrained(tmp_path / "m")
    assert "\n" not in str(info.value)
