"""TOPIQ-NR (facereward.measures.topiq) against an independent functional reference (tests/topiq_reference.py).

No released weights can be fetched here, so checkpoints are fabricated in the released files' layout: every key and
shape of pyiqa's ``CFANet(semantic_model_name='resnet50', use_ref=False).state_dict()`` (spelled out in the reference
from pyiqa's and timm's sources, the timm ResNet-50 included), wrapped as ``{'params': ...}`` like pyiqa's files,
random values from a fixed seed. The parity check runs the real dims on small images; wrapper and error checks use
a reduced config to stay cheap.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from topiq_reference import fabricate, reference_forward, released_layout

from facereward.measures.topiq import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TEST_IMG_SIZES,
    TOPIQNR,
    WEIGHT_FILES,
    TOPIQConfig,
    pyiqa_resize,
    resized_size,
)

SMALL = {"stem": 8, "planes": (4, 8, 8, 16), "blocks": (1, 2, 1, 1), "inter": 32, "gate": 8, "grid": 32}
SMALL_CFG = TOPIQConfig(stem_width=8, stage_planes=(4, 8, 8, 16), stage_blocks=(1, 2, 1, 1), inter_dim=32,
                        num_heads=4, gate_width=8, pos_grid=32)  # fmt: skip


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A real-layout checkpoint ({'params': state_dict}, ~181 MB like the released file) and its raw dict."""
    sd = fabricate(released_layout(), seed=0)
    path = tmp_path_factory.mktemp("topiq") / "cfanet_nr_koniq_res50-fake.pth"
    torch.save({"params": sd}, path)
    yield path, {"params": sd}
    path.unlink()  # pytest keeps its last tmp dirs; do not leave 181 MB behind


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    sd = fabricate(released_layout(**SMALL), seed=3)
    path = tmp_path_factory.mktemp("topiq_small") / "small.pth"
    torch.save({"params": sd}, path)
    return path, sd


def _images(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- layout + parity


def test_real_layout_loads_strictly_and_matches_reference_keys(real):
    path, _ = real
    m = TOPIQNR(path, "koniq")
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    expected = {k: s for k, s in released_layout().items() if not k.endswith("num_batches_tracked")}
    assert got == expected
    assert sum(math.prod(s) for s in expected.values()) == 45_250_054  # float32: 181.0 MB, the released file is 181.2 MB
    assert all(not p.requires_grad for p in m.parameters()) and not m.training


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 70, 90)])  # second: uneven adaptive pooling, 3x3 grid
def test_koniq_parity(real, shape):
    path, raw = real
    m = TOPIQNR(path, "koniq")
    assert m.test_img_size is None
    x = _images(shape, seed=shape[-1])
    with torch.no_grad():
        out = m(x)
    ref = reference_forward(raw, x, test_img_size=None)
    assert out.shape == (shape[0],) and out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=0), (out, ref)
    if shape[0] > 1:
        assert (out[0] - out[1]).abs() > 1e-3  # the score depends on the image


@pytest.mark.parametrize("size", [40, (36, 52)])
def test_face_parity_with_small_resize(real, size):
    """The face variant with its resize shrunk from 512 (an int: shorter side; a pair: (h, w))."""
    path, raw = real
    m = TOPIQNR(path, "face", test_img_size=size)
    x = _images((1, 3, 48, 56), seed=7)
    with torch.no_grad():
        out = m(x)
    ref = reference_forward(raw, x, test_img_size=size)
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=0), (out, ref)
    # the resize matters: without it the score differs
    assert (out.double() - reference_forward(raw, x, test_img_size=None)).abs().max() > 1e-4


def test_variant_defaults_and_file_names(small):
    path, _ = small
    assert WEIGHT_FILES == {"koniq": "cfanet_nr_koniq_res50-9a73138b.pth", "face": "topiq_nr_cgfiqa_res50-0a8b8e4f.pth"}
    assert TEST_IMG_SIZES == {"koniq": None, "face": 512}
    assert TOPIQNR(path, "face", config=SMALL_CFG).test_img_size == 512
    assert TOPIQNR(path, "koniq", config=SMALL_CFG).test_img_size is None


# ------------------------------------------------------------------------------------------------- wrappers


def test_wrappers_and_formats_give_the_same_scores(small, tmp_path):
    path, sd = small
    x = _images((2, 3, 40, 48), seed=1)
    ref = reference_forward(sd, x)
    variants = {
        "flat.pth": sd,
        "module.pth": {"params": {f"module.{k}": v for k, v in sd.items()}},
        "no_nbt.pth": {"params": {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}},
        "extra_top.pth": {"params": sd, "iter": torch.tensor(5)},  # other top-level entries: ignored like pyiqa
    }
    paths = [path]
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        paths.append(tmp_path / name)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "flat.safetensors"))
    paths.append(tmp_path / "flat.safetensors")
    for p in paths:
        with torch.no_grad():
            out = TOPIQNR(p, "koniq", config=SMALL_CFG)(x)
        assert torch.allclose(out.double(), ref, atol=1e-5, rtol=0), p.name


