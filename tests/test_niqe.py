"""NIQE (docs/methods.md 3): the feature extraction against hand computations, model files, fitting, and the acceptance
check: NIQE grows with the diffbir degradation strength of the same real faces."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import gamma as gamma_fn
from scipy.stats import spearmanr
from typer.testing import CliRunner

from facereward.cli import app
from facereward.measures.niqe import (
    NIQE,
    NIQEModel,
    _resize_matrix,
    aggd_fit,
    fit_niqe_model,
    gaussian_window,
    load_niqe_model,
    luminance,
    matlab_imresize,
    mscn,
    niqe_distance,
    niqe_features,
    save_niqe_model,
)


def test_gaussian_window_is_fspecial():
    w = gaussian_window().numpy()
    ax = np.arange(7) - 3
    g = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * (7 / 6) ** 2))
    assert w.shape == (7, 7) and np.isclose(w.sum(), 1.0)
    assert np.allclose(w, g / g.sum(), atol=1e-15)
    assert w[3, 3] == pytest.approx(1 / g.sum())


def test_mscn_of_a_small_array_by_hand():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(5, 6)).astype(np.float64)
    w = gaussian_window().numpy()
    padded = np.pad(image, 3, mode="edge")  # MATLAB imfilter(..., 'replicate')
    padded_sq = np.pad(image**2, 3, mode="edge")
    mu, ex2 = np.zeros_like(image), np.zeros_like(image)
    for i in range(5):
        for j in range(6):
            mu[i, j] = (padded[i : i + 7, j : j + 7] * w).sum()
            ex2[i, j] = (padded_sq[i : i + 7, j : j + 7] * w).sum()
    sigma = np.sqrt(np.abs(ex2 - mu**2))
    expected = (image - mu) / (sigma + 1)
    got, got_sigma = mscn(torch.from_numpy(image)[None, None])
    assert np.allclose(got[0, 0].numpy(), expected, atol=1e-12)
    assert np.allclose(got_sigma[0, 0].numpy(), sigma, atol=1e-12)


def _sample_aggd(alpha: float, beta_l: float, beta_r: float, n: int, rng) -> np.ndarray:
    """AGGD samples: |x| = beta * G^(1/alpha), G ~ Gamma(1/alpha); the left side has mass beta_l / (beta_l + beta_r)."""
    g = rng.gamma(1 / alpha, 1.0, size=n) ** (1 / alpha)
    left = rng.random(n) < beta_l / (beta_l + beta_r)
    return np.where(left, -beta_l * g, beta_r * g)


@pytest.mark.parametrize("alpha,beta_l,beta_r", [(2.0, 1.0, 1.0), (0.8, 0.5, 1.5), (1.4, 2.0, 1.0)])
def test_aggd_fit_recovers_known_parameters(alpha, beta_l, beta_r):
    x = _sample_aggd(alpha, beta_l, beta_r, 400_000, np.random.default_rng(1))
    a, bl, br = (v.item() for v in aggd_fit(torch.from_numpy(x)[None]))
    assert a == pytest.approx(alpha, rel=0.03)
    assert bl == pytest.approx(beta_l, rel=0.03) and br == pytest.approx(beta_r, rel=0.03)


def test_aggd_fit_is_estimateaggdparam_by_hand():
    x = np.random.default_rng(2).standard_t(5, size=5000)  # any sample: the formulas of estimateaggdparam.m
    gam = np.arange(0.2, 10.0005, 0.001)
    r_gam = gamma_fn(2 / gam) ** 2 / (gamma_fn(1 / gam) * gamma_fn(3 / gam))
    left, right = np.sqrt(np.mean(x[x < 0] ** 2)), np.sqrt(np.mean(x[x > 0] ** 2))
    g = left / right
    rhat = np.mean(np.abs(x)) ** 2 / np.mean(x**2)
    rhatnorm = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    alpha = gam[np.argmin((r_gam - rhatnorm) ** 2)]
    scale = np.sqrt(gamma_fn(1 / alpha) / gamma_fn(3 / alpha))
    a, bl, br = (v.item() for v in aggd_fit(torch.from_numpy(x)[None]))
    assert a == pytest.approx(alpha, abs=1e-9)
    assert bl == pytest.approx(left * scale, rel=1e-10) and br == pytest.approx(right * scale, rel=1e-10)
    # a side with no samples: NaN betas and the grid's first alpha, as MATLAB's min over NaN
    a, bl, br = aggd_fit(torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64))
    assert a.item() == pytest.approx(0.2) and math.isnan(bl.item()) and not math.isnan(br.item())


def test_block_features_by_hand():
    """The 36 features of a 16 px gray image with 16 px blocks (one block per scale), feature by feature."""
    image = torch.from_numpy(np.random.default_rng(3).integers(0, 256, size=(16, 16)).astype(np.float64))
    feats, sharp = niqe_features(image[None, None] / 255, block_size=16)
    assert feats.shape == (1, 1, 36) and sharp.shape == (1, 1)
    expected = []
    y = image[None, None]
    for scale in (1, 2):
        m, sigma = mscn(y)
        block = m[0, 0]
        if scale == 1:
            assert sharp[0, 0].item() == pytest.approx(sigma.mean().item())
        a, bl, br = (v.item() for v in aggd_fit(block.reshape(1, -1)))
        expected += [a, (bl + br) / 2]
        for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
            shifted = np.roll(block.numpy(), (dy, dx), axis=(0, 1))  # MATLAB circshift
            a, bl, br = (v.item() for v in aggd_fit(torch.from_numpy(block.numpy() * shifted).reshape(1, -1)))
            expected += [a, (br - bl) * gamma_fn(2 / a) / gamma_fn(1 / a), bl, br]
        y = matlab_imresize(y, 0.5)
    assert np.allclose(feats[0, 0].numpy(), expected, rtol=1e-9, equal_nan=True)


def test_matlab_imresize_half():
    # MATLAB's antialiased bicubic taps for scale 0.5: 0.5 * cubic(0.5 d), d = +-0.5, +-1.5, +-2.5, +-3.5
    taps = [-0.01171875, -0.03515625, 0.11328125, 0.43359375, 0.43359375, 0.11328125, -0.03515625, -0.01171875]
    m = _resize_matrix(32, 0.5, torch.device("cpu"), torch.float64)
    assert m.shape == (16, 32) and torch.allclose(m.sum(1), torch.ones(16, dtype=torch.float64))
    # output 9 (1-based) sits at input 17.5: taps on inputs 14..21
    assert np.allclose(m[8, 13:21].numpy(), taps) and m[8, :13].abs().sum() == 0 and m[8, 21:].abs().sum() == 0
    # borders are mirrored: output 1 sits at 1.5, its taps on inputs -2..5 fold onto 3 2 1 1 2 3 4 5
    assert np.allclose(m[0, :5].numpy(), [taps[2] + taps[3], taps[1] + taps[4], taps[0] + taps[5], taps[6], taps[7]], atol=1e-15)
    assert m[0, 5:].abs().sum() == 0
    ramp = torch.arange(1, 33, dtype=torch.float64).view(1, 1, 1, 32).expand(1, 1, 4, 32)
    out = matlab_imresize(ramp, 0.5)
    assert out.shape == (1, 1, 2, 16)
    assert torch.allclose(out[0, 0, 0, 2:-2], torch.arange(3, 15, dtype=torch.float64) * 2 - 0.5)  # linear stays linear


def test_luminance_channels():
    rgb = torch.tensor([[[[1.0]], [[0.5]], [[0.0]]]])
    y = luminance(rgb, "y").item()
    gray = luminance(rgb, "gray").item()
    assert y == round(16 + (65.481 * 255 + 128.553 * 128) / 255)  # BasicSR Y of the 8-bit levels (255, 128, 0), rounded
    assert gray == round(0.298936021293775 * 255 + 0.587043074451121 * 128)
    with pytest.raises(ValueError, match="channel"):
        luminance(rgb, "rgb")


def test_model_files_round_trip_and_errors(tmp_path):
    import scipy.io

    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 36))
    model = NIQEModel(a.mean(0), np.cov(a, rowvar=False), {"block_size": 48, "channel": "gray"})
    for name in ("m.safetensors", "m.npz"):
        loaded = load_niqe_model(save_niqe_model(tmp_path / name, model))
        assert torch.equal(loaded.mu, model.mu) and torch.equal(loaded.cov, model.cov)
    assert load_niqe_model(tmp_path / "m.safetensors").meta == {"block_size": 48, "channel": "gray"}
    scipy.io.savemat(tmp_path / "modelparameters.mat", {"mu_prisparam": model.mu.numpy()[None], "cov_prisparam": model.cov.numpy()})
    loaded = load_niqe_model(tmp_path / "modelparameters.mat")
    assert torch.allclose(loaded.mu, model.mu) and loaded.meta == {}
    assert NIQE(tmp_path / "m.safetensors").block_size == 48 and NIQE(tmp_path / "modelparameters.mat").block_size == 96
    np.savez(tmp_path / "bad.npz", mu=np.zeros(36))
    with pytest.raises(ValueError, match="expected keys mu_prisparam and cov_prisparam .found: mu."):
        load_niqe_model(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="no such NIQE model"):
        load_niqe_model(tmp_path / "nope.mat")
    with pytest.raises(ValueError, match="36 values"):
        NIQEModel(np.zeros(18), np.eye(18))


def test_distance_is_the_mvg_formula():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(1, 9, 36))
    mu_p, a = rng.normal(size=36), rng.normal(size=(80, 36))
    cov_p = np.cov(a, rowvar=False)
    mu, cov = feats[0].mean(0), np.cov(feats[0], rowvar=False)
    d = mu_p - mu
    expected = math.sqrt(d @ np.linalg.pinv((cov_p + cov) / 2) @ d)
    got = niqe_distance(torch.from_numpy(feats), torch.from_numpy(mu_p), torch.from_numpy(cov_p)).item()
    assert got == pytest.approx(expected, rel=1e-8)
    # rows with a NaN feature leave the covariance but not the (NaN-ignoring) mean
    feats[0, 0, 5] = np.nan
    mu = np.nanmean(feats[0], axis=0)
    cov = np.cov(feats[0, 1:], rowvar=False)
    d = mu_p - mu
    expected = math.sqrt(d @ np.linalg.pinv((cov_p + cov) / 2) @ d)
    assert niqe_distance(torch.from_numpy(feats), torch.from_numpy(mu_p), torch.from_numpy(cov_p)).item() == pytest.approx(expected, rel=1e-8)


def test_small_images_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="smaller than one 96x96 block"):
        niqe_features(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="even integer"):
        niqe_features(torch.rand(1, 3, 64, 64), block_size=33)


# ---- acceptance: NIQE grows with degradation of the same real faces --------------------------------------------------

RELEASE_MODEL = Path(__file__).resolve().parent.parent / ".cache" / "niqe" / "niqe_pris_params.npz"
STRENGTHS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # diffbir: blur 0.1-12, downsample 1-12x, ...
MILD_STRENGTHS = [0.0, 0.02, 0.04, 0.06, 0.08, 0.1]


def _faces() -> list[np.ndarray]:
    """skimage's astronaut (a real 512 px photo of one face) and 3 toy faces of held-out identities at 384 px."""
    from skimage import data

    from facereward.data.toyfaces import ToyFaceWorld

    faces = [data.astronaut().astype(np.float32) / 255]
    return faces + [f.image for f in ToyFaceWorld(seed=0, n_identities=200).sample(3, size=384, split="test", seed=10)]


