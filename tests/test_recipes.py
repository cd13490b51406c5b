"""The shipped recipes (configs/): the originals' values, each with its source, and the toy recipes, all loadable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from facereward.config import load_config
from facereward.rewards import RewardsConfig
from facereward.train.lrpo import LRPOConfig, check_config, rewards_with_defaults
from facereward.train.refl import ReFLConfig, _validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["lrpo_original.yaml", "refl_original.yaml"])
def test_every_value_of_an_original_recipe_says_where_it_comes_from(name):
    for n, line in enumerate((CONFIGS / name).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.partition(":")
        if value.strip() and not value.strip().startswith("#") and key.strip() != "options":  # a value, not a section
            assert "#" in value, f"{name}:{n}: a value without its source: {line}"


def test_lrpo_original_recipe():
    c = load_config(LRPOConfig, CONFIGS / "lrpo_original.yaml", [])
    assert check_config(c) == 49
    assert (c.stepping, c.train_batch_size, c.micro_batch, c.lr, c.weight_decay, c.grad_clip) == ("per_timestep", 6, 6, 1e-6, 0.01, 1.0)
    assert (c.group_size, c.inputs_per_batch, c.batches_per_epoch, c.epochs, c.steps) == (9, 2, 12, 160, 50)
    assert (c.reg_weight, c.reg_steps, c.reg_temperature, c.reg_noising, c.gt_latent) == (0.001, 5, 40.0, "compounding", "sample")
    assert (c.clip_range, c.adv_clip, c.zero_advantage, c.kl_beta) == (1e-4, 5.0, "pad", 0.0)
    assert c.rewards.weights == {"frm": 0.3, "lpips": 0.3, "clipiqa": 0.1, "wavelet": 0.3}
    assert c.rewards.options["wavelet"] == {"c": 15.0, "levels": 3, "wavelet": "dtcwt", "normalise": False}
    assert c.held_out.eta == 0.8
    with pytest.raises(ValueError, match="set --frm PATH"):  # a real restorer never silently gets the toy FRM
        rewards_with_defaults(c.rewards, toy_restorer=False)


def test_refl_original_recipe():
    c = load_config(ReFLConfig, CONFIGS / "refl_original.yaml", [])
    assert (c.lr, c.batch_size, c.steps, c.run.gradient_accumulation_steps, c.accumulate_last_only) == (5e-5, 1, 3500, 4, True)
    assert (c.reward_weight, c.reg_weight, c.structural_weight, c.lpips_weight, c.wavelet) == (0.005, 1e-4, 0.01, 0.01, "dtcwt")
    assert (c.eta, c.grad_window, c.sampling_steps, c.clamp_x_hat, c.grad_clip, c.run.seed) == ("random", 2, 50, True, 0.0, 231)
    d = c.dynamic_frm
    assert (d.every, d.lr, d.weight_decay, d.loss_weight, d.vision_unlocked_groups, d.text_unlocked_layers) == (10, 2e-6, 0.35, 0.1, 20, 11)
    with pytest.raises(ValueError, match="--lpips-backbone PATH and --lpips-heads PATH"):
        _validate(c)
    _validate(load_config(ReFLConfig, CONFIGS / "refl_original.yaml", ["lpips_backbone=a.pth", "lpips_heads=b.pth"]))


def test_toy_recipes_load_and_validate():
    lrpo = load_config(LRPOConfig, CONFIGS / "lrpo_toy.yaml", [])
    assert check_config(lrpo) == 7 and lrpo.train_batch_size % lrpo.micro_batch == 0  # so the first step's ratio is exactly 1
    assert rewards_with_defaults(lrpo.rewards).options["frm"]["path"].endswith("toy-frm")
    refl = load_config(ReFLConfig, CONFIGS / "refl_toy.yaml", [])
    _validate(refl)
    assert refl.lpips_weight == 0.0 and refl.rewards == RewardsConfig(weights={"frm": 1.0})


def test_recipe_keys_are_all_known():
    """A typo in a recipe would be a one-line config error; every recipe file parses with no unknown key."""
    for path in CONFIGS.glob("*.yaml"):
        kind = LRPOConfig if path.name.startswith("lrpo") else ReFLConfig
        load_config(kind, path, [])
    assert {p.name for p in CONFIGS.glob("*.yaml")} >= {"lrpo_original.yaml", "refl_original.yaml", "lrpo_toy.yaml", "refl_toy.yaml"}
    assert re.search(r"REWARD_CONFIG", (CONFIGS / "lrpo_original.yaml").read_text())
