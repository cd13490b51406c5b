"""FID / KID and the pytorch-fid Inception-v3 re-implementation (docs/methods.md section 3).

References used:

* FID: the closed form for Gaussians, ``||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``,
  evaluated here independently of ``scipy.linalg.sqrtm`` through symmetric eigendecompositions (and, for
  diagonal covariances, by hand: ``sum(s1 + s2 - 2 sqrt(s1 s2))``).
* KID: torch-fidelity's / clean-fid's unbiased MMD^2 with k(x, y) = (x.y/d + 1)^3, written out below
  as explicit double loops over i != j.
* Inception: real key names and shapes of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
  (torchvision ``Inception3`` naming, ``aux_logits=False``, 1008-way fc), and torchvision's documented
  parameter count of Inception-v3 (27,161,264 with AuxLogits and a 1000-way fc).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facereward.measures.fid import (
    CallableFeatures,
    FeatureExtractor,
    FIDInceptionV3,
    InceptionV3Features,
    compute_features,
    feature_stats,
    fid,
    fid_from_features,
    fid_from_stats,
    kid,
    kid_from_features,
    load_fid_inception_state_dict,
    load_stats,
    save_stats,
)



# ----------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------
def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _fid_reference(mu1, s1, mu2, s2) -> float:
    r1 = _psd_sqrt(s1)
    middle = _psd_sqrt(r1 @ s2 @ r1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(middle))


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12)) + 3.0
    assert abs(fid_from_features(f, f)) < 1e-6
    assert abs(fid_from_features(torch.from_numpy(f), torch.from_numpy(f).float())) < 1e-3  # torch input ok


def test_fid_closed_form_diagonal_gaussians_exact_stats():
    mu1 = np.array([0.0, 1.0, -2.0, 0.5])
    mu2 = np.array([1.0, 1.5, 0.0, 0.5])
    s1 = np.array([1.0, 4.0, 0.25, 2.0])
    s2 = np.array([9.0, 1.0, 0.25, 0.5])
    by_hand = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    # = (1 + 0.25 + 4 + 0) + ((1+9-6) + (4+1-4) + 0 + (2+0.5-2)) = 5.25 + 5.5
    assert by_hand == pytest.approx(10.75)
    assert fid_from_stats(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(10.75, abs=1e-9)


def test_fid_matches_independent_closed_form_full_covariance():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    ref = _fid_reference(mu1, s1, mu2, s2)
    assert fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    assert fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(fid_from_stats(mu2, s2, mu1, s1), rel=1e-8)


def test_fid_from_samples_approaches_closed_form():
    rng = np.random.default_rng(2)
    n = 20000
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([0.5, 0.0, 2.0])
    sd1, sd2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 2.0, 1.0])
    f1 = mu1 + sd1 * rng.normal(size=(n, 3))
    f2 = mu2 + sd2 * rng.normal(size=(n, 3))
    exact = np.sum((mu1 - mu2) ** 2) + np.sum(sd1**2 + sd2**2 - 2 * sd1 * sd2)  # 1.25 + 1.25 = 2.5
    assert exact == pytest.approx(2.5)
    assert fid_from_features(f1, f2) == pytest.approx(exact, rel=0.03)
    # and exactly the closed form of the fitted Gaussians (mean, np.cov rowvar=False)
    ref = _fid_reference(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert fid_from_features(f1, f2) == pytest.approx(ref, rel=1e-9)


def test_fid_needs_two_images_and_warns_when_covariance_singular():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="at least 2 images"):
        fid_from_features(rng.normal(size=(1, 4)), rng.normal(size=(10, 4)))
    with pytest.warns(UserWarning, match="singular"):
        value = fid_from_features(rng.normal(size=(6, 16)), rng.normal(size=(6, 16)) + 1.0)
    assert math.isfinite(value) and value > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when N > D
        fid_from_features(rng.normal(size=(40, 4)), rng.normal(size=(40, 4)))


def test_fid_sqrtm_fixes_as_pytorch_fid(monkeypatch):
    import facereward.measures.fid as fidmod

    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 1.0])
    mu = np.zeros(2)
    calls = []

    def nan_then_real(a):  # the singular-product path: not finite -> retry with eps * I on both
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else np.diag(np.sqrt(np.diag(a)))

    monkeypatch.setattr(fidmod, "_sqrtm", nan_then_real)
    with pytest.warns(UserWarning, match="singular product"):
        value = fid_from_stats(mu, s1, mu, s2, eps=1e-2)
    np.testing.assert_allclose(calls[1], (s1 + 1e-2 * np.eye(2)) @ (s2 + 1e-2 * np.eye(2)))
    assert value == pytest.approx(5 + 5 - 2 * 2 * math.sqrt(1.01 * 4.01))

    # complex output: real part when the diagonal's imaginary part is negligible, error otherwise
    monkeypatch.setattr(fidmod, "_sqrtm", lambda a: np.diag([2.0, 2.0]) + 1e-5j)
    assert fid_from_stats(mu, s1, mu, s2) == pytest.approx(2.0)
    monkeypatch.setattr(fidmod, "_sqrtm", lambda a: np.diag([2.0 + 0.5j, 2.0]))
    with pytest.raises(ValueError, match="imaginary"):
        fid_from_stats(mu, s1, mu, s2)


def test_fid_stats_roundtrip(tmp_path):
    rng = np.random.default_rng(4)
    f1, f2 = rng.normal(size=(50, 5)), rng.normal(size=(60, 5)) + 0.3
    mu, sigma = feature_stats(f2)
    save_stats(tmp_path / "ref.npz", mu, sigma)
    mu_r, sigma_r = load_stats(tmp_path / "ref.npz")
    assert fid_from_stats(*feature_stats(f1), mu_r, sigma_r) == pytest.approx(fid_from_features(f1, f2), rel=1e-12)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_stats(tmp_path / "nope.npz")


# ----------------------------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------------------------
def _mmd2_by_hand(x: np.ndarray, y: np.ndarray, degree=3, gamma=None, coef0=1.0) -> float:
    m, d = x.shape
    g = 1.0 / d if gamma is None else gamma

    def k(a, b):
        return (g * float(np.dot(a, b)) + coef0) ** degree

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_hand_computation_on_tiny_set():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 0.7
    mean, std = kid_from_features(x, y, subsets=1, subset_size=5)
    assert mean == pytest.approx(_mmd2_by_hand(x, y), rel=1e-10)
    assert std == 0.0
    mean2, _ = kid_from_features(x, y, subsets=1, subset_size=5, degree=2, gamma=0.5, coef0=0.3)
    assert mean2 == pytest.approx(_mmd2_by_hand(x, y, degree=2, gamma=0.5, coef0=0.3), rel=1e-10)
    # subset_size larger than the sets is clipped; whole-set subsets are permutations -> same value
    mean3, std3 = kid_from_features(x, y, subsets=4, subset_size=1000)
    assert mean3 == pytest.approx(mean, rel=1e-10) and std3 == pytest.approx(0.0, abs=1e-12)


def test_kid_subsets_as_torch_fidelity():
    # torch-fidelity: rng = RandomState(seed); per subset, rows of f1 then rows of f2 drawn without
    # replacement; KID = mean and np.std (ddof 0) of the per-subset unbiased MMD^2
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(9, 4)), rng.normal(size=(7, 4)) + 0.3
    state = np.random.RandomState(3)
    mmds = []
    for _ in range(4):
        xs = x[state.choice(9, 5, replace=False)]
        ys = y[state.choice(7, 5, replace=False)]
        mmds.append(_mmd2_by_hand(xs, ys))
    mean, std = kid_from_features(x, y, subsets=4, subset_size=5, seed=3)
    assert mean == pytest.approx(np.mean(mmds), rel=1e-10)
    assert std == pytest.approx(np.std(mmds), rel=1e-10)
    assert std > 0


def test_kid_identical_near_zero_shifted_positive():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(1200, 16))
    b = rng.normal(size=(1200, 16))
    shifted = rng.normal(size=(1200, 16)) + 0.5
    k_shift, std_shift = kid_from_features(a, shifted, subsets=10, subset_size=150)
    assert k_shift > 0.5 and k_shift > 10 * std_shift
    # a set against itself: the estimator's only offset is the O(1/m) term from the shared rows
    # (k(x_i, x_i) enters K_XY but not K_XX), so it vanishes as the subsets grow
    k_self_small, _ = kid_from_features(a[:300], a[:300], subsets=1, subset_size=300)
    k_self, _ = kid_from_features(a, a, subsets=1, subset_size=1200)
    assert abs(k_self) < 0.02 * k_shift
    assert abs(k_self) < abs(k_self_small) / 3  # ~1/m: 4x the rows, ~1/4 the offset
    k_same, _ = kid_from_features(a, b, subsets=10, subset_size=150)  # same distribution, other samples
    assert abs(k_same) < 0.05 * k_shift
    # seeded: same seed same value, another seed another draw
    assert kid_from_features(a, shifted, subsets=3, subset_size=50, seed=1) == kid_from_features(
        a, shifted, subsets=3, subset_size=50, seed=1
    )
    assert kid_from_features(a, shifted, subsets=3, subset_size=50, seed=1) != kid_from_features(
        a, shifted, subsets=3, subset_size=50, seed=2
    )
    with pytest.raises(ValueError, match="at least 2"):
        kid_from_features(a[:1], b)


# ----------------------------------------------------------------------------------------------
# compute_features and the conveniences, with a cheap extractor
# ----------------------------------------------------------------------------------------------
class _MeanColour:
    name = "mean-colour"

    def __init__(self):
        self.batch_sizes = []

    def features(self, images):
        self.batch_sizes.append(images.shape[0])
        return images.mean(dim=(2, 3)).to(torch.float64)


def test_compute_features_batches_and_iterables():
    torch.manual_seed(0)
    imgs = torch.rand(7, 3, 8, 8)
    ext = _MeanColour()
    assert isinstance(ext, FeatureExtractor)
    f = compute_features(ext, imgs, batch_size=3)
    assert f.shape == (7, 3) and f.dtype == np.float64
    assert ext.batch_sizes == [3, 3, 1]
    np.testing.assert_allclose(f, imgs.mean(dim=(2, 3)).double().numpy())
    # an iterable of single images and of batches gives the same features
    ext2 = _MeanColour()
    np.testing.assert_allclose(compute_features(ext2, iter(list(imgs)), batch_size=4), f)
    assert ext2.batch_sizes == [4, 3]
    np.testing.assert_allclose(compute_features(_MeanColour(), [imgs[:2], imgs[2:]], batch_size=50), f)
    wrapped = CallableFeatures("dlib-resnet128", lambda x: x.mean(dim=(2, 3)))
    assert wrapped.name == "dlib-resnet128"
    np.testing.assert_allclose(compute_features(wrapped, imgs), f, rtol=1e-6)


def test_fid_and_kid_conveniences():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(64, 3, 4, 4, generator=g) * 0.5
    b = torch.rand(64, 3, 4, 4, generator=g) * 0.5 + 0.4
    ext = _MeanColour()
    fa, fb = compute_features(ext, a), compute_features(ext, b)
    assert fid(ext, a, b, batch_size=16) == pytest.approx(fid_from_features(fa, fb), rel=1e-12)
    assert fid(ext, a, b) > 10 * abs(fid(ext, a, a))
    assert kid(ext, a, b, subsets=5, subset_size=32) == kid_from_features(fa, fb, subsets=5, subset_size=32)


# ----------------------------------------------------------------------------------------------
# Inception-v3 (pytorch-fid FID variant)
# ----------------------------------------------------------------------------------------------
# Real keys of pt_inception-2015-12-05-6726825d.pth (torchvision Inception3 names) and their shapes.
REAL_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.weight": (32,),
    "Conv2d_1a_3x3.bn.bias": (32,),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch1x1.bn.running_var": (320,),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
}
FC_KEYS = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}
# torchvision documents 27,161,264 parameters for Inception-v3 (AuxLogits + 1000-way fc); without
# AuxLogits (3,326,696) and that fc (2,049,000) the trunk has 21,785,568.
TRUNK_PARAMS = 27_161_264 - 3_326_696 - 2_049_000


def _meta_model() -> FIDInceptionV3:
    with torch.device("meta"):
        return FIDInceptionV3()


def test_inception_keys_and_shapes_match_pytorch_fid():
    model = _meta_model()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, shape in REAL_KEYS.items():
        assert shapes.get(k) == shape, k
    assert sum(p.numel() for p in model.parameters()) == TRUNK_PARAMS
    assert sum(k.endswith(".conv.weight") for k in shapes) == 94
    assert not any(k.startswith(("fc.", "AuxLogits.")) for k in shapes)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 94 and all(m.eps == 1e-3 for m in bns)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.bias is None for m in convs)


def _fake_shapes() -> dict[str, torch.Size]:
    shapes = {k: v.shape for k, v in _meta_model().state_dict().items() if not k.endswith("num_batches_tracked")}
    return {**shapes, **{k: torch.Size(s) for k, s in FC_KEYS.items()}}


def _fake_fid_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the exact pytorch-fid keys: the module's keys, perturbed, plus the 1008-way fc."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in _meta_model().state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue  # optional; the real file may or may not carry it
        if k.endswith("conv.weight"):
            fan_in = v.shape[1] * v.shape[2] * v.shape[3]
            t = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif k.endswith("bn.weight"):
            t = 1 + 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            t = 0.5 + torch.rand(v.shape, generator=g)
        else:  # bn.bias, running_mean
            t = 0.1 * torch.randn(v.shape, generator=g)
        sd[k] = t
    sd["fc.weight"] = 0.01 * torch.randn(FC_KEYS["fc.weight"], generator=g)
    sd["fc.bias"] = torch.zeros(FC_KEYS["fc.bias"])
    for k, shape in {**REAL_KEYS, **FC_KEYS}.items():
        assert tuple(sd[k].shape) == shape
    return sd


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-fake.pth"
    sd = _fake_fid_state_dict()
    torch.save(sd, path)
    return path, sd


@pytest.fixture(scope="module")
def inception(fake_weights):
    return InceptionV3Features(fake_weights[0])


def test_inception_loads_pth_and_gives_2048d_deterministic_features(fake_weights, inception):
    path, sd = fake_weights
    assert inception.name == "inception-v3 (pytorch-fid)"
    loaded = inception.model.state_dict()
    for k in ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var", "Mixed_6b.branch7x7_2.conv.weight"):
        torch.testing.assert_close(loaded[k], sd[k], rtol=0, atol=0)

    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 80, generator=g)
    hooks, seen = [], {}

    def grab(name):
        def hook(_module, args):
            seen[name] = args[0].detach().clone()

        return hook

    m = inception.model
    for name, mod in [("5b_in", m.Mixed_5b), ("5b_pool", m.Mixed_5b.branch_pool), ("6b_in", m.Mixed_6b),
                      ("6b_pool", m.Mixed_6b.branch_pool), ("7b_in", m.Mixed_7b), ("7b_pool", m.Mixed_7b.branch_pool),
                      ("7c_in", m.Mixed_7c), ("7c_pool", m.Mixed_7c.branch_pool), ("stem_in", m.Conv2d_1a_3x3)]:
        hooks.append(mod.register_forward_pre_hook(grab(name)))
    hooks.append(m.Conv2d_1a_3x3.register_forward_hook(lambda _m, _a, out: seen.__setitem__("stem_out", out.clone())))
    try:
        f1 = inception.features(x)
    finally:
        for h in hooks:
            h.remove()
    f2 = inception.features(x)
    assert f1.shape == (2, 2048) and f1.dtype == torch.float64
    assert torch.isfinite(f1).all() and f1.abs().sum() > 0
    torch.testing.assert_close(f1, f2, rtol=0, atol=0)  # deterministic
    assert not torch.allclose(f1[0], f1[1])  # different images, different features
    torch.testing.assert_close(inception.features(x[1:]), f1[1:], rtol=1e-5, atol=1e-6)  # eval BN: per-image

    # input pipeline: bilinear resize to 299 (align_corners=False), then [0,1] -> [-1,1]
    expected_in = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(seen["stem_in"], expected_in)
    # BasicConv2d as torchvision: conv (stride 2, no bias) -> BatchNorm(eps=1e-3, running stats) -> ReLU
    p = "Conv2d_1a_3x3."
    stem = F.conv2d(expected_in, sd[p + "conv.weight"], stride=2)
    stem = F.batch_norm(stem, sd[p + "bn.running_mean"], sd[p + "bn.running_var"], sd[p + "bn.weight"],
                        sd[p + "bn.bias"], training=False, eps=1e-3)
    torch.testing.assert_close(seen["stem_out"], F.relu(stem))
    # the TF-FID patches: avg pools exclude the padding; Mixed_7c's pool branch is a max pool
    for blk in ("5b", "6b", "7b"):
        inp = seen[f"{blk}_in"]
        torch.testing.assert_close(seen[f"{blk}_pool"], F.avg_pool2d(inp, 3, 1, 1, count_include_pad=False))
        assert not torch.allclose(seen[f"{blk}_pool"], F.avg_pool2d(inp, 3, 1, 1, count_include_pad=True))
    torch.testing.assert_close(seen["7c_pool"], F.max_pool2d(seen["7c_in"], 3, 1, 1))


def test_inception_loads_safetensors_identically(fake_weights, inception, tmp_path):
    from safetensors.torch import save_file

    _, sd = fake_weights
    st = tmp_path / "fid_inception.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    other = InceptionV3Features(st)
    x = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(other.features(x), inception.features(x), rtol=0, atol=0)


def test_inception_rejects_bad_weight_files(tmp_path):
    # every tensor a broadcast view of one scalar: right keys and shapes, a tiny file
    sd = {k: torch.zeros(()).expand(tuple(s)) for k, s in _fake_shapes().items()}
    ok = tmp_path / "ok.pth"
    torch.save(sd, ok)
    assert set(load_fid_inception_state_dict(ok)) >= set(REAL_KEYS)  # the cheap file itself is accepted
    p = tmp_path / "with_counters.pth"  # num_batches_tracked is optional either way
    torch.save({**sd, "Conv2d_1a_3x3.bn.num_batches_tracked": torch.tensor(7)}, p)
    assert int(load_fid_inception_state_dict(p)["Conv2d_1a_3x3.bn.num_batches_tracked"]) == 7
    for extra, match in [("AuxLogits.conv0.conv.weight", "torchvision"), ("Mixed_8a.conv.weight", "unexpected")]:
        p = tmp_path / "extra.pth"
        torch.save({**sd, extra: torch.zeros(1)}, p)
        with pytest.raises(ValueError, match=match):
            load_fid_inception_state_dict(p)
    missing = tmp_path / "does_not_exist.pth"
    with pytest.raises(FileNotFoundError, match="does_not_exist.pth"):
        InceptionV3Features(missing)

    no_key = dict(sd)
    del no_key["Mixed_7c.branch_pool.conv.weight"]
    p = tmp_path / "missing_key.pth"
    torch.save(no_key, p)
    with pytest.raises(ValueError, match=r"missing_key\.pth.*Mixed_7c\.branch_pool\.conv\.weight"):
        load_fid_inception_state_dict(p)

    bad_shape = dict(sd)
    bad_shape["Mixed_5b.branch_pool.conv.weight"] = torch.zeros(64, 192, 1, 1)
    p = tmp_path / "bad_shape.pth"
    torch.save(bad_shape, p)
    with pytest.raises(ValueError, match=r"bad_shape\.pth.*Mixed_5b\.branch_pool\.conv\.weight.*\(32, 192, 1, 1\)"):
        load_fid_inception_state_dict(p)

    imagenet_fc = dict(sd)
    imagenet_fc["fc.weight"] = torch.zeros(1000, 2048)
    p = tmp_path / "torchvision_like.pth"
    torch.save(imagenet_fc, p)
    with pytest.raises(ValueError, match="torchvision"):
        load_fid_inception_state_dict(p)

    p = tmp_path / "garbage.pth"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pth"):
        load_fid_inception_state_dict(p)


def test_inception_rejects_wrong_input_scale(inception):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        inception.features(torch.full((1, 3, 32, 32), 255.0))
    with pytest.raises(ValueError, match="channels"):
        inception.features(torch.rand(1, 4, 32, 32))