def _scores(model: NIQE, strengths: list[float]) -> np.ndarray:
    """NIQE of every face at every diffbir strength: (face, strength)."""
    from facereward.data.degradation import degrade

    scores = []
    for i, face in enumerate(_faces()):
        degraded = [face if s == 0 else degrade(face, "diffbir", seed=0, index=i, strength=s)[0] for s in strengths]
        scores.append(model(torch.from_numpy(np.stack(degraded).transpose(0, 3, 1, 2).copy())).numpy())
    return np.array(scores)


@pytest.fixture(scope="module")
def release_model() -> NIQEModel:
    if not RELEASE_MODEL.is_file():  # scripts/test.sh fetches it; CI always has it
        pytest.skip(f"needs {RELEASE_MODEL} (python scripts/fetch_niqe_release.py)")
    return load_niqe_model(RELEASE_MODEL)


def test_release_model_loads_as_published(release_model):
    assert release_model.mu.shape == (36,) and release_model.cov.shape == (36, 36)
    assert release_model.meta == {} and torch.allclose(release_model.cov, release_model.cov.T)  # 96 px blocks, Y


def test_niqe_grows_with_degradation_of_real_faces(release_model):
    """With the release's pristine model NIQE ranks the whole diffbir range, per face and on average."""
    scores = _scores(NIQE(release_model), STRENGTHS)
    quality = [1 - s for s in STRENGTHS]
    per_face = [spearmanr(quality, row).statistic for row in scores]
    assert spearmanr(quality, scores.mean(axis=0)).statistic <= -0.9, scores.round(2).tolist()
    assert min(per_face) >= -1 and max(per_face) <= -0.9, per_face
    assert (scores[:, 0] < scores[:, 1]).all() and scores[0, 0] < 5  # the clean astronaut is natural to the release


