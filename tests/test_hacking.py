"""The reward-hacking alarm: the training reward rising while a frozen held-out judge falls, N evaluations in a row."""

from __future__ import annotations

import json

import pytest

from facereward.train.hacking import HackingAlarm, hacking_alarms, new_alarms


def _records(rewards, judge_values, judge="psnr"):
    return [{"step": 10 * (i + 1), "train_reward": r, judge: v} for i, (r, v) in enumerate(zip(rewards, judge_values))]


def test_fires_after_patience_rises_and_falls_in_a_row():
    records = _records([0.1, 0.2, 0.3, 0.4, 0.5], [20.0, 19.0, 18.5, 18.0, 17.0])
    (alarm,) = hacking_alarms(records, ["psnr"], patience=3)
    assert alarm.judge == "psnr" and alarm.steps == [10, 20, 30, 40]  # fired at the 3rd consecutive pair, once
    assert alarm.train_reward == [0.1, 0.2, 0.3, 0.4] and alarm.judge_values == [20.0, 19.0, 18.5, 18.0]
    assert "training reward rose (0.1 -> 0.2 -> 0.3 -> 0.4)" in alarm.message()
    assert "held-out psnr fell (20 -> 19 -> 18.5 -> 18)" in alarm.message()
    assert new_alarms(records, ["psnr"], 3, step=40) == [alarm] and new_alarms(records, ["psnr"], 3, step=50) == []


def test_a_broken_streak_or_an_honest_run_does_not_fire():
    assert hacking_alarms(_records([0.1, 0.2, 0.3, 0.4], [20, 21, 22, 23]), ["psnr"], 3) == []  # both improve
    assert hacking_alarms(_records([0.1, 0.2, 0.15, 0.3, 0.4], [20, 19, 18, 17, 16]), ["psnr"], 3) == []  # reward dipped
    assert hacking_alarms(_records([0.1, 0.2, 0.3], [20, 19, 18]), ["psnr"], 3) == []  # only 2 pairs
    assert hacking_alarms(_records([0.1, 0.2, 0.3, 0.4], [20, 19, 18, 17]), ["psnr"], 0) == []  # off


def test_lower_is_better_judges_fall_by_rising_and_missing_judges_are_skipped():
    records = _records([0.1, 0.2, 0.3], [2.0, 2.5, 3.0], judge="lmd")
    (alarm,) = hacking_alarms(records, ["lmd", "frm/initial"], patience=2)
    assert alarm.judge == "lmd"
    # the first evaluation (before training) has no train reward: it is not part of any streak
    records = [{"step": 0, "psnr": 25.0}, *_records([0.1, 0.2], [20.0, 19.0])]
    assert [a.steps for a in hacking_alarms(records, ["psnr"], 1)] == [[10, 20]]


def _fake_alarm(calls):
    """A new_alarms stand-in that records what the trainer passed and fires at the second call."""
    def fake(records, judges, patience, step, step_key="step"):
        calls.append([dict(r) for r in records])
        if len(calls) == 2:
            return [HackingAlarm("psnr", [0, int(step)], [0.1, 0.2], [20.0, 19.0])]
        return []
    return fake


def test_refl_warns_records_and_stops_on_the_alarm(tmp_path, monkeypatch, pixel_restorer):
    from test_refl import _config

    from facereward.models.frm import FaceRewardModel, FRMConfig
    from facereward.train import heldout as heldout_module
    from facereward.train import refl as refl_module
    from facereward.train.heldout import HeldOutConfig

    pixel_restorer.save_pretrained(tmp_path / "restorer")
    FaceRewardModel(FRMConfig(backbone="cnn", input_size=32, cnn_widths=[8, 16], cnn_depth=1)).save_pretrained(tmp_path / "frm")
    calls: list = []
    monkeypatch.setattr(heldout_module, "new_alarms", _fake_alarm(calls))
    config = _config(tmp_path, tmp_path / "restorer", tmp_path / "frm", train_steps=8,
                     held_out=HeldOutConfig(every=2, toy_faces=2, sample_steps=2, identity="none", stop_on_hacking=True))
    with pytest.warns(UserWarning, match="refl: possible reward hacking"):
        refl_module.train_refl(config)
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["held_out"]
    assert [h["step"] for h in history] == [0, 2]  # the fake fires at the second evaluation: stopped at 2 of 8 steps
    assert "train_reward" not in history[0] and "train_reward" in history[1]  # the mean reward of steps 1-2
    assert history[-1]["alarms"] == ["psnr"] and "alarms" not in history[0]
    assert (tmp_path / "run" / "model" / "facereward.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "state.json").is_file()


def test_lrpo_warns_records_and_stops_on_the_alarm(tmp_path, monkeypatch, pixel_restorer):
    from test_lrpo import _config

    from facereward.train import heldout as heldout_module
    from facereward.train import lrpo as lrpo_module
    from facereward.train.heldout import HeldOutConfig

    pixel_restorer.save_pretrained(tmp_path / "pixel")
    calls: list = []
    monkeypatch.setattr(heldout_module, "new_alarms", _fake_alarm(calls))
    config = _config(tmp_path, tmp_path / "pixel", epochs=4,
                     held_out=HeldOutConfig(every=1, toy_faces=2, sample_steps=2, identity="none", stop_on_hacking=True))
    config.run.save_every = 10
    with pytest.warns(UserWarning, match="lrpo: possible reward hacking"):
        lrpo_module.train_lrpo(config)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    epochs, records = metrics["train_log"], metrics["held_out"]
    assert metrics["unit"] == "epoch" and [e["epoch"] for e in epochs] == [0, 1]  # epoch 0: the base's scores; stopped at 1
    assert [r["epoch"] for r in records] == [0, 1] and records[-1]["alarms"] == ["psnr"] and "alarms" not in records[0]
    # the alarm's records: one per evaluation, the mean epoch reward since the previous one beside the judges
    assert [r["epoch"] for r in calls[-1]] == [0, 1] and "train_reward" not in calls[-1][0]
    assert calls[-1][1]["train_reward"] == pytest.approx(epochs[1]["reward"]) and "psnr" in calls[-1][1]
    assert (tmp_path / "run" / "checkpoints" / "step-00000001" / "state.json").is_file()
