"""DISTS (facereward.measures.dists) against tests/dists_reference.py, an independent float64 functional forward.

No real weights can be fetched here, so both files are fabricated in the released key layouts with fixed seeds:
torchvision's ``vgg16-397923af.pth`` (``features.N.weight/bias`` for the 13 convolutions, names and shapes written out
below from torchvision's architecture, plus small stand-in ``classifier.*`` tensors, which the loader ignores) and
pyiqa's ``DISTS_weights-f5e65c96.pth`` (exactly ``alpha`` and ``beta``, ``(1, 1475, 1, 1)``, non-negative like the
real file). The real VGG dims are needed (alpha/beta index its channels), so images are kept small.
"""

from __future__ import annotations

import math

import pytest
import torch
from dists_reference import dists_reference
from safetensors.torch import save_file

from facereward.measures.dists import DISTS, WEIGHT_FILES, L2Pool, l2pool_kernel

# (features index, out channels, in channels) of torchvision.models.vgg16's 3x3 convolutions
VGG_CONVS = [
    (0, 64, 3), (2, 64, 64),
    (5, 128, 64), (7, 128, 128),
    (10, 256, 128), (12, 256, 256), (14, 256, 256),
    (17, 512, 256), (19, 512, 512), (21, 512, 512),
    (24, 512, 512), (26, 512, 512), (28, 512, 512),
]  # fmt: skip
N_CH = 3 + 64 + 128 + 256 + 512 + 512