@pytest.fixture(scope="module")
def pristine_faces_model():
    """The pristine MVG fitted on HQ faces: 40 toy faces of training identities at 256 px and skimage's astronaut,
    at the release's 96 px blocks and 0.75 sharpness threshold."""
    from skimage import data

    from facereward.data.toyfaces import ToyFaceWorld

    faces = [f.image for f in ToyFaceWorld(seed=0, n_identities=200).sample(40, size=256, split="train", seed=1)]
    return fit_niqe_model([*faces, data.astronaut().astype(np.float32) / 255])


def test_fitted_model_ranks_mild_degradations(pristine_faces_model):
    """A model fitted on these mostly procedural (smooth) faces separates clean from mildly degraded; it finds the
    smoothness of strong degradations natural, so only the mild range is asserted (README: evaluate, NIQE)."""
    scores = _scores(NIQE(pristine_faces_model), MILD_STRENGTHS)
    quality = [1 - s for s in MILD_STRENGTHS]
    per_face = [spearmanr(quality, row).statistic for row in scores]
    assert spearmanr(quality, scores.mean(axis=0)).statistic <= -0.9, scores.round(2).tolist()
    assert np.mean(per_face) <= -0.85 and max(per_face) <= -0.7, per_face
    assert (scores[:, 0] < scores[:, -1]).all() and scores[:, 0].max() < 10  # every clean face beats its degraded self


