"""MANIQA (facereward.measures.maniqa) against tests/maniqa_reference.py, pyiqa's test-time forward written functionally.

No real weights can be fetched here. The key layout of the released files is written out below from pyiqa's
maniqa_arch.py / maniqa_swin.py and timm's vit_base_patch8_224 (not taken from the module under test) and compared at
full dims on the meta device; the numeric parity runs a reduced config (ViT width 32, 4x4 patches, 32x32 crops) with a
checkpoint fabricated in that layout (random values from a fixed seed; the Swin index / mask buffers computed here
from Swin's recipe), loaded from a file.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from maniqa_reference import pyiqa_uniform_crop, reference_maniqa
from safetensors.torch import save_file

from facereward.measures.maniqa import (
    MANIQA,
    WEIGHT_FILES,
    MANIQAConfig,
    check_state_dict,
    crop_offsets,
    maniqa_layout,
    resize_for_crops,
    uniform_crops,
)

SMALL = MANIQAConfig(embed_dim=32, vit_depth=11, vit_heads=4, vit_num_classes=10, patch_size=4, img_size=32,
                     swin_heads=(2, 2), window_size=4, dim_mlp=24)


def pyiqa_layout(d=768, depth=12, classes=1000, patch=8, img=224, ws=4, heads=(4, 4), swin_depths=(2, 2),
                 dim_mlp=768, num_tab=2):
    """Key -> shape of pyiqa MANIQA().state_dict() (timm ViT + maniqa_swin), written from their sources."""
    grid = img // patch
    t = grid * grid
    lay = {"vit.cls_token": (1, 1, d), "vit.pos_embed": (1, t + 1, d),
           "vit.patch_embed.proj.weight": (d, 3, patch, patch), "vit.patch_embed.proj.bias": (d,),
           "vit.norm.weight": (d,), "vit.norm.bias": (d,), "vit.head.weight": (classes, d), "vit.head.bias": (classes,)}
    for i in range(depth):
        p = f"vit.blocks.{i}."
        lay.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,), p + "attn.qkv.weight": (3 * d, d),
                    p + "attn.qkv.bias": (3 * d,), p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
                    p + "norm2.weight": (d,), p + "norm2.bias": (d,), p + "mlp.fc1.weight": (4 * d, d),
                    p + "mlp.fc1.bias": (4 * d,), p + "mlp.fc2.weight": (d, 4 * d), p + "mlp.fc2.bias": (d,)})
    for s in (1, 2):
        for i in range(num_tab):
            for q in "qkv":
                lay[f"tablock{s}.{i}.c_{q}.weight"] = (t, t)
                lay[f"tablock{s}.{i}.c_{q}.bias"] = (t,)
    lay.update({"conv1.weight": (d, 4 * d, 1, 1), "conv1.bias": (d,),
                "conv2.weight": (d // 2, d, 1, 1), "conv2.bias": (d // 2,)})
    for s, c in ((1, d), (2, d // 2)):
        p = f"swintransformer{s}."
        lay[p + "downsample.weight"] = (c, c, 3, 3)
        lay[p + "downsample.bias"] = (c,)
        for li, (nb, nh) in enumerate(zip(swin_depths, heads)):
            lp = f"{p}layers.{li}."
            lay[lp + "conv.weight"] = (c, c, 3, 3)
            lay[lp + "conv.bias"] = (c,)
            for bi in range(nb):
                bp = f"{lp}blocks.{bi}."
                lay.update({bp + "norm1.weight": (c,), bp + "norm1.bias": (c,),
                            bp + "attn.relative_position_bias_table": ((2 * ws - 1) ** 2, nh),
                            bp + "attn.relative_position_index": (ws * ws, ws * ws),
                            bp + "attn.qkv.weight": (3 * c, c), bp + "attn.qkv.bias": (3 * c,),
                            bp + "attn.proj.weight": (c, c), bp + "attn.proj.bias": (c,),
                            bp + "norm2.weight": (c,), bp + "norm2.bias": (c,),
                            bp + "mlp.fc1.weight": (dim_mlp, c), bp + "mlp.fc1.bias": (dim_mlp,),
                            bp + "mlp.fc2.weight": (c, dim_mlp), bp + "mlp.fc2.bias": (c,)})
                if bi % 2 == 1:  # shifted blocks register attn_mask; unshifted register None (not saved)
                    lay[bp + "attn_mask"] = ((grid // ws) ** 2, ws * ws, ws * ws)
    for h in ("fc_score", "fc_weight"):
        lay.update({f"{h}.0.weight": (d // 2, d // 2), f"{h}.0.bias": (d // 2,), f"{h}.3.weight": (1, d // 2),
                    f"{h}.3.bias": (1,)})
    return lay


SMALL_LAYOUT = dict(d=32, depth=11, classes=10, patch=4, img=32, dim_mlp=24, heads=(2, 2))


def swin_index(ws):
    """Swin's relative_position_index, written loop-wise."""
    cells = [(i, j) for i in range(ws) for j in range(ws)]
    return torch.tensor([[(a[0] - b[0] + ws - 1) * (2 * ws - 1) + (a[1] - b[1] + ws - 1) for b in cells]
                         for a in cells])


