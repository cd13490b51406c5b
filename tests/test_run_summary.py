"""A trainer's first line (what will run) and last lines (its final figures) from its config and RUN/metrics.json."""

from __future__ import annotations

import json

from facereward.config import load_config
from facereward.train.lrpo import LRPOConfig
from facereward.train.refl import ReFLConfig
from facereward.train.summary import describe_run, final_figures


def test_describe_run_says_length_data_output_and_resume():
    cfg = load_config(ReFLConfig, None, ["data.toy_faces=64", "train_steps=200", "run.output_dir=runs/x", "run.resume=latest"])
    line = describe_run("refl", cfg)
    assert line.startswith("refl: 200 steps at batch 1, 50 DDIM steps, from the shipped toy restorer")
    assert "64 toy faces (diffbir degradation) -> runs/x; resuming from latest" in line and "--resume latest" in line
    lrpo = describe_run("lrpo", load_config(LRPOConfig, None, ["data.hq_dir=/faces"]))
    assert "160 epochs of 12 x 2 inputs x G=9" in lrpo and "the faces in /faces" in lrpo


def test_final_figures_read_every_trainers_metrics(tmp_path):
    (tmp_path / "refl").mkdir()
    (tmp_path / "refl" / "metrics.json").write_text(json.dumps({
        "held_out": [{"step": 0, "psnr": 1.0}, {"step": 60, "psnr": 17.425, "ids": 0.5567, "frm/initial": float("nan")}],
        "train_log": [{"step": 60, "refl/loss": 0.0017, "refl/grad_step": 8.0}]}))
    assert final_figures(tmp_path / "refl") == [
        "held-out at step 60: psnr 17.43, ids 0.5567",
        "last logged step 60: refl/loss 0.0017",
        f"logs: tensorboard --logdir {tmp_path / 'refl'}"]
    (tmp_path / "frm").mkdir()
    (tmp_path / "frm" / "metrics.json").write_text(json.dumps({
        "best_held_out_accuracy": 0.9, "held_out_pairs": 840, "history": [{"step": 100, "accuracy": 0.9}, {"step": 200, "accuracy": 0.85}]}))
    assert final_figures(tmp_path / "frm")[0] == "held-out pairwise accuracy: best 0.9000, last 0.8500 at step 200 (840 pairs)"
    (tmp_path / "lrpo").mkdir()
    (tmp_path / "lrpo" / "metrics.json").write_text(json.dumps({
        "unit": "epoch", "held_out": [{"epoch": 0, "psnr": 13.0}, {"epoch": 2, "train_reward": 0.05, "psnr": 14.2}],
        "train_log": [{"epoch": 2, "reward": 0.06, "reward/ssim": 0.4, "ppo/kl": 0.0, "held_out/psnr": 14.2}]}))
    assert final_figures(tmp_path / "lrpo")[:2] == ["epoch 2: reward 0.06, reward/ssim 0.4", "held-out at epoch 2: train_reward 0.05, psnr 14.2"]
    assert final_figures(tmp_path / "nothing") == [f"logs: tensorboard --logdir {tmp_path / 'nothing'}"]