# ---- the command line ----------------------------------------------------------------------------------------------


def test_fit_niqe_command_and_evaluate_column(tmp_path):
    from facereward.data.imageio import write_image
    from facereward.data.testset import write_toy_testset
    from facereward.evaluate import EvaluateConfig, evaluate

    testset = write_toy_testset(tmp_path / "set", n=4, size=64, seed=0)
    hq = tmp_path / "pristine"
    from facereward.data.toyfaces import ToyFaceWorld

    for i, face in enumerate(ToyFaceWorld(seed=0, n_identities=200).sample(12, size=64, split="train", seed=3)):
        write_image(hq / f"{i:03d}.png", face.image)
    (hq / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "faces-niqe.safetensors"
    result = CliRunner().invoke(app, ["fit-niqe", str(hq), str(out), "--block-size", "32", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "12 images" in result.output and "broken.png" in result.output
    assert load_niqe_model(out).meta["block_size"] == 32
    res = evaluate(EvaluateConfig(testset=str(testset), out_dir=str(tmp_path / "o"), images={"gt": str(testset / "hq")},
                                  options={"niqe": {"model": str(out)}}, measures=["psnr", "niqe"], identity="none",
                                  progress=False))
    column = "NIQE (faces-niqe)"
    assert list(res.rows["LQ"]) == ["PSNR", column] and res.judges["niqe"] == str(out)
    assert res.rows["LQ"][column] > res.rows["gt"][column]
    cli = CliRunner().invoke(app, ["evaluate", "--testset", str(testset), "--niqe-model", str(out), "--metrics", "niqe",
                                   "--out-dir", str(tmp_path / "o2"), "--no-progress"])
    assert cli.exit_code == 0, cli.output
    assert f"| | {column} |" in cli.output and f"| LQ | {res.rows['LQ'][column]:.2f} |" in cli.output
    bad = CliRunner().invoke(app, ["fit-niqe", str(hq), str(tmp_path / "m.txt")])
    assert bad.exit_code == 2 and ".safetensors or .npz" in bad.output