def swin_mask(res, ws):
    """Swin's shifted-window mask: region labels of the rolled map, -100 between different regions, per window."""
    shift = ws // 2

    def band(v):
        return 0 if v < res - ws else (1 if v < res - shift else 2)

    masks = []
    for wi in range(res // ws):
        for wj in range(res // ws):
            lab = [band(wi * ws + a) * 3 + band(wj * ws + b) for a in range(ws) for b in range(ws)]
            masks.append([[0.0 if x == y else -100.0 for y in lab] for x in lab])
    return torch.tensor(masks)


def fabricate(layout, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in layout.items():
        if k.endswith("relative_position_index"):
            sd[k] = swin_index(round(shape[0] ** 0.5))
        elif k.endswith("attn_mask"):
            sd[k] = swin_mask(round((shape[0] * shape[1]) ** 0.5), round(shape[1] ** 0.5))
        elif k.endswith(("norm1.weight", "norm2.weight", "vit.norm.weight")):
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2 and not k.endswith(("cls_token", "pos_embed", "bias_table")):
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            sd[k] = 0.8 * torch.randn(shape, generator=g) / fan_in ** 0.5
        else:
            sd[k] = 0.1 * torch.randn(shape, generator=g)
    sd["fc_score.3.bias"] = torch.tensor([0.2])  # keep the ReLU'd scores away from all-zero
    return sd


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("maniqa")
    sd = fabricate(pyiqa_layout(**SMALL_LAYOUT), seed=0)
    path = root / WEIGHT_FILES["koniq"]
    torch.save(sd, path)
    return sd, path, root


def ref(sd, images, scale, n, as_float=True):
    out = reference_maniqa(sd, images, patch=4, crop=32, vit_heads=4, swin_heads=[2, 2], swin_depths=[2, 2],
                           window=4, scale=scale, test_sample=n)
    return out.float() if as_float else out


# ------------------------------------------------------------------------------------------------ layout

def test_weight_files_and_full_layout():
    assert WEIGHT_FILES == {"pipal": "MANIQA_PIPAL-ae6d356b.pth", "koniq": "ckpt_koniq10k.pt"}
    expected = pyiqa_layout()
    got = maniqa_layout()
    assert got == expected
    assert len(got) == 12 * 12 + 8 + 2 * 2 * 3 * 2 + 4 + 2 * (2 + 2 * (2 + 2 * 14) + 2) + 8
    # the strict check accepts the released layout at full size (meta tensors: shapes only, no memory)
    meta = {k: torch.empty(s, device="meta", dtype=torch.long if k.endswith("index") else torch.float32)
            for k, s in expected.items()}
    check_state_dict(meta, MANIQAConfig(), "full")
    del meta["swintransformer2.layers.1.blocks.1.attn_mask"]
    with pytest.raises(ValueError, match="full: key 'swintransformer2.layers.1.blocks.1.attn_mask' missing"):
        check_state_dict(meta, MANIQAConfig(), "full")


# ------------------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("variant,shape,n", [("koniq", (2, 3, 40, 45), 20), ("pipal", (1, 3, 20, 27), 20),
                                             ("koniq", (2, 3, 36, 33), 4)])
def test_parity_with_reference(ckpt, variant, shape, n):
    sd, path, _ = ckpt
    model = MANIQA(path, variant, test_sample=n, config=SMALL)
    assert model.scale == {"koniq": 0.8, "pipal": 0.13}[variant]
    images = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        out = model(images)
    expected = ref(sd, images, model.scale, n)
    assert out.shape == (shape[0],)
    assert out.min() > 1e-3  # not a degenerate all-zero score
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    if shape[0] > 1:
        assert abs(out[0] - out[1]) > 1e-4
    with torch.no_grad():  # in float64 the two agree to rounding: any layout / order slip would show far above it
        out64 = model.double()(images.double())
    torch.testing.assert_close(out64, ref(sd, images, model.scale, n, as_float=False), rtol=0, atol=1e-10)


def test_wrappers_and_safetensors(ckpt):
    sd, path, root = ckpt
    images = torch.rand(1, 3, 34, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = MANIQA(path, "koniq", config=SMALL)(images)
        p1 = root / "wrapped.pth"
        torch.save({"params": {"module." + k: v for k, v in sd.items()}}, p1)
        p2 = root / "plain.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p2))
        for p in (p1, p2):
            torch.testing.assert_close(MANIQA(p, "koniq", config=SMALL)(images), base, rtol=0, atol=0)


def test_frozen_eval_and_differentiable(ckpt):
    _, path, _ = ckpt
    model = MANIQA(path, "pipal", test_sample=2, config=SMALL)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(not t.is_meta for t in model.state_dict().values())
    images = torch.rand(1, 3, 33, 33, requires_grad=True)
    model(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ preprocessing

def test_crop_offsets_by_hand():
    # 512 x 600, 20 crops: steps (512-224)//4 = 72, (600-224)//4 = 94; 5x5 grid, first 4 rows kept
    offs = crop_offsets(512, 600, 224, 20)
    assert offs == [(72 * i, 94 * j) for i in range(4) for j in range(5)]
    assert crop_offsets(300, 300, 224, 1) == [(0, 0)]
    assert crop_offsets(300, 260, 224, 4) == [(0, 0), (0, 18), (38, 0), (38, 18)]
    x = torch.arange(2 * 1 * 6 * 7, dtype=torch.float32).reshape(2, 1, 6, 7)
    torch.testing.assert_close(uniform_crops(x, 5, 3), pyiqa_uniform_crop(x, 5, 3), rtol=0, atol=0)
    # steps (6-5)//1 = 1, (7-5)//1 = 2 on a 2x2 grid; image-major: crop k of image b at b * n + k
    assert torch.equal(uniform_crops(x, 5, 3)[3], x[1, :, 0:5, 0:5])
    assert torch.equal(uniform_crops(x, 5, 3)[4], x[1, :, 0:5, 2:7])


def test_resize_by_hand():
    # 2x2 -> crop 3: factor 4/2 = 2, bilinear half-pixel centres: rows [0, 1] -> [0, .25, .75, 1]
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(1, 1, 2, 2)
    torch.testing.assert_close(resize_for_crops(x, 3)[0, 0, :, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    # 3x7 -> crop 3: factor 4/3, width floor(7 * 4/3) = 9; the kernel maps with 1/factor = 0.75, not 7/9:
    # column 8 samples (8 + .5) * .75 - .5 = 5.875 of a 0..6 ramp
    ramp = torch.arange(7.0).view(1, 1, 1, 7).expand(1, 1, 3, 7)
    y = resize_for_crops(ramp, 3)
    assert y.shape[-2:] == (4, 9)
    assert y[0, 0, 0, 8].item() == pytest.approx(5.875)
    big = torch.rand(1, 1, 5, 6)
    assert resize_for_crops(big, 4) is big


def test_normalisation_constants(ckpt):
    _, path, _ = ckpt
    model = MANIQA(path, config=SMALL)
    assert model.variant == "koniq" and model.test_sample == 20
    z = (torch.full((1, 3, 1, 1), 0.25) - model.mean) / model.std
    torch.testing.assert_close(z, torch.full((1, 3, 1, 1), -0.5))


# ------------------------------------------------------------------------------------------------ errors

def _save(root, name, sd):
    p = root / name
    torch.save(sd, p)
    return p


def test_key_layout_errors(ckpt):
    sd, _, root = ckpt
    missing = dict(sd)
    del missing["tablock2.1.c_v.bias"]
    p = _save(root, "missing.pth", missing)
    with pytest.raises(ValueError, match=rf"^MANIQA \(koniq\) weight file {p}: key 'tablock2.1.c_v.bias' missing"):
        MANIQA(p, config=SMALL)
    wrong = dict(sd, **{"conv1.weight": torch.zeros(32, 64, 1, 1)})
    p = _save(root, "shape.pth", wrong)
    with pytest.raises(ValueError, match=rf"{p}: key 'conv1.weight' has shape \(32, 64, 1, 1\), expected \(32, 128, 1, 1\)"):
        MANIQA(p, config=SMALL)
    extra = dict(sd, **{"vit.blocks.11.norm1.weight": torch.ones(32)})
    p = _save(root, "extra.pth", extra)
    with pytest.raises(ValueError, match=rf"{p}: unexpected key 'vit.blocks.11.norm1.weight'"):
        MANIQA(p, config=SMALL)
    bad_index = dict(sd, **{"swintransformer1.layers.0.blocks.0.attn.relative_position_index": torch.full((16, 16), 49)})
    p = _save(root, "index.pth", bad_index)
    with pytest.raises(ValueError, match=r"relative_position_index' holds indices outside \[0, 49\)"):
        MANIQA(p, config=SMALL)
    float_index = dict(sd, **{"swintransformer1.layers.0.blocks.0.attn.relative_position_index": torch.zeros(16, 16)})
    p = _save(root, "findex.pth", float_index)
    with pytest.raises(ValueError, match="expected an integer tensor"):
        MANIQA(p, config=SMALL)


def test_file_errors(ckpt, tmp_path):
    _, path, _ = ckpt
    gone = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=f"MANIQA \\(pipal\\) weight file not found: {gone}"):
        MANIQA(gone, "pipal", config=SMALL)
    pickled = tmp_path / "whole.pt"
    with open(pickled, "wb") as f:
        pickle.dump({"net": torch.nn.Linear(2, 2)}, f, protocol=2)
    with pytest.raises(ValueError, match=rf"{pickled} is not a plain tensor state dict: it holds pickled Python "
                                         r"objects.*state_dict\(\), 'OUT.pth'\)") as e:
        MANIQA(pickled, config=SMALL)
    assert "\n" not in str(e.value)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(ValueError, match=r"holds pickled Python objects \(torch.nn.modules.linear.Linear\)"):
        MANIQA(tmp_path / "module.pt", config=SMALL)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"{garbage} could not be read \\(UnpicklingError: Unsupported operand"):
        MANIQA(garbage, config=SMALL)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"does not hold a flat \{name: tensor\} state dict"):
        MANIQA(tmp_path / "list.pth", config=SMALL)
    with pytest.raises(ValueError, match="variant must be one of"):
        MANIQA(path, "kadid", config=SMALL)
    with pytest.raises(ValueError, match="test_sample must be a positive integer"):
        MANIQA(path, test_sample=0, config=SMALL)
    model = MANIQA(path, test_sample=1, config=SMALL)
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, H, W\), got \(1, 1, 40, 40\)"):
        model(torch.rand(1, 1, 40, 40))
