"""Self-checks of tests/diffbir_reference.py: key counts, file layouts, shapes, control injection, sampler spacing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import diffbir_reference as R

# (channels, side) of the 13 ControlNet residuals for an 8x8 latent at TINY: input blocks 0..11, then the middle
RESIDUAL_SHAPES = [(32, 8)] * 3 + [(32, 4)] + [(64, 4)] * 2 + [(64, 2)] + [(128, 2)] * 2 + [(128, 1)] * 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("diffbir")
    paths = {
        "ckpt": d / "v2-1_512-ema-pruned.ckpt",
        "st": d / "v2-1_512-ema-pruned.safetensors",
        "cn": d / "v1_face.pth",
    }
    sd = R.fabricate_sd21(paths["ckpt"], seed=0, fmt="ckpt")
    R.fabricate_sd21(paths["st"], seed=0, fmt="safetensors")
    cn = R.fabricate_v1_face(paths["cn"], seed=1)
    return paths, sd, cn


@pytest.fixture(scope="module")
def ref(files):
    paths, _, _ = files
    return R.reference_from_files(paths["ckpt"], paths["cn"])


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g) * 0.2


def test_key_counts_tiny_equal_real():
    expected = {"unet": R.UNET_KEYS, "controlnet": R.CONTROLNET_KEYS, "vae": R.VAE_KEYS, "text": R.TEXT_KEYS}
    assert expected == {"unet": 686, "controlnet": 324, "vae": 248, "text": 294}
    assert R.count_keys(R.TINY) == expected
    assert R.count_keys(R.REAL) == expected


def test_sd21_file_layout(files):
    paths, sd, _ = files
    raw = torch.load(paths["ckpt"], map_location="cpu", weights_only=True)
    assert set(raw) == {"state_dict", "global_step"} and isinstance(raw["global_step"], int)
    keys = list(raw["state_dict"])
    assert sum(k.startswith(R.UNET_PREFIX) for k in keys) == 686
    assert sum(k.startswith(R.VAE_PREFIX) for k in keys) == 248
    assert sum(k.startswith(R.TEXT_PREFIX) for k in keys) == 294
    others = {k for k in keys if not k.startswith((R.UNET_PREFIX, R.VAE_PREFIX, R.TEXT_PREFIX))}
    assert others == set(R.SCHEDULE_BUFFERS) | {"model_ema.decay", "model_ema.num_updates"}
    assert "cond_stage_model.model.attn_mask" not in keys and not any("visual" in k for k in keys)
    assert sd[R.UNET_PREFIX + "input_blocks.0.0.weight"].shape == (32, 4, 3, 3)
    assert sd[R.TEXT_PREFIX + "token_embedding.weight"].shape == (49408, 32)
    betas = sd["betas"].double()
    assert sd["betas"].dtype == torch.float32
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-6) and betas[-1].item() == pytest.approx(0.012, rel=1e-6)
    np.testing.assert_allclose(sd["alphas_cumprod"].numpy(), R.sd21_alphas_cumprod(), rtol=1e-6)
    st = R.load_checkpoint(paths["st"])
    assert set(st) == set(sd) and all(torch.equal(st[k], sd[k]) for k in sd)


def test_v1_face_file_layout(files):
    paths, _, cn = files
    raw = torch.load(paths["cn"], map_location="cpu", weights_only=True)
    assert list(raw) == list(cn) and len(raw) == 324
    assert raw["input_blocks.0.0.weight"].shape == (32, 8, 3, 3)
    assert sum(k.startswith("zero_convs.") for k in raw) == 24  # 12 x (weight, bias)
    assert raw["zero_convs.11.0.weight"].shape == (128, 128, 1, 1) and raw["middle_block_out.0.bias"].shape == (128,)
    assert not any(k.startswith("input_hint_block") for k in raw)
    assert all(raw[k].abs().sum() > 0 for k in raw if k.startswith(("zero_convs", "middle_block_out")))


def test_forward_shapes_and_finiteness(ref):
    x, c = _inputs()
    ctx = ref.prompt_embedding()
    assert ctx.shape == (1, 77, 32) and torch.isfinite(ctx).all()
    res = ref.residuals(x, c, torch.tensor([999]), ctx)
    assert [(r.shape[1], r.shape[2]) for r in res] == RESIDUAL_SHAPES and all(r.shape[3] == r.shape[2] for r in res)
    outs = [ref.eps(x, c, torch.tensor([t]), ctx) for t in (999, 0)]
    for e in outs:
        assert e.shape == (1, 4, 8, 8) and torch.isfinite(e).all() and e.std() > 1e-2
    assert not torch.allclose(outs[0], outs[1])
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    z = ref.condition(image)
    assert z.shape == (1, 4, 8, 8) and torch.isfinite(z).all()
    out = ref.decode(z)
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_safetensors_loads_the_same(files, ref):
    paths, _, _ = files
    other = R.reference_from_files(paths["st"], paths["cn"])
    x, c = _inputs(1)
    ctx = ref.prompt_embedding()
    assert torch.equal(other.prompt_embedding(), ctx)
    assert torch.equal(other.eps(x, c, torch.tensor([500]), ctx), ref.eps(x, c, torch.tensor([500]), ctx))


def test_zero_zero_convs_inject_nothing(ref):
    zeroed = copy.deepcopy(ref)
    with torch.no_grad():
        for m in [*zeroed.controlnet.zero_convs, zeroed.controlnet.middle_block_out]:
            for p in m.parameters():
                p.zero_()
    x, c = _inputs(2)
    ctx = ref.prompt_embedding()
    t = torch.tensor([700])
    assert all(torch.count_nonzero(r) == 0 for r in zeroed.residuals(x, c, t, ctx))
    with torch.no_grad():
        plain = ref.unet(x, t, ctx)
    assert torch.equal(zeroed.eps(x, c, t, ctx), plain)
    assert not torch.allclose(ref.eps(x, c, t, ctx), plain)  # the fabricated ControlNet does inject


def test_text_mask_is_causal(ref):
    tokens = R.empty_prompt_tokens()
    assert tokens[0, :3].tolist() == [49406, 49407, 0] and tokens.shape == (1, 77) and tokens.dtype == torch.long
    changed = tokens.clone()
    changed[0, 5] = 1000
    a, b = ref.text.encode(tokens), ref.text.encode(changed)
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:])


def test_spaced_sampler_timesteps_and_precision():
    expected = [round(i * 999 / 49) for i in range(50)][::-1]
    assert expected[:3] == [999, 979, 958] and expected[-1] == 0
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(1, 4, 8, 8, generator=g)
    noises = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(50)]
    seen = []

    def eps_fn(x, t):
        seen.append(int(t[0]))
        assert x.dtype == torch.float32 and t.dtype == torch.long
        return 0.5 * x

    x64, steps = R.reference_spaced_sample(eps_fn, x_T, R.sd21_alphas_cumprod(), 50, noises)
    assert steps == expected and seen == expected
    x32, _ = R.reference_spaced_sample(eps_fn, x_T, R.sd21_alphas_cumprod(), 50, noises[:-1], dtype=torch.float32)
    assert torch.isfinite(x64).all() and torch.allclose(x64, x32, atol=1e-4)
    with pytest.raises(ValueError):
        R.reference_spaced_sample(eps_fn, x_T, R.sd21_alphas_cumprod(), 50, noises[:10])


def test_wavelet_reconstruction():
    g = torch.Generator().manual_seed(0)
    content = torch.rand(1, 3, 64, 64, generator=g)
    assert torch.allclose(R.reference_wavelet_reconstruction(content, content), content, atol=1e-6)
    flat = torch.full_like(content, 0.3)
    out = R.reference_wavelet_reconstruction(content, flat)
    high, low = R.wavelet_decomposition(content)
    assert torch.allclose(out, high + 0.3, atol=1e-6)  # a flat style is its own low band
