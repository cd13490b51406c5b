"""Config overrides name `--set` in their errors; FACEREWARD_SMOKE scales commands and configs down."""

from __future__ import annotations

import pytest

from facereward import smoke
from facereward.config import ConfigError, check_override, load_config
from facereward.evaluate import EvaluateConfig
from facereward.train.base import TrainBaseConfig
from facereward.train.frm import TrainFRMConfig
from facereward.train.dpo import DPOConfig
from facereward.train.lrpo import LRPOConfig, check_config
from facereward.train.nft import NFTConfig
from facereward.train.refl import ReFLConfig


def test_check_override_accepts_free_form_mappings_and_rejects_bad_leaves():
    check_override(LRPOConfig, "rewards.weights.brightness=0.1")  # inside a mapping: not checked here
    check_override(LRPOConfig, "rewards.options.frm.path=x")
    check_override(ReFLConfig, "eta=random")
    check_override(ReFLConfig, "eta=0.5")
    with pytest.raises(ConfigError, match=r"--set train_steps=many: expected an integer, got 'many'"):
        check_override(ReFLConfig, "train_steps=many")
    with pytest.raises(ConfigError, match=r"--set steps=many: key steps was renamed: use train_steps"):
        check_override(ReFLConfig, "steps=many")
    with pytest.raises(ConfigError, match=r"--set dynamic_frm.evry=1: unknown key 'evry' in dynamic_frm"):
        check_override(ReFLConfig, "dynamic_frm.evry=1")
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        check_override(ReFLConfig, "train_steps")


def test_yaml_11_words_stay_strings_where_a_string_is_expected(tmp_path):
    """`--set run.mixed_precision=no` is the string "no" (YAML 1.1 would read False); boolean fields take the words."""
    cfg = load_config(ReFLConfig, None, ["run.mixed_precision=no", "run.progress=off", "held_out.hacking_judges=[no, ids]"])
    assert cfg.run.mixed_precision == "no" and cfg.run.progress is False and cfg.held_out.hacking_judges == ["no", "ids"]
    (tmp_path / "c.yaml").write_text("run: {mixed_precision: no, progress: yes, cpu: TRUE}\n")
    cfg = load_config(ReFLConfig, tmp_path / "c.yaml")
    assert (cfg.run.mixed_precision, cfg.run.progress, cfg.run.cpu) == ("no", True, True)
    with pytest.raises(ConfigError, match=r"expected true/false, got 'maybe'"):
        load_config(ReFLConfig, None, ["run.progress=maybe"])


def test_evaluate_stage1_rows_for_named_models_only():
    assert load_config(EvaluateConfig, None, ["include_stage1=[base]"]).include_stage1 == ["base"]
    assert load_config(EvaluateConfig, None, ["include_stage1=true"]).include_stage1 is True


def test_scale_argv_caps_given_options_and_adds_missing_ones(monkeypatch):
    monkeypatch.setenv(smoke.ENV, "1")
    assert smoke.scale_argv(["demo", "--n", "16", "--out-dir", "d"]) == ["demo", "--n", "4", "--out-dir", "d", "--steps", "2"]
    assert smoke.scale_argv(["restore", "--steps=50", "a", "b"]) == ["restore", "--steps=2", "a", "b"]
    assert smoke.scale_argv(["restore", "--steps", "1", "a", "b"]) == ["restore", "--steps", "1", "a", "b"]  # already below
    assert smoke.scale_argv(["refl", "--steps", "200"]) == ["refl", "--steps", "200"]  # trainers are capped in their config
    assert smoke.scale_argv(["demo", "--help"]) == ["demo", "--help"]
    monkeypatch.setenv(smoke.ENV, "0")
    assert smoke.scale_argv(["demo", "--n", "16"]) == ["demo", "--n", "16"]


@pytest.mark.parametrize("cls", [TrainBaseConfig, TrainFRMConfig, ReFLConfig, LRPOConfig, NFTConfig, DPOConfig])
def test_smoke_caps_every_trainer_config(cls, monkeypatch):
    monkeypatch.setenv(smoke.ENV, "1")
    cfg = load_config(cls, None, ["run.save_every=100000"])
    for dotted, cap in cls.SMOKE.items():  # every SMOKE key names a real field, now at most its cap
        node = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        assert node <= cap, dotted
    assert cfg.run.save_every <= 2
    monkeypatch.delenv(smoke.ENV)
    assert load_config(cls, None, []).run.save_every > 2


def test_smoke_keeps_zeros_and_stays_valid(monkeypatch):
    monkeypatch.setenv(smoke.ENV, "1")
    cfg = load_config(ReFLConfig, None, ["dynamic_frm.every=0", "held_out.every=0", "data.toy_faces=0"])
    assert (cfg.dynamic_frm.every, cfg.held_out.every, cfg.data.toy_faces) == (0, 0, 0)  # ablations and sources survive
    check_config(load_config(LRPOConfig, None, ["data.toy_faces=100"]))  # the scaled-down LRPO is a valid run
    assert load_config(EvaluateConfig, None, []).sample_steps == EvaluateConfig().sample_steps  # no SMOKE: the CLI caps evaluate
