"""LPIPS v0.1 (facereward.measures.lpips) against an independent hand computation.

No real weights can be fetched here, so the files are fabricated with the real key layouts: every
tensor that torchvision's ``vgg16().state_dict()`` / ``alexnet().state_dict()`` hold under
``features.`` (names and shapes written out below from torchvision's architecture, not taken from the
module under test), random He-normal values from a fixed seed, and random non-negative heads under
the lpips package's ``lin{k}.model.1.weight`` names. The reference recomputes LPIPS in float64 with
``F.conv2d`` / ``F.relu`` / ``F.max_pool2d`` straight from those tensors, following
``lpips.LPIPS.forward(normalize=True)``: ScalingLayer, ``normalize_tensor``, squared difference,
1x1 head, ``spatial_average``, sum over layers.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from facereward.measures.lpips import LPIPS, load_lpips

# (features index, out channels, in channels, kernel) as in torchvision.models.vgg16 / alexnet
VGG_CONVS = [
    (0, 64, 3, 3), (2, 64, 64, 3),
    (5, 128, 64, 3), (7, 128, 128, 3),
    (10, 256, 128, 3), (12, 256, 256, 3), (14, 256, 256, 3),
    (17, 512, 256, 3), (19, 512, 512, 3), (21, 512, 512, 3),
    (24, 512, 512, 3), (26, 512, 512, 3), (28, 512, 512, 3),
]  # fmt: skip
ALEX_CONVS = [(0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3), (10, 256, 256, 3)]
CHANNELS = {"vgg": [64, 128, 256, 512, 512], "alex": [64, 192, 384, 256, 256]}
CONVS = {"vgg": VGG_CONVS, "alex": ALEX_CONVS}
SIZES = {"vgg": (32, 48), "alex": (64, 72)}


def _fake_features(net: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, cout, cin, k in CONVS[net]:
        sd[f"{i}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5
        sd[f"{i}.bias"] = torch.randn(cout, generator=g) * 0.05
    return sd


def _fake_heads(net: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(CHANNELS[net])}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Per net: features-only .pth, full-model .pth (with a classifier), features-only .safetensors,
    heads .pth and .safetensors; plus the tensors themselves."""
    root = tmp_path_factory.mktemp("lpips")
    out = {}
    for net, seed in (("vgg", 1), ("alex", 2)):
        feats, heads = _fake_features(net, seed), _fake_heads(net, seed + 10)
        full = {f"features.{k}": v for k, v in feats.items()}
        full["classifier.1.weight"] = torch.randn(10, 7)  # ignored (real one: (4096, 9216) / (4096, 25088))
        full["classifier.1.bias"] = torch.randn(10)
        paths = {
            "feat_pth": root / f"{net}_features.pth",
            "full_pth": root / f"{net}_full.pth",
            "feat_st": root / f"{net}_features.safetensors",
            "heads_pth": root / f"{net}_heads.pth",
            "heads_st": root / f"{net}_heads.safetensors",
        }
        torch.save(feats, paths["feat_pth"])
        torch.save(full, paths["full_pth"])
        save_file(feats, str(paths["feat_st"]))
        torch.save(heads, paths["heads_pth"])
        save_file(heads, str(paths["heads_st"]))
        out[net] = {"feats": feats, "heads": heads, "full": full, **paths}
    return out


@pytest.fixture(scope="module")
def models(files):
    return {net: load_lpips(net, files[net]["full_pth"], files[net]["heads_pth"]) for net in ("vgg", "alex")}


