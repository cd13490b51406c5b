"""The shipped recipes (configs/): the originals' values, each with its source, and the toy recipes, all loadable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import torch

from facereward.config import ConfigError, load_config
from facereward.measures import MeasuresConfig, WeightedSum
from facereward.train.dpo import DPOConfig
from facereward.train.dpo import check_config as check_dpo_config
from facereward.train.lrpo import LRPOConfig, check_config, rewards_with_defaults
from facereward.train.nft import NFTConfig
from facereward.train.nft import check_config as check_nft_config
from facereward.train.refl import ReFLConfig, _validate, build_losses

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
    assert (c.group_size, c.inputs_per_batch, c.batches_per_epoch, c.epochs, c.sample_steps) == (9, 2, 12, 160, 50)
    assert (c.reg_weight, c.reg_steps, c.reg_temperature, c.reg_noising, c.gt_latent) == (0.001, 5, 40.0, "compounding", "sample")
    assert (c.clip_range, c.adv_clip, c.zero_advantage, c.kl_beta) == (1e-4, 5.0, "pad", 0.0)
    assert (c.group_inputs, c.data_order, c.data.quantize_lq) == ("own_noise", "sequential", False)
    assert c.rewards.weights == {"frm": 0.3, "lpips": 0.3, "clipiqa": 0.1, "wavelet": 0.3}
    # the reward server clamps every term's input but LPIPS's (RI:144-166)
    assert c.clamp_x_hat is False
    assert c.rewards.options["wavelet"] == {"c": 15.0, "levels": 3, "wavelet": "dtcwt", "normalise": False, "clamp": True}
    assert c.rewards.options["lpips"] == {"net": "vgg", "backbone_path": None, "heads_path": None, "clamp": False}
    assert c.rewards.options["frm"] == {"path": None, "resize": "bilinear", "clamp": True}
    assert c.rewards.options["clipiqa"] == {"prompts": "pyiqa", "clamp": True}
    h = c.held_out
    assert (h.eta, h.sample_steps, h.spacing, h.final_alpha_bar) == (0.8, 50, "leading", "first")
    with pytest.raises(ValueError, match="set --frm PATH"):  # a real restorer never silently gets the toy FRM
        rewards_with_defaults(c.rewards, init_from="DIFFBIR_RESTORER")


def test_refl_original_recipe():
    c = load_config(ReFLConfig, CONFIGS / "refl_original.yaml", [])
    assert (c.lr, c.batch_size, c.train_steps, c.run.gradient_accumulation_steps, c.accumulate_last_only) == (5e-5, 1, 3500, 4, True)
    assert (c.reward_weight, c.reg_weight, c.losses.weights) == (0.005, 1e-4, {"wavelet": 0.01, "lpips": 0.01})
    assert c.losses.options["wavelet"] == {"wavelet": "dtcwt", "levels": 3, "clamp": True}  # the DWT term on the clamped x_hat
    assert c.losses.options["lpips"] == {"net": "vgg", "backbone_path": None, "heads_path": None, "clamp": False}  # LPIPS unclamped
    assert c.rewards == MeasuresConfig(weights={"frm": 1.0}, options={"frm": {"path": None, "resize": "bilinear"}})
    assert (c.eta, c.grad_window, c.sample_steps, c.clamp_x_hat, c.grad_clip, c.run.seed) == ("random", 2, 50, True, 0.0, 231)
    assert c.data.quantize_lq is False
    h = c.held_out
    assert (h.eta, h.sample_steps, h.spacing, h.final_alpha_bar) == (1.0, 50, "leading", "first")
    d = c.dynamic_frm
    assert (d.every, d.lr, d.weight_decay, d.loss_weight, d.vision_unlocked_groups, d.text_unlocked_layers) == (10, 2e-6, 0.35, 0.1, 20, 11)
    assert (d.offset, d.max_logit_scale, d.reduction, d.divide_by_accumulation) == (1, None, "sum", True)
    _validate(c)
    with pytest.raises(ValueError, match=r"losses\.weights\.lpips: measure 'lpips' needs options backbone_path and heads_path"):
        build_losses(c, torch.device("cpu"))  # the recipe asks for LPIPS: without its weight files, one line (never dropped)
    given = load_config(ReFLConfig, CONFIGS / "refl_original.yaml",
                        ["losses.options.lpips.backbone_path=a.pth", "losses.options.lpips.heads_path=b.pth"])
    _validate(given)
    assert given.losses.weights == c.losses.weights and given.losses.options["wavelet"] == c.losses.options["wavelet"]
    with pytest.raises(ValueError, match="losses.weights.lpips: measure .lpips.: LPIPS backbone file not found: a.pth"):
        build_losses(given, torch.device("cpu"))


def test_toy_recipes_load_and_validate():
    lrpo = load_config(LRPOConfig, CONFIGS / "lrpo_toy.yaml", [])
    assert check_config(lrpo) == 7 and lrpo.train_batch_size % lrpo.micro_batch == 0  # so the first step's ratio is exactly 1
    assert rewards_with_defaults(lrpo.rewards).options["frm"]["path"].endswith("toy-frm")
    assert lrpo.rewards.weights == {"frm": 0.3, "wavelet": 0.3, "ids": 0.2, "ssim": 0.2}
    refl = load_config(ReFLConfig, CONFIGS / "refl_toy.yaml", [])
    _validate(refl)
    assert refl.losses.weights == {"wavelet": 0.01} and refl.rewards == MeasuresConfig(weights={"frm": 1.0})  # no LPIPS
    assert list(build_losses(refl, torch.device("cpu")).measures) == ["wavelet"]  # no weight files needed
    assert (refl.train_steps, refl.sample_steps, refl.held_out.sample_steps) == (60, 10, 10)
    # the race's recipes (scripts/race.py): LRPO's data, sampler length and composite reward
    nft = load_config(NFTConfig, CONFIGS / "nft_toy.yaml", [])
    dpo = load_config(DPOConfig, CONFIGS / "dpo_toy.yaml", [])
    check_dpo_config(dpo)
    assert check_nft_config(nft) == 7 and nft.eta == 0.0
    for other in (nft, dpo):
        assert (other.rewards, other.data, other.sample_steps) == (lrpo.rewards, lrpo.data, lrpo.sample_steps)


def test_recipe_keys_are_all_known():
    """A typo in a recipe would be a one-line config error; every recipe file parses with no unknown key."""
    for path in CONFIGS.glob("*.yaml"):
        kind = {"lrpo": LRPOConfig, "nft": NFTConfig, "dpo": DPOConfig}.get(path.name.split("_")[0], ReFLConfig)
        load_config(kind, path, [])
    assert {p.name for p in CONFIGS.glob("*.yaml")} >= {"lrpo_original.yaml", "refl_original.yaml", "lrpo_toy.yaml", "refl_toy.yaml",
                                                        "nft_toy.yaml", "dpo_toy.yaml"}
    assert re.search(r"REWARD_CONFIG", (CONFIGS / "lrpo_original.yaml").read_text())


def test_both_original_recipes_name_the_lpips_files_the_frm_and_the_wavelet_with_the_same_option_keys():
    """refl's structural losses and lrpo's rewards are the same measures: the same option keys, the same values."""
    refl = load_config(ReFLConfig, CONFIGS / "refl_original.yaml", [])
    lrpo = load_config(LRPOConfig, CONFIGS / "lrpo_original.yaml", [])
    for name, options in (("refl", refl.losses.options), ("lrpo", lrpo.rewards.options)):
        assert {"net", "backbone_path", "heads_path"} <= set(options["lpips"]), name  # options.lpips.{net,backbone_path,heads_path}
        assert (options["lpips"]["net"], options["lpips"]["backbone_path"], options["lpips"]["heads_path"]) == ("vgg", None, None)
        assert (options["wavelet"]["wavelet"], options["wavelet"]["levels"]) == ("dtcwt", 3), name  # options.wavelet.{wavelet,levels}
    assert refl.rewards.options["frm"]["path"] is None and lrpo.rewards.options["frm"]["path"] is None  # options.frm.path
    assert refl.rewards.options["frm"]["resize"] == lrpo.rewards.options["frm"]["resize"] == "bilinear"  # both: no antialias
    for name in ("refl_original.yaml", "lrpo_original.yaml"):  # both headers give the files by the same flags
        header = (CONFIGS / name).read_text()
        assert "--frm " in header and "--lpips-backbone vgg16.pth --lpips-heads vgg.pth" in header, name
    # the same dotted keys fill them in (what --frm, --lpips-backbone and --lpips-heads set)
    for cls, name, section in ((ReFLConfig, "refl_original.yaml", "losses"), (LRPOConfig, "lrpo_original.yaml", "rewards")):
        c = load_config(cls, CONFIGS / name, [f"{section}.options.lpips.backbone_path=vgg16.pth",
                                             f"{section}.options.lpips.heads_path=vgg.pth", "rewards.options.frm.path=FRM"])
        lpips = getattr(c, section).options["lpips"]
        assert (lpips["net"], lpips["backbone_path"], lpips["heads_path"]) == ("vgg", "vgg16.pth", "vgg.pth"), name
        assert c.rewards.options["frm"]["path"] == "FRM", name
        assert getattr(c, section).weights["lpips"] > 0 and getattr(c, section).weights["wavelet"] > 0, name


@pytest.mark.parametrize(("cls", "yaml_text", "override", "new_key"), [
    (ReFLConfig, "steps: 10", "steps=10", "train_steps"),
    (ReFLConfig, "sampling_steps: 10", "sampling_steps=10", "sample_steps"),
    (ReFLConfig, "lpips_backbone: vgg16.pth", "lpips_backbone=vgg16.pth", "losses.options.lpips.backbone_path"),
    (ReFLConfig, "structural_weight: 0.01", "structural_weight=0.01", "losses.weights.wavelet"),
    (ReFLConfig, "frm: FRM", "frm=FRM", "rewards.options.frm.path"),
    (ReFLConfig, "held_out: {steps: 10}", "held_out.steps=10", "held_out.sample_steps"),
    (LRPOConfig, "steps: 10", "steps=10", "sample_steps"),
    (LRPOConfig, "rewards: {imports: [my_rewards]}", "rewards.imports=[my_rewards]", "imports (at the top level of the config)"),
])
def test_an_old_key_is_a_one_line_error_naming_the_new_one(tmp_path, cls, yaml_text, override, new_key):
    old_key = override.split("=")[0]
    path = tmp_path / "old.yaml"
    path.write_text(yaml_text + "\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(f'{path}: {old_key}: this key was renamed: use {new_key}')}$"):
        load_config(cls, path, [])
    with pytest.raises(ConfigError, match=rf"^{re.escape(f'--set {override}: key {old_key} was renamed: use {new_key}')}$"):
        load_config(cls, None, [override])  # the same from --set KEY=VALUE


def test_an_old_reward_name_names_the_new_one():
    with pytest.raises(ValueError, match=r"^rewards\.weights\.identity: measure 'identity' was renamed: use 'ids'$"):
        WeightedSum.from_config(MeasuresConfig(weights={"identity": 0.2, "ssim": 0.2}), as_reward=True, device="cpu")