def test_half_precision_file_is_stored_as_float32(small, tmp_path):
    _, sd = small
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    torch.save({"params": half}, tmp_path / "half.pth")
    m = TOPIQNR(tmp_path / "half.pth", config=SMALL_CFG)
    assert all(p.dtype == torch.float32 for p in m.parameters())


# ------------------------------------------------------------------------------------------------- errors


def _one_line(err: Exception) -> str:
    msg = str(err)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        TOPIQNR(tmp_path / "nope.pth")
    assert "nope.pth" in _one_line(e.value)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda sd: sd.pop("attn_blks.2.layers.0.multihead_attn.in_proj_weight"),
         ["attn_blks.2.layers.0.multihead_attn.in_proj_weight", "missing"]),
        (lambda sd: sd.__setitem__("semantic_model.layer2.1.conv2.weight", torch.zeros(8, 8, 1, 1)),
         ["semantic_model.layer2.1.conv2.weight", "(8, 8, 1, 1)", "(8, 8, 3, 3)"]),
        (lambda sd: sd.__setitem__("semantic_model.fc.weight", torch.zeros(3, 4)), ["semantic_model.fc.weight", "unexpected"]),
        (lambda sd: sd.__setitem__("h_emb", torch.zeros(1, 16, 32, 1, dtype=torch.long)), ["h_emb", "dtype"]),
        (lambda sd: sd.__setitem__("weight_pool.0.0.weight", torch.zeros(1)), ["weight_pool.0.0.weight", "topiq_fr"]),
    ],
    ids=["missing", "shape", "unexpected", "dtype", "fr-file"],
)  # fmt: skip
def test_bad_keys(small, tmp_path, edit, words):
    _, sd = small
    bad = dict(sd)
    edit(bad)
    p = tmp_path / "bad.pth"
    torch.save({"params": bad}, p)
    with pytest.raises(ValueError) as e:
        TOPIQNR(p, config=SMALL_CFG)
    msg = _one_line(e.value)
    assert str(p) in msg
    for w in words:
        assert w in msg


class _Opaque:
    pass


def test_unreadable_and_unsafe_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"params": {"x": _Opaque()}}, unsafe)
    not_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_dict)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    for p in (junk, unsafe, not_dict, bad_st):
        with pytest.raises(ValueError) as e:
            TOPIQNR(p)
        assert str(p) in _one_line(e.value)


def test_bad_options_and_inputs(small):
    path, _ = small
    with pytest.raises(ValueError, match="variant"):
        TOPIQNR(path, "spaq")
    for size in (0, "big", (512,), True):
        with pytest.raises(ValueError, match="test_img_size"):
            TOPIQNR(path, test_img_size=size, config=SMALL_CFG)
    m = TOPIQNR(path, config=SMALL_CFG)
    for x in (torch.rand(3, 32, 32), torch.rand(1, 1, 32, 32)):
        with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
            m(x)


# ------------------------------------------------------------------------------------------------- preprocessing


def test_resized_size_rule():
    # torchvision resize(int): shorter side -> s, longer -> int(s * long / short)
    assert resized_size(300, 400, 512) == (512, 682)
    assert resized_size(400, 300, 512) == (682, 512)
    assert resized_size(256, 256, 512) == (512, 512)
    assert resized_size(100, 333, 50) == (50, 166)
    assert resized_size(10, 20, (7, 9)) == (7, 9)


def test_pyiqa_resize_is_antialiased_bilinear_and_skips_same_size():
    x = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 1, 4).expand(1, 3, 4, 4).contiguous()
    y = pyiqa_resize(x, 2)
    # antialiased triangle filter of half-width 2 at output centre 1: weights .75, .75, .25 on pixels 0, 1, 2 -> 1/7
    assert torch.allclose(y[0, 0], torch.tensor([[1 / 7, 6 / 7], [1 / 7, 6 / 7]]), atol=1e-6)
    face = torch.rand(1, 3, 512, 512)
    assert pyiqa_resize(face, 512) is face
    assert pyiqa_resize(face, None) is face


def test_normalisation_constants(small):
    path, _ = small
    m = TOPIQNR(path, config=SMALL_CFG)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    z = m.preprocess(torch.full((1, 3, 5, 6), 0.5))
    expected = torch.tensor([0.015 / 0.229, 0.044 / 0.224, 0.094 / 0.225])
    assert z.shape == (1, 3, 5, 6)
    assert torch.allclose(z[0, :, 2, 3], expected, atol=1e-6)


def test_frozen_differentiable_and_train_mode_inert(small):
    path, _ = small
    m = TOPIQNR(path, config=SMALL_CFG)
    x = _images((2, 3, 40, 40), seed=5).requires_grad_(True)
    out = m(x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())
    with torch.no_grad():
        before = m(x)
        m.train()
        after = m(x)
    assert torch.equal(before, after)