def _fake_vgg(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, cout, cin in VGG_CONVS:
        sd[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2.0 / (cin * 9)) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.05
    sd["classifier.0.weight"] = torch.randn(8, 4, generator=g)  # stand-in: ignored by the loader
    sd["classifier.0.bias"] = torch.randn(8, generator=g)
    return sd


def _fake_alpha_beta(seed: int) -> dict[str, torch.Tensor]:
    # shaped like the released file: large weights on the 3 input channels, most of beta exactly zero
    g = torch.Generator().manual_seed(seed)
    ab = {k: torch.rand(1, N_CH, 1, 1, generator=g) * 0.003 for k in ("alpha", "beta")}
    ab["beta"] *= torch.rand(1, N_CH, 1, 1, generator=g) > 0.7
    for t in ab.values():
        t[0, :3] = 0.02 + 0.002 * torch.rand(3, 1, 1, generator=g)
    return ab


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dists")
    vgg, ab = _fake_vgg(3), _fake_alpha_beta(4)
    paths = {
        "vgg_full": root / WEIGHT_FILES["backbone_path"],
        "vgg_feat": root / "vgg16_features.safetensors",
        "ab": root / WEIGHT_FILES["weights_path"],
        "ab_st": root / "dists.safetensors",
    }
    torch.save(vgg, paths["vgg_full"])
    save_file({k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")}, str(paths["vgg_feat"]))
    torch.save(ab, paths["ab"])
    save_file(ab, str(paths["ab_st"]))
    return {"vgg_sd": vgg, "ab_sd": ab, "root": root, **paths}


@pytest.fixture(scope="module")
def model(files):
    return DISTS(files["ab"], files["vgg_full"])


def _images(b=2, h=20, w=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(b, 3, h, w, generator=g)
    x = (gt + 0.15 * torch.randn(b, 3, h, w, generator=g)).clamp(0, 1)
    return x, gt


def test_weight_file_names():
    assert WEIGHT_FILES == {"weights_path": "DISTS_weights-f5e65c96.pth", "backbone_path": "vgg16-397923af.pth"}


def test_parity_with_reference(files, model):
    x, gt = _images()
    x[1] = gt[1] * 0.6 + 0.2  # a contrast change as well as noise
    out = model(x, gt)
    ref = dists_reference(x, gt, files["vgg_sd"], files["ab_sd"])
    assert out.shape == (2,) and out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=0), (out, ref)
    assert ((ref > 0.01) & (ref < 1)).all()  # a nontrivial comparison, not two near-zero numbers
    # odd size (L2 pooling rounds up) and batch of one
    x, gt = _images(b=1, h=17, w=23, seed=1)
    assert torch.allclose(model(x, gt).double(), dists_reference(x, gt, files["vgg_sd"], files["ab_sd"]), atol=1e-5, rtol=0)


def test_other_file_forms_load_the_same(files, model):
    other = DISTS(files["ab_st"], files["vgg_feat"])
    x, gt = _images(b=1, h=16, w=16, seed=2)
    assert torch.equal(other(x, gt), model(x, gt))


def test_identical_zero_symmetric_and_frozen(model):
    x, gt = _images(b=2, h=16, w=20, seed=3)
    assert torch.allclose(model(gt, gt), torch.zeros(2), atol=1e-6)
    assert torch.allclose(model(x, gt), model(gt, x), atol=1e-6)
    assert not model.training
    assert all(not t.requires_grad for t in list(model.parameters()) + list(model.buffers()))


def test_differentiable_in_x(model):
    x, gt = _images(b=2, h=16, w=16, seed=4)
    x.requires_grad_(True)
    model(x, gt).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_l2pool_kernel_and_hand_values():
    assert torch.allclose(l2pool_kernel(), torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16)
    pool = L2Pool(1)
    # constant 2: x^2 = 4; zero padding leaves 9/16, 12/16, 16/16 of the kernel inside -> sqrt(4 * that)
    out = pool(torch.full((1, 1, 4, 4), 2.0))
    s3 = math.sqrt(3.0)
    assert torch.allclose(out[0, 0], torch.tensor([[1.5, s3], [s3, 2.0]]), atol=1e-6)
    # an impulse 4 (x^2 = 16) at the centre of a 3x3 map: each of the 2x2 outputs sees it under a kernel corner (1/16)
    imp = torch.zeros(1, 1, 3, 3)
    imp[0, 0, 1, 1] = 4.0
    out = pool(imp)[0, 0]
    assert out.shape == (2, 2)
    assert torch.allclose(out, torch.tensor([[1.0, 1.0], [1.0, 1.0]]), atol=1e-5)  # sqrt(16 / 16)
    assert pool(torch.zeros(1, 1, 1, 1)).shape == (1, 1, 1, 1)


def test_inputs_are_raw_at_tap0_and_imagenet_normalised_for_vgg(model):
    z = torch.rand(1, 3, 8, 8)
    taps = model.taps(z)
    assert [t.shape[1] for t in taps] == [3, 64, 128, 256, 512, 512]
    assert [t.shape[-1] for t in taps] == [8, 8, 4, 2, 1, 1]
    assert torch.equal(taps[0], z)
    conv = model.features[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(model.features[:2]((z - mean) / std), torch.relu(conv((z - mean) / std)))


def _save(path, sd):
    torch.save(sd, path)
    return path


def test_weights_file_errors(files):
    root, vgg, ab = files["root"], files["vgg_full"], files["ab_sd"]
    bad = _save(root / "noalpha.pth", {"beta": ab["beta"]})
    with pytest.raises(ValueError, match=r"^DISTS weights file .*noalpha\.pth: key 'alpha' missing"):
        DISTS(bad, vgg)
    bad = _save(root / "shape.pth", {"alpha": ab["alpha"], "beta": ab["beta"][:, :1472]})
    with pytest.raises(ValueError, match=r"^DISTS weights file .*shape\.pth: key 'beta' has shape \(1, 1472, 1, 1\)"):
        DISTS(bad, vgg)
    bad = _save(root / "extra.pth", {**ab, "stage1.0.weight": torch.zeros(64, 3, 3, 3)})
    with pytest.raises(ValueError, match=r"^DISTS weights file .*extra\.pth: unexpected key 'stage1\.0\.weight'"):
        DISTS(bad, vgg)
    bad = _save(root / "wrapped.pth", {"params": ab})
    with pytest.raises(ValueError, match=r"^DISTS weights file .*wrapped\.pth does not hold a flat"):
        DISTS(bad, vgg)
    (root / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"^DISTS weights file .*garbage\.pth (is not a plain|could not be read)"):
        DISTS(root / "garbage.pth", vgg)
    with pytest.raises(FileNotFoundError, match=r"^DISTS weights file not found: .*nowhere\.pth"):
        DISTS(root / "nowhere.pth", vgg)
    with pytest.raises(ValueError, match="needs weights_path"):
        DISTS(None, vgg)


def test_backbone_file_errors(files):
    root, ab, vgg = files["root"], files["ab"], files["vgg_sd"]
    missing = {k: v for k, v in vgg.items() if k != "features.26.weight"}
    with pytest.raises(ValueError, match=r"^DISTS backbone file .*missing\.pth: key 'features\.26\.weight' missing"):
        DISTS(ab, _save(root / "missing.pth", missing))
    shape = {**vgg, "features.5.weight": vgg["features.5.weight"][:, :32]}
    with pytest.raises(ValueError, match=r"^DISTS backbone file .*bshape\.pth: key 'features\.5\.weight' has shape"):
        DISTS(ab, _save(root / "bshape.pth", shape))
    extra = {**vgg, "features.1.running_mean": torch.zeros(64)}
    with pytest.raises(ValueError, match=r"^DISTS backbone file .*bextra\.pth: unexpected key 'features\.1\.running_mean'"):
        DISTS(ab, _save(root / "bextra.pth", extra))
    with pytest.raises(FileNotFoundError, match=r"^DISTS backbone file not found: .*novgg\.pth"):
        DISTS(ab, root / "novgg.pth")
    with pytest.raises(ValueError, match="needs backbone_path"):
        DISTS(ab)


def test_bad_inputs(model):
    x = torch.rand(1, 3, 8, 8)
    for a, b in [(x, torch.rand(1, 3, 8, 9)), (x[:, :1], x[:, :1]), (x[0], x[0]), (x, x.numpy())]:
        with pytest.raises(ValueError, match="^DISTS: "):
            model(a, b)
