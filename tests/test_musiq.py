"""MUSIQ (facereward.measures.musiq) against tests/musiq_reference.py, a functional re-derivation of pyiqa's forward.

No released weights can be fetched here, so checkpoints are fabricated in pyiqa's key layout (written out below
from pyiqa/archs/musiq_arch.py, not taken from the module under test) with random values from a fixed seed. The
real-dims files check the strict key/shape layout per variant; the numeric parity runs a reduced transformer
(the stem and patch size stay real) on small images, plus one real-dims forward on one small image.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from facereward.measures.musiq import (
    MUSIQ,
    WEIGHT_FILES,
    MUSIQConfig,
    StdConv2d,
    hash_grid_index,
    hashed_positions,
    key_layout,
    load_musiq,
    multiscale_tokens,
    resized_size,
    same_padding,
)
from tests.musiq_reference import musiq_reference


def pyiqa_layout(num_class=1, d=384, mlp=1152, layers=14, grid=10, scales=3, patch=32):
    """pyiqa MUSIQ(...).state_dict() names and shapes."""
    lay = {
        "conv_root.weight": (64, 3, 7, 7), "gn_root.weight": (64,), "gn_root.bias": (64,),
        "block1.conv1.weight": (64, 64, 1, 1), "block1.gn1.weight": (64,), "block1.gn1.bias": (64,),
        "block1.conv2.weight": (64, 64, 3, 3), "block1.gn2.weight": (64,), "block1.gn2.bias": (64,),
        "block1.conv3.weight": (256, 64, 1, 1), "block1.gn3.weight": (256,), "block1.gn3.bias": (256,),
        "block1.conv_proj.weight": (256, 64, 1, 1), "block1.gn_proj.weight": (256,), "block1.gn_proj.bias": (256,),
        "embedding.weight": (d, 256 * (patch // 4) ** 2), "embedding.bias": (d,),
        "transformer_encoder.posembed_input.position_emb": (1, grid * grid, d),
        "transformer_encoder.scaleembed_input.scale_emb": (scales, d),
        "transformer_encoder.cls": (1, 1, d),
        "transformer_encoder.encoder_norm.weight": (d,), "transformer_encoder.encoder_norm.bias": (d,),
    }  # fmt: skip
    for i in range(layers):
        p = f"transformer_encoder.transformer.encoderblock_{i}."
        for nm, shape in (("norm1", (d,)), ("norm2", (d,)), ("attention.query", (d, d)), ("attention.key", (d, d)),
                          ("attention.value", (d, d)), ("attention.out", (d, d)), ("mlp.fc1", (mlp, d)),
                          ("mlp.fc2", (d, mlp))):  # fmt: skip
            lay[p + nm + ".weight"] = shape
            lay[p + nm + ".bias"] = (shape[0],)
    head = "head.0" if num_class > 1 else "head"
    lay[head + ".weight"] = (num_class, d)
    lay[head + ".bias"] = (num_class,)
    return lay


def fabricate(layout: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in layout.items():
        t = torch.randn(shape, generator=g)
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or ".gn" in k and k.endswith(".weight") \
                or k.startswith("gn_root.w") or k.endswith("encoder_norm.weight"):  # fmt: skip
            t = 1 + 0.1 * t
        elif k.endswith(".bias"):
            t = 0.1 * t
        elif len(shape) == 2 and "scale_emb" not in k:  # linear weights
            t = t / math.sqrt(shape[1])
        elif len(shape) != 4:  # embeddings, cls
            t = 0.5 * t
        sd[k] = t
    return sd


SMALL = dict(d=32, mlp=48, layers=2)


def small_config(**kw) -> MUSIQConfig:
    return MUSIQConfig(hidden_size=32, mlp_dim=48, num_heads=4, num_layers=2, **kw)


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("musiq")
    sd = fabricate(pyiqa_layout(), seed=0)
    koniq = root / WEIGHT_FILES["koniq10k"]
    torch.save(sd, koniq)
    ava_sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    ava_sd["head.0.weight"] = torch.randn(10, 384, generator=torch.Generator().manual_seed(1)) / 20
    ava_sd["head.0.bias"] = torch.randn(10, generator=torch.Generator().manual_seed(2)) / 10
    ava = root / WEIGHT_FILES["ava"]
    torch.save(ava_sd, ava)
    return {"koniq": koniq, "ava": ava, "sd": sd, "ava_sd": ava_sd}


def test_key_layout_matches_pyiqa():
    for variant in ("koniq10k", "spaq", "paq2piq"):
        assert key_layout(variant) == pyiqa_layout(1)
    assert key_layout("ava") == pyiqa_layout(10)
    assert sum(math.prod(s) for s in key_layout("koniq10k").values()) == 27_125_825  # conv stem 84_544, embedding 6_291_840, 14 blocks x 1_479_168, ...
    assert WEIGHT_FILES == {
        "koniq10k": "musiq_koniq_ckpt-e95806b9.pth",
        "spaq": "musiq_spaq_ckpt-358bb6af.pth",
        "paq2piq": "musiq_paq2piq_ckpt-364c0c84.pth",
        "ava": "musiq_ava_ckpt-e8d3f067.pth",
    }


def test_real_files_load_strictly_and_run(real_files):
    for variant in ("koniq10k", "spaq", "paq2piq"):
        m = MUSIQ.from_pretrained(real_files["koniq"], variant)
        assert m.state_dict().keys() == real_files["sd"].keys()
    assert torch.equal(m.embedding.weight, real_files["sd"]["embedding.weight"])
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    # one real-dims forward (hidden 384, 6 heads, 14 blocks, scales 224/384/original) on one small image
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = m(x)
        want = musiq_reference(real_files["sd"], x)
    assert got.shape == (1,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    a = load_musiq(real_files["ava"], "ava")
    assert torch.equal(a.head[0].weight, real_files["ava_sd"]["head.0.weight"])
    with pytest.raises(ValueError, match=r"musiq_ava_ckpt-e8d3f067\.pth: key 'head\.weight' missing.*variant='ava'"):
        MUSIQ.from_pretrained(real_files["ava"], "koniq10k")
    with pytest.raises(ValueError, match=r"key 'head\.0\.weight' missing \(expected in pyiqa's MUSIQ layout for "
                                         r"variant 'ava'; a 1-output file"):  # fmt: skip
        MUSIQ.from_pretrained(real_files["koniq"], "ava")


@pytest.mark.parametrize(
    "num_class,variant,cfg_kw,shape",
    [
        (1, "koniq10k", {}, (2, 3, 24, 72)),  # padding at both resized scales, all original patches
        (1, "spaq", {"longer_side_lengths": (96, 64)}, (1, 3, 50, 37)),  # unsorted lengths, odd sizes
        (10, "ava", {"grid_size": 2, "max_seq_len_from_original_res": 2}, (2, 3, 70, 45)),  # cut original
        (1, "paq2piq", {"max_seq_len_from_original_res": 8, "longer_side_lengths": (64,), "num_scales": 2},
         (1, 3, 33, 33)),  # fmt: skip
    ],
)
def test_parity_with_reference(tmp_path, num_class, variant, cfg_kw, shape):
    sides = cfg_kw.get("longer_side_lengths", (64, 96))
    cfg = small_config(**{**cfg_kw, "longer_side_lengths": sides})
    sd = fabricate(pyiqa_layout(num_class, grid=cfg.grid_size, scales=cfg.num_scales, **SMALL), seed=num_class)
    path = tmp_path / "small.pth"
    torch.save(sd, path)
    model = MUSIQ.from_pretrained(path, variant, cfg)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = model(x)
        want = musiq_reference(sd, x, num_heads=4, grid=cfg.grid_size, sides=sides,
                               orig_max_len=cfg.max_seq_len_from_original_res)  # fmt: skip
    assert got.shape == (shape[0],) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if num_class > 1:
        assert ((got >= 1) & (got <= 10)).all()
    # the images differ, so the scores do: guards against a broadcast over the batch
    if shape[0] > 1:
        assert got[0] != got[1]


def test_gradient_reaches_images(tmp_path):
    cfg = small_config(longer_side_lengths=(64,), num_scales=2)
    sd = fabricate(pyiqa_layout(1, **SMALL, scales=2), seed=5)
    torch.save(sd, tmp_path / "g.pth")
    model = MUSIQ.from_pretrained(tmp_path / "g.pth", "koniq10k", cfg)
    x = torch.rand(1, 3, 32, 40, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- preprocessing pieces


def test_same_padding_by_hand():
    assert same_padding(32, 7, 2) == (2, 3)  # root conv: 32 -> 16
    assert same_padding(16, 3, 2) == (0, 1)  # root pool: 16 -> 8
    assert same_padding(8, 3, 1) == (1, 1)
    assert same_padding(8, 1, 1) == (0, 0)
    assert same_padding(40, 32, 32) == (12, 12)  # patches: 40 -> 64, image centred
    assert same_padding(21, 32, 32) == (5, 6)


def test_resized_size_rounds_half_to_even():
    assert resized_size(5, 32, 16) == (2, 16)  # 2.5 -> 2
    assert resized_size(7, 32, 16) == (4, 16)  # 3.5 -> 4
    assert resized_size(512, 384, 224) == (224, 168)
    assert resized_size(24, 72, 64) == (21, 64)


def test_hashed_positions_by_hand():
    assert hash_grid_index(3, 10).tolist() == [0, 3, 6]
    assert hash_grid_index(12, 10).tolist() == [0, 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9]
    assert hash_grid_index(1, 10).tolist() == [0]
    assert hashed_positions(2, 3, 10).tolist() == [0, 3, 6, 50, 53, 56]
    assert hashed_positions(3, 1, 2).tolist() == [0, 0, 2]
    # torch's nearest works in float32: at count 205, index 41 lands in cell 1, not the exact 41*10/205 = 2
    idx = hash_grid_index(205, 10)
    assert idx[41].item() == 1 and 41 * 10 // 205 == 2
    ref = F.interpolate(torch.arange(10.0).view(1, 1, 10), size=205, mode="nearest").view(-1).long()
    assert torch.equal(idx, ref)


def test_multiscale_tokens_layout():
    cfg = MUSIQConfig(longer_side_lengths=(64, 32), max_seq_len_from_original_res=-1)
    x = torch.zeros(1, 3, 20, 80)
    t = multiscale_tokens(x, cfg)
    # 32: 8x32 -> 1x1 patch, max 1; 64: 16x64 -> 1x2, max 4; original 20x80 -> 1x3
    assert t.scales.tolist() == [0, 1, 1, 0, 0, 2, 2, 2]
    assert t.mask.tolist() == [True, True, True, False, False, True, True, True]
    assert t.positions.tolist() == [0, 0, 5, 0, 0, 0, 3, 6]
    assert t.patches.shape == (1, 8, 3, 32, 32)
    # original scale: 20 rows are centred (6 zero rows above), columns 80 -> 96 (8 zero columns left)
    x = torch.arange(20 * 80, dtype=torch.float32).view(1, 1, 20, 80).expand(1, 3, 20, 80) + 1
    p = multiscale_tokens(x, cfg).patches[0, 5, 0]
    assert p[:6].abs().sum() == 0 and p[26:].abs().sum() == 0 and p[:, :8].abs().sum() == 0
    assert p[6, 8].item() == 1 and p[6, 31].item() == 24


def test_weight_standardisation_by_hand():
    conv = StdConv2d(4, 1, 1)
    conv.weight.data = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    x = torch.zeros(1, 4, 1, 1)
    x[0, 3] = 1.0
    # mean 2.5, unbiased std sqrt(5/3): channel 3 weight (4 - 2.5) / (1.2909944 + 1e-5)
    assert conv(x).item() == pytest.approx(1.5 / (math.sqrt(5 / 3) + 1e-5), abs=1e-6)


# ---------------------------------------------------------------- errors


@pytest.fixture()
def small_sd():
    return fabricate(pyiqa_layout(1, **SMALL, scales=3), seed=9)


def _load(tmp_path, sd, name="w.pth", variant="koniq10k"):
    path = tmp_path / name
    torch.save(sd, path)
    return MUSIQ.from_pretrained(path, variant, small_config())


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        MUSIQ.from_pretrained("/nonexistent/nowhere.pth")


def test_missing_key(tmp_path, small_sd):
    del small_sd["transformer_encoder.transformer.encoderblock_1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"w\.pth: key 'transformer_encoder\.transformer\.encoderblock_1\.mlp\.fc2"
                                         r"\.bias' missing"):  # fmt: skip
        _load(tmp_path, small_sd)


def test_wrong_shape(tmp_path, small_sd):
    small_sd["transformer_encoder.scaleembed_input.scale_emb"] = torch.zeros(2, 32)
    with pytest.raises(ValueError, match=r"w\.pth: key 'transformer_encoder\.scaleembed_input\.scale_emb' has "
                                         r"shape \(2, 32\), expected \(3, 32\)"):  # fmt: skip
        _load(tmp_path, small_sd)


def test_unexpected_key(tmp_path, small_sd):
    small_sd["imagenet_head.weight"] = torch.zeros(1000, 32)
    with pytest.raises(ValueError, match=r"w\.pth: unexpected key 'imagenet_head\.weight'"):
        _load(tmp_path, small_sd)


def test_bad_files(tmp_path, small_sd):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth could not be read"):
        MUSIQ.from_pretrained(tmp_path / "junk.pth")
    torch.save({"params": small_sd}, tmp_path / "nested.pth")
    with pytest.raises(ValueError, match=r"nested\.pth does not hold a flat"):
        MUSIQ.from_pretrained(tmp_path / "nested.pth", config=small_config())
    torch.save({"w": torch.nn.Linear(1, 1)}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match=r"pickled\.pth is not a plain tensor state dict"):
        MUSIQ.from_pretrained(tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="unknown variant 'koniq'"):
        MUSIQ.from_pretrained(tmp_path / "pickled.pth", "koniq")


def test_module_prefix_and_safetensors(tmp_path, small_sd):
    m1 = _load(tmp_path, {"module." + k: v for k, v in small_sd.items()}, "prefixed.pth")
    save_file(small_sd, str(tmp_path / "w.safetensors"))
    m2 = MUSIQ.from_pretrained(tmp_path / "w.safetensors", "koniq10k", small_config())
    for k, v in small_sd.items():
        assert torch.equal(m1.state_dict()[k], v) and torch.equal(m2.state_dict()[k], v)
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, H, W\)"):
        m1(torch.rand(3, 32, 32))
