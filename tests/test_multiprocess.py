"""Two gloo CPU processes through the prepared path follow one process with the same global batch and seed: the same
rewards in the first epoch/step (seeds per sample, not per process) and the same trained weights up to reduction-order
rounding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from facereward.cli import run as cli_run


def _launch_two(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--module", "facereward", *command]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{f.relative_to(folder)}/{k}": v for f in sorted(folder.rglob("*.safetensors")) for k, v in load_file(f).items()}


def _assert_close_weights(a: Path, b: Path, start: Path) -> None:
    """`a` and `b` equal up to rounding: their difference is under 1% of the distance trained from `start` (norms over
    all weights; per-sample noise drawn per process instead would differ by ~100%).

    Adam's first steps move a weight by about lr * sign(gradient), so a bias whose gradient is ~0 (before a norm
    layer) can move either way on rounding alone: hence a norm, not the largest difference.
    """
    wa, wb, w0 = _weights(a), _weights(b), _weights(start)
    assert wa.keys() == wb.keys()
    diff = torch.cat([(wa[k].double() - wb[k].double()).flatten() for k in wa])
    moved = torch.cat([(wa[k].double() - w0[k].double()).flatten() for k in wa if k in w0])
    assert float(moved.norm()) > 0 and float(diff.norm()) < 0.01 * float(moved.norm()), (float(diff.norm()), float(moved.norm()))


def _write(tmp_path: Path, name: str, config: dict, output: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "run": {**config["run"], "output_dir": str(tmp_path / output)}}))
    return path


def test_lrpo_on_two_processes_matches_one(tmp_path, pixel_dir):
    config = {"run": {"save_every": 2, "log_every": 1, "progress": False, "speed": "off"}, "init_from": str(pixel_dir),
              "data": {"toy_faces": 6, "size": 32, "toy_identities": 10}, "rewards": {"weights": {"wavelet": 0.5, "ssim": 0.5}},
              "group_size": 4, "inputs_per_batch": 1, "batches_per_epoch": 2, "epochs": 2, "sample_steps": 4, "micro_batch": 2,
              "train_batch_size": 0, "reg_steps": 2, "lr": 1e-4, "held_out": {"every": 0}}
    # 1 input x G = 4 per sampling batch: on 2 processes every group is split, 2 rows on each (one degraded input)
    assert cli_run(["lrpo", "--config", str(_write(tmp_path, "one", config, "one"))]) == 0
    proc = _launch_two(["lrpo", "--config", str(_write(tmp_path, "two", config, "two"))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())["train_log"]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["train_log"]
    for key in ("reward", "reward_std", "reward/wavelet", "reward/ssim"):  # the first epoch's rollouts: before any update
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-6, abs=1e-7), key
    assert two[0]["ppo/optimizer_steps"] == one[0]["ppo/optimizer_steps"] == 3.0
    assert two[0]["ppo/ratio_dev_first"] == 0.0
    # after one update: 1 and 2 processes sum gradients in a different order, so only float rounding apart
    assert two[1]["reward"] == pytest.approx(one[1]["reward"], rel=1e-3)
    _assert_close_weights(tmp_path / "one" / "model", tmp_path / "two" / "model", pixel_dir)
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["num_processes"] == 2 and state["accelerate"] == {"engine": None, "models": ["stage2"], "optimizers": ["optimizer"]}
    assert {p.name for p in (tmp_path / "two" / "checkpoints" / "step-00000002").glob("rng-*")} == {"rng-0.safetensors",
                                                                                                   "rng-1.safetensors"}


def test_refl_on_two_processes_matches_one(tmp_path, pixel_dir):
    from facereward.models.frm import FaceRewardModel, FRMConfig

    torch.manual_seed(1)
    FaceRewardModel(FRMConfig(backbone="cnn", input_size=32, cnn_widths=[8, 16], cnn_depth=1)).save_pretrained(tmp_path / "frm")
    config = {"run": {"save_every": 3, "log_every": 1, "progress": False, "speed": "off"}, "init_from": str(pixel_dir),
              "rewards": {"weights": {"frm": 1.0}, "options": {"frm": {"path": str(tmp_path / "frm")}}},
              "data": {"toy_faces": 8, "size": 32, "toy_identities": 10},
              "train_steps": 3, "batch_size": 4, "sample_steps": 3, "eta": "random", "lr": 1e-4, "reward_weight": 0.1,
              "losses": {"weights": {"wavelet": 0.01}, "options": {"wavelet": {"wavelet": "dtcwt", "levels": 3, "clamp": True}}},
              "dynamic_frm": {"every": 1, "lr": 1e-3}, "held_out": {"every": 0}}
    assert cli_run(["refl", "--config", str(_write(tmp_path, "one", config, "one"))]) == 0
    proc = _launch_two(["refl", "--config", str(_write(tmp_path, "two", {**config, "batch_size": 2}, "two"))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())["train_log"]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["train_log"]
    assert one[0]["refl/grad_step"] == two[0]["refl/grad_step"]  # k drawn once for the global batch
    for key in ("refl/score", "refl/reward", "refl/wavelet_loss", "frm/loss"):  # logged means over both processes
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-5, abs=1e-7), key
    _assert_close_weights(tmp_path / "one" / "model", tmp_path / "two" / "model", pixel_dir)
    _assert_close_weights(tmp_path / "one" / "frm", tmp_path / "two" / "frm", tmp_path / "frm")  # the dynamic FRM too


def test_refl_on_a_one_step_restorer_on_two_processes_matches_one(tmp_path):
    from facereward.models.frm import FaceRewardModel, FRMConfig
    from facereward.models.onestep import OneStepConfig, OneStepRestorer

    torch.manual_seed(0)
    OneStepRestorer.build(OneStepConfig(mode="latent", size=32)).save_pretrained(tmp_path / "start")
    torch.manual_seed(1)
    FaceRewardModel(FRMConfig(backbone="cnn", input_size=32, cnn_widths=[8, 16], cnn_depth=1)).save_pretrained(tmp_path / "frm")
    config = {"run": {"save_every": 3, "log_every": 1, "progress": False, "speed": "off"}, "init_from": str(tmp_path / "start"),
              "rewards": {"weights": {"frm": 1.0}, "options": {"frm": {"path": str(tmp_path / "frm")}}},
              "data": {"toy_faces": 8, "size": 32, "toy_identities": 10}, "train_steps": 3, "batch_size": 4, "lr": 1e-3,
              "reward_weight": 0.1, "dynamic_frm": {"every": 1, "lr": 1e-3}, "held_out": {"every": 0},
              "losses": {"weights": {"wavelet": 0.01}, "options": {"wavelet": {"wavelet": "dtcwt", "levels": 3, "clamp": True}}}}
    assert cli_run(["refl", "--config", str(_write(tmp_path, "one", config, "one"))]) == 0
    proc = _launch_two(["refl", "--config", str(_write(tmp_path, "two", {**config, "batch_size": 2}, "two"))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())["train_log"]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["train_log"]
    for key in ("refl/score", "refl/reward", "refl/wavelet_loss", "frm/loss"):  # the posterior noise is drawn per row
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-5, abs=1e-7), key
    _assert_close_weights(tmp_path / "one" / "model", tmp_path / "two" / "model", tmp_path / "start")


def test_nft_on_two_processes_matches_one(tmp_path, pixel_dir):
    config = {"run": {"save_every": 2, "log_every": 1, "progress": False, "speed": "off"}, "init_from": str(pixel_dir),
              "data": {"toy_faces": 6, "size": 32, "toy_identities": 10}, "rewards": {"weights": {"wavelet": 0.5, "ssim": 0.5}},
              "group_size": 4, "inputs_per_batch": 1, "batches_per_epoch": 2, "epochs": 2, "sample_steps": 3, "micro_batch": 2,
              "lr": 1e-4, "eta": 0.5, "held_out": {"every": 0}}
    # a group of 4 split over 2 processes; eta 0.5 so the per-sample step noise is drawn too; one step an epoch
    assert cli_run(["nft", "--config", str(_write(tmp_path, "one", config, "one"))]) == 0
    proc = _launch_two(["nft", "--config", str(_write(tmp_path, "two", config, "two"))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())["train_log"]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["train_log"]
    for key in ("reward", "reward_std", "nft/r_mean", "nft/loss"):  # before any update: the same samples, noise and loss
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-5, abs=1e-7), key
    assert two[0]["nft/optimizer_steps"] == one[0]["nft/optimizer_steps"] == 1.0
    assert two[1]["reward"] == pytest.approx(one[1]["reward"], rel=1e-3)
    _assert_close_weights(tmp_path / "one" / "model", tmp_path / "two" / "model", pixel_dir)
