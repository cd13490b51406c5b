"""Rewards: the reward forms of the measures table, the weighted sum, and each built-in against its definition."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from facereward.config import ConfigError, load_config
from facereward.measures import (
    PAPER_WEIGHTS,
    Measure,
    MeasuresConfig,
    WeightedSum,
    create_measure,
    list_measures,
    register_measure,
    unregister_measure,
)
from facereward.measures.fullref import psnr, ssim
from facereward.measures.wavelet import lowpass_l1
from facereward.models.frm import FaceRewardModel
from facereward.plugins import import_plugins
from facereward.weights import WEIGHTS_DIR

TOY_FRM = str(WEIGHTS_DIR / "toy-frm")


def _images(seed: int = 0, n: int = 3, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(n, 3, size, size, generator=g)
    x = (gt + 0.1 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return x, gt


class Brightness:
    """A user reward as the README shows it: a class with two flags and a call."""

    differentiable = True
    needs_gt = False

    def __init__(self, gain: float = 1.0):
        self.gain = gain

    def __call__(self, images, gt=None, captions=None):
        return self.gain * images.mean(dim=(1, 2, 3))


@pytest.fixture
def brightness():
    register_measure("test-brightness", lambda env, gain=1.0: Brightness(gain), kind="NR", differentiable=True)
    yield
    unregister_measure("test-brightness")


def _rewards() -> set[str]:
    return {s.name for s in list_measures() if s.reward is not None}


def test_builtins_are_registered():
    assert {"frm", "lpips", "wavelet", "clipiqa", "ids", "psnr", "ssim"} <= _rewards()
    assert set(PAPER_WEIGHTS) <= _rewards()  # the paper's composite is all built in (clipiqa: tests/test_clipiqa.py)
    with pytest.raises(ValueError, match="measure 'identity' was renamed: use 'ids'"):
        create_measure("identity", as_reward=True)


def test_registry_round_trip_through_a_config(brightness):
    reward = create_measure("test-brightness", as_reward=True, gain=2.0)
    assert isinstance(reward, Measure) and reward.differentiable and not reward.needs_gt
    x, _ = _images()
    assert torch.allclose(reward(x), 2.0 * x.mean(dim=(1, 2, 3)))
    composite = WeightedSum.from_config(MeasuresConfig(weights={"test-brightness": 0.5}, options={"test-brightness": {"gain": 3.0}}))
    out = composite(x)
    assert torch.allclose(out.total, 0.5 * 3.0 * x.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="already registered"):
        register_measure("test-brightness", fn=Brightness())


def test_deprecated_register_reward_still_works_and_warns():
    from facereward.rewards import CompositeReward, RewardsConfig, build_reward, register_reward

    with pytest.warns(DeprecationWarning, match="register_reward is deprecated"):
        register_reward("test-old-brightness", Brightness)
    try:
        x, _ = _images()
        reward = build_reward("test-old-brightness", gain=2.0)
        assert reward.differentiable and not reward.needs_gt  # read from what the factory returns
        assert torch.allclose(reward(x), 2.0 * x.mean(dim=(1, 2, 3)))
        composite = CompositeReward.from_config(RewardsConfig(weights={"test-old-brightness": 0.5},
                                                              options={"test-old-brightness": {"gain": 3.0}}))
        assert torch.allclose(composite(x).total, 0.5 * 3.0 * x.mean(dim=(1, 2, 3)))
        with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="already registered"):
            register_reward("test-old-brightness", Brightness)
    finally:
        unregister_measure("test-old-brightness")


def test_reward_plugins_are_imported_from_a_file(tmp_path):
    plugin = tmp_path / "my_rewards.py"
    plugin.write_text(
        "from facereward.measures import register_measure\n"
        "def dark(images, gt=None, captions=None):\n    return 1 - images.mean(dim=(1, 2, 3))\n"
        "register_measure('test-dark', fn=dark, kind='NR', overwrite=True)\n"
    )
    try:
        import_plugins([str(plugin)], option="imports")
        composite = WeightedSum.from_config(MeasuresConfig(weights={"test-dark": 1.0}))
        x, _ = _images()
        assert torch.allclose(composite(x).total, 1 - x.mean(dim=(1, 2, 3)))
        assert not composite.differentiable
    finally:
        unregister_measure("test-dark")
    with pytest.raises(FileNotFoundError, match="imports: no such file"):
        import_plugins([str(tmp_path / "missing.py")], option="imports")
    from facereward.train.lrpo import LRPOConfig

    with pytest.raises(ConfigError, match=r"rewards.imports was renamed: use imports \(at the top level"):
        load_config(LRPOConfig, None, [f"rewards.imports=[{tmp_path / 'missing.py'}]"])


def test_composite_total_is_the_weighted_sum_of_its_components():
    x, gt = _images()
    config = MeasuresConfig(weights={"wavelet": 0.3, "ssim": 0.5, "psnr": 0.01})
    composite = WeightedSum.from_config(config)
    out = composite(x, gt)
    assert set(out.components) == {"wavelet", "ssim", "psnr"}
    by_hand = 0.3 * out.components["wavelet"] + 0.5 * out.components["ssim"] + 0.01 * out.components["psnr"]
    assert torch.allclose(out.total, by_hand)
    assert torch.allclose(out.components["ssim"], ssim(x, gt, quantize=False).float())
    assert composite.needs_gt and composite.differentiable
    scorers = composite.scorers()
    assert torch.allclose(scorers["reward"](x, gt, None), out.total)
    assert torch.allclose(scorers["reward/ssim"](x, gt, None), out.components["ssim"])
    with pytest.raises(ValueError, match="need the ground truth"):
        composite(x)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="rewards.weights.nosuch: unknown measure 'nosuch'"):
        WeightedSum.from_config(MeasuresConfig(weights={"nosuch": 1.0}))
    with pytest.raises(ValueError, match="rewards.weights.identity: measure 'identity' was renamed: use 'ids'"):
        WeightedSum.from_config(MeasuresConfig(weights={"identity": 1.0}))
    with pytest.raises(ValueError, match="rewards.options.ssim"):
        WeightedSum.from_config(MeasuresConfig(weights={"psnr": 1.0}, options={"ssim": {}}))
    with pytest.raises(ValueError, match="rewards.weights.frm: measure 'frm' needs option path"):
        WeightedSum.from_config(MeasuresConfig(weights={"frm": 1.0}))
    with pytest.raises(ValueError, match="rewards.weights.lpips: measure 'lpips' needs options backbone_path and heads_path"):
        WeightedSum.from_config(MeasuresConfig(weights={"lpips": 1.0}))
    with pytest.raises(ValueError, match="rewards.weights.psnr: expected a finite number"):
        WeightedSum.from_config(MeasuresConfig(weights={"psnr": float("nan")}))
    with pytest.raises(ValueError, match="rewards.weights.ssim: measure 'ssim': bad options"):
        WeightedSum.from_config(MeasuresConfig(weights={"ssim": 1.0}, options={"ssim": {"nosuch": 1}}))
    with pytest.raises(ValueError, match="rewards.weights.deg: measure 'deg' has no reward form"):
        WeightedSum.from_config(MeasuresConfig(weights={"deg": 1.0}))


def test_wavelet_reward_is_exp_of_minus_c_times_lowpass_l1():
    x, gt = _images()
    reward = create_measure("wavelet", as_reward=True, c=15.0)  # the original: 3-level DT-CWT low-pass, unnormalised
    expected = torch.exp(-15.0 * lowpass_l1(x, gt, levels=3, normalise=False, wavelet="dtcwt"))
    assert torch.allclose(reward(x, gt), expected)
    assert torch.allclose(reward(gt, gt), torch.ones(3))
    assert (reward(x, gt) < 1).all()
    haar = create_measure("wavelet", as_reward=True, wavelet="haar", normalise=True)
    assert torch.allclose(haar(x, gt), torch.exp(-15.0 * lowpass_l1(x, gt, normalise=True, wavelet="haar")))
    assert not torch.allclose(haar(x, gt), reward(x, gt))
    with pytest.raises(ValueError, match="measure 'wavelet': wavelet must be 'haar' or 'dtcwt'"):
        create_measure("wavelet", as_reward=True, wavelet="db4")
    with pytest.raises(ValueError, match="option 'c' applies only to its reward form"):
        create_measure("wavelet", c=15.0)  # the distance itself has no c


def test_psnr_and_ssim_rewards_follow_the_metrics():
    x, gt = _images()
    assert torch.allclose(create_measure("psnr", as_reward=True)(x, gt), psnr(x, gt, quantize=False).float())
    assert torch.allclose(create_measure("psnr", as_reward=True, max_db=40.0)(gt, gt), torch.full((3,), 40.0))
    assert torch.allclose(create_measure("ssim", as_reward=True)(gt, gt), torch.ones(3), atol=1e-6)


def test_identity_reward_is_the_cosine_of_toy_embeddings_and_differentiable():
    from facereward.measures.identity import get_identity_embedder

    x, gt = _images(size=64)
    reward = create_measure("ids", as_reward=True, judge="toy")
    assert reward.differentiable
    judge = get_identity_embedder("toy")
    expected = (judge.embed(x) * judge.embed(gt)).sum(-1)
    assert torch.allclose(reward(x, gt), expected, atol=1e-5)
    assert torch.allclose(reward(gt, gt), torch.ones(3), atol=1e-5)
    x.requires_grad_(True)
    reward(x, gt).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_frm_reward_scores_like_the_model_and_passes_gradients():
    x, _ = _images(size=64)
    reward = create_measure("frm", as_reward=True, path=TOY_FRM, scale=0.5)
    model = FaceRewardModel.from_pretrained(TOY_FRM)
    assert torch.allclose(reward(x), 0.5 * model.score(x), atol=1e-5)
    assert not any(p.requires_grad for p in reward.fn.parameters())
    x.requires_grad_(True)
    reward(x).sum().backward()
    assert x.grad.abs().sum() > 0


def test_lpips_reward_is_one_minus_lpips(tmp_path):
    from facereward.measures.lpips import LPIPS

    g = torch.Generator().manual_seed(0)
    convs = [(0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3), (10, 256, 256, 3)]
    feats = {}
    for i, cout, cin, k in convs:
        feats[f"{i}.weight"] = torch.randn(cout, cin, k, k, generator=g) * math.sqrt(2.0 / (cin * k * k))
        feats[f"{i}.bias"] = torch.zeros(cout)
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate([64, 192, 384, 256, 256])}
    save_file(feats, tmp_path / "alex.safetensors")
    save_file(heads, tmp_path / "heads.safetensors")
    reward = create_measure("lpips", as_reward=True, backbone_path=str(tmp_path / "alex.safetensors"),
                            heads_path=str(tmp_path / "heads.safetensors"), net="alex")
    x, gt = _images(size=64)
    lpips = LPIPS("alex", tmp_path / "alex.safetensors", tmp_path / "heads.safetensors")
    assert torch.allclose(reward(x, gt), 1 - lpips(x, gt), atol=1e-6)
    assert torch.allclose(reward(gt, gt), torch.ones(3), atol=1e-6)