def _images(net: str, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = SIZES[net]
    x = torch.rand(b, 3, h, w, generator=g)
    y = (x + 0.2 * torch.randn(b, 3, h, w, generator=g)).clamp(0, 1)
    return x, y


def _smooth_image(net: str) -> torch.Tensor:
    h, w = SIZES[net]
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([0.5 + 0.4 * torch.sin(6 * xx), 0.5 + 0.4 * torch.cos(5 * yy), 0.3 + 0.4 * xx * yy])
    return img[None]


def _hand_features(net: str, sd: dict[str, torch.Tensor], z: torch.Tensor) -> list[torch.Tensor]:
    def conv(h, i, stride=1, pad=1):
        return F.relu(F.conv2d(h, sd[f"{i}.weight"], sd[f"{i}.bias"], stride=stride, padding=pad))

    if net == "vgg":
        f1 = conv(conv(z, 0), 2)  # relu1_2
        f2 = conv(conv(F.max_pool2d(f1, 2, 2), 5), 7)  # relu2_2
        f3 = conv(conv(conv(F.max_pool2d(f2, 2, 2), 10), 12), 14)  # relu3_3
        f4 = conv(conv(conv(F.max_pool2d(f3, 2, 2), 17), 19), 21)  # relu4_3
        f5 = conv(conv(conv(F.max_pool2d(f4, 2, 2), 24), 26), 28)  # relu5_3
    else:
        f1 = conv(z, 0, stride=4, pad=2)  # relu1
        f2 = conv(F.max_pool2d(f1, 3, 2), 3, pad=2)  # relu2
        f3 = conv(F.max_pool2d(f2, 3, 2), 6)  # relu3
        f4 = conv(f3, 8)  # relu4
        f5 = conv(f4, 10)  # relu5
    return [f1, f2, f3, f4, f5]


def _hand_lpips(net: str, feats: dict, heads: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    sd = {k: v.double() for k, v in feats.items()}
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    fx = _hand_features(net, sd, ((2 * x.double() - 1) - shift) / scale)
    fy = _hand_features(net, sd, ((2 * y.double() - 1) - shift) / scale)
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for k, (a, b) in enumerate(zip(fx, fy)):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = heads[f"lin{k}.model.1.weight"].double().view(1, -1, 1, 1)
        total += ((a - b) ** 2 * w).sum(1).mean(dim=(1, 2))
    return total


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_matches_hand_computation(files, models, net):
    x, y = _images(net)
    got = models[net](x, y)
    ref = _hand_lpips(net, files[net]["feats"], files[net]["heads"], x, y)
    assert got.shape == (2,) and got.dtype == torch.float32
    assert (ref > 1e-3).all()  # a meaningful, non-degenerate comparison
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
    # per-layer terms sum to the total, and every tap contributes
    per = models[net].per_layer(x, y)
    assert per.shape == (2, 5) and (per > 0).all()
    torch.testing.assert_close(per.sum(1), got, rtol=1e-6, atol=0)


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_identical_images_give_zero(models, net):
    x, _ = _images(net, seed=3)
    d = models[net](x, x.clone())
    assert d.shape == (2,)
    assert d.abs().max().item() < 1e-7


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_layouts_and_formats_agree(files, models, net):
    x, y = _images(net, seed=4)
    f = files[net]
    ref = models[net](x, y)  # full-model .pth + heads .pth
    combos = ((f["feat_pth"], f["heads_pth"]), (f["feat_st"], f["heads_st"]), (f["full_pth"], f["heads_st"]))
    for backbone, heads in combos:
        other = LPIPS(net, backbone, heads)
        assert torch.equal(other(x, y), ref), (backbone.name, heads.name)
    # the loaded tensors are exactly the file's, under the torchvision / lpips names
    m = models[net]
    for k, v in f["feats"].items():
        assert torch.equal(m.net.features.state_dict()[k], v)
    for k, v in f["heads"].items():
        assert torch.equal(m.state_dict()[k], v)


def test_frozen_eval_and_gradient_reaches_input(models):
    m = models["vgg"]
    assert not m.training
    assert all(not p.requires_grad for p in m.parameters())
    assert sum(p.numel() for p in m.net.parameters()) == 14_714_688  # torchvision vgg16().features
    assert sum(p.numel() for p in models["alex"].net.parameters()) == 2_469_696  # alexnet().features
    x, y = _images("vgg", b=1, seed=5)
    x = x.clone().requires_grad_(True)
    m(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())
    m.train()  # no dropout / batch-norm inside: train mode cannot change the value
    try:
        torch.testing.assert_close(m(x.detach(), y), models["vgg"](x.detach(), y), rtol=0, atol=0)
    finally:
        m.eval()


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_grows_with_noise_strength(models, net):
    img = _smooth_image(net)
    noise = torch.randn(img.shape, generator=torch.Generator().manual_seed(7))
    levels = [0.03, 0.1, 0.3]
    noisy = torch.cat([(img + s * noise).clamp(0, 1) for s in levels])
    d = models[net](img.expand_as(noisy), noisy)
    assert d[0] > 0 and d[0] < d[1] < d[2], d.tolist()


def test_float64_input_and_input_errors(models):
    x, y = _images("vgg", seed=6)
    torch.testing.assert_close(models["vgg"](x.double(), y.double()), models["vgg"](x, y))
    with pytest.raises(ValueError, match="same shape"):
        models["vgg"](x, y[:1])
    with pytest.raises(ValueError, match="too small"):
        models["alex"](x[..., :24, :24], y[..., :24, :24])  # fine for vgg, below AlexNet's 31x31


class _NotATensor:
    pass


@contextlib.contextmanager
def _one_line_error(exc, match):
    with pytest.raises(exc, match=match) as info:
        yield
    assert "\n" not in str(info.value), str(info.value)


def test_file_errors(files, tmp_path):
    f = files["alex"]
    with _one_line_error(ValueError, match="unknown net 'squeeze'"):
        LPIPS("squeeze", f["full_pth"], f["heads_pth"])
    missing = tmp_path / "nope.pth"
    with _one_line_error(FileNotFoundError, match="nope.pth"):
        LPIPS("alex", missing, f["heads_pth"])
    with _one_line_error(FileNotFoundError, match="nope.pth"):
        LPIPS("alex", f["full_pth"], missing)

    # one key dropped: the message names it and the file
    dropped = dict(f["full"])
    del dropped["features.8.bias"]
    p = tmp_path / "dropped.pth"
    torch.save(dropped, p)
    with _one_line_error(ValueError, match=r"dropped\.pth.*'features\.8\.bias' missing"):
        LPIPS("alex", p, f["heads_pth"])

    # wrong shape, in safetensors: names the key and both shapes
    bad = dict(f["feats"])
    bad["6.weight"] = torch.zeros(384, 192, 5, 5)
    p = tmp_path / "badshape.safetensors"
    save_file(bad, str(p))
    with _one_line_error(ValueError, match=r"'6\.weight' has shape \(384, 192, 5, 5\), expected \(384, 192, 3, 3\)"):
        LPIPS("alex", p, f["heads_pth"])

    # the other net's files
    with _one_line_error(ValueError, match=r"'features\.0\.weight' has shape \(64, 3, 11, 11\)"):
        LPIPS("vgg", f["full_pth"], files["vgg"]["heads_pth"])
    with _one_line_error(ValueError, match=r"heads file .*'lin1\.model\.1\.weight' has shape \(1, 128, 1, 1\)"):
        LPIPS("alex", f["full_pth"], files["vgg"]["heads_pth"])

    # an unexpected key inside the features namespace (e.g. a BatchNorm of a _bn model)
    extra = dict(f["feats"])
    extra["1.running_mean"] = torch.zeros(64)
    p = tmp_path / "extra.pth"
    torch.save(extra, p)
    with _one_line_error(ValueError, match=r"unexpected key '1\.running_mean'"):
        LPIPS("alex", p, f["heads_pth"])

    # heads with one key dropped
    heads = dict(f["heads"])
    del heads["lin3.model.1.weight"]
    p = tmp_path / "heads_dropped.safetensors"
    save_file(heads, str(p))
    with _one_line_error(ValueError, match=r"heads_dropped\.safetensors.*'lin3\.model\.1\.weight' missing"):
        LPIPS("alex", f["full_pth"], p)

    # unreadable, pickle-unsafe, and non-dict files
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with _one_line_error(ValueError, match="garbage.pth"):
        LPIPS("alex", garbage, f["heads_pth"])
    garbage_st = tmp_path / "garbage.safetensors"
    garbage_st.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with _one_line_error(ValueError, match="garbage.safetensors"):
        LPIPS("alex", garbage_st, f["heads_pth"])
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"0.weight": _NotATensor()}, unsafe)
    with _one_line_error(ValueError, match=r"unsafe\.pth is not a plain tensor state dict.*_NotATensor"):
        LPIPS("alex", unsafe, f["heads_pth"])
    notdict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), notdict)
    with _one_line_error(ValueError, match=r"tensor\.pth does not hold a flat"):
        LPIPS("alex", notdict, f["heads_pth"])
