"""A run SIGKILLed mid-way and resumed with `--resume auto` ends exactly as the uninterrupted run: same logged losses,
same weights (CPU, one process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent
PIXEL = {"mode": "pixel", "size": 32, "cleaner_kwargs": {"channels": 8, "num_blocks": 1, "downscale": 2},
         "pixel": {"block_out_channels": [16, 32], "attention_levels": [False, False], "norm_num_groups": 8}}


def _plan(tmp_path: Path, phases: list[dict]) -> list[dict]:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(phases))
    proc = subprocess.run([sys.executable, str(TESTS / "kill_runner.py"), str(plan)], capture_output=True, text=True,
                          timeout=600, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                               "FACEREWARD_CACHE_DIR": os.environ["FACEREWARD_CACHE_DIR"]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{f.relative_to(folder)}/{k}": v for f in sorted(folder.rglob("*.safetensors")) for k, v in load_file(f).items()}


def _without_clock(log):
    """A metrics log without its wall-clock figures (LRPO's time/*), which no two runs share."""
    if isinstance(log, dict):
        return {k: _without_clock(v) for k, v in log.items() if not k.startswith("time/")}
    return [_without_clock(v) for v in log] if isinstance(log, list) else log


def _assert_same_run(a: Path, b: Path, model: str = "model") -> None:
    log_a = _without_clock(json.loads((a / "metrics.json").read_text()))
    log_b = _without_clock(json.loads((b / "metrics.json").read_text()))
    assert log_a == log_b  # every logged loss (and held-out figure), bit for bit
    wa, wb = _weights(a / model), _weights(b / model)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:3]


def _kill_and_resume(tmp_path: Path, command: list[str], config: dict, kill_lines: list[str | int]) -> tuple[Path, Path]:
    """The uninterrupted run, and one killed at each of `kill_lines` in turn, resumed with --resume auto.

    A string kills when the run prints it; a number N kills the run in the middle of writing checkpoint N.
    """
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump({**config, "run": {**config["run"], "output_dir": str(tmp_path / "ref")}}))
    (tmp_path / "kill.yaml").write_text(yaml.safe_dump({**config, "run": {**config["run"], "output_dir": str(tmp_path / "kill")}}))
    phases = [{"argv": [*command, "--config", str(tmp_path / "ref.yaml")]}]
    phases += [{"argv": [*command, "--config", str(tmp_path / "kill.yaml"), "--resume", "auto"],
                **({"kill_in_save": line} if isinstance(line, int) else {"kill_on": line})} for line in kill_lines]
    phases += [{"argv": [*command, "--config", str(tmp_path / "kill.yaml"), "--resume", "auto"]}]
    results = _plan(tmp_path, phases)
    assert results[0]["rc"] == 0 and results[-1]["rc"] == 0, results
    assert all(r["killed"] and r["rc"] == -9 for r in results[1:-1]), results
    return tmp_path / "ref", tmp_path / "kill"


def test_train_base_resumes_bit_identically_after_sigkill(tmp_path):
    # channels_last set, not left to the timing: a stage-1 cleaner left in it changed stage 2's numbers on a resume
    config = {"run": {"save_every": 2, "log_every": 1, "progress": False, "seed": 3, "channels_last": True},
              "data": {"toy_faces": 6, "size": 32, "toy_identities": 10}, "model": PIXEL,
              "stage1_steps": 4, "stage2_steps": 5, "batch_size": 4, "warmup_steps": 2}
    # 6 faces in batches of 4: an epoch is 2 batches, so kills land inside epochs and across the stage switch; the
    # second kill lands in the middle of writing checkpoint 6 (the resume removes the torn folder, goes back to 4)
    ref, killed = _kill_and_resume(tmp_path, ["train-base"], config,
                                   ["train-base step 3/", 6, "train-base step 8/"])
    _assert_same_run(ref, killed)


def test_train_frm_resumes_bit_identically_after_sigkill(tmp_path):
    import numpy as np

    from facereward.data.imageio import write_image
    from facereward.data.preferences import append_pair

    rng = np.random.default_rng(0)
    for i in range(20):  # sharp over blurred textures
        base = rng.random((16, 16, 3)).astype(np.float32)
        write_image(tmp_path / f"img/{i}_a.png", base)
        write_image(tmp_path / f"img/{i}_b.png", (base + np.roll(base, 1, 0) + np.roll(base, 1, 1)) / 3)
        append_pair(tmp_path / "pairs.jsonl", {"chosen": f"img/{i}_a.png", "rejected": f"img/{i}_b.png", "lq": f"img/{i}_b.png"})
    config = {"run": {"save_every": 2, "log_every": 1, "progress": False}, "pairs": str(tmp_path / "pairs.jsonl"),
              "held_out_fraction": 0.25, "train_steps": 7, "batch_size": 6, "lr": 3e-3, "eval_every": 2,
              "model": {"backbone": "cnn", "input_size": 16, "cnn_widths": [8], "cnn_depth": 1}}
    ref, killed = _kill_and_resume(tmp_path, ["train-frm"], config, ["train-frm step 3/", "train-frm step 6/"])
    _assert_same_run(ref, killed)
    _assert_same_run(ref, killed, model="best")


def test_refl_resumes_bit_identically_after_sigkill(tmp_path, pixel_restorer):
    from facereward.models.frm import FaceRewardModel, FRMConfig

    pixel_restorer.save_pretrained(tmp_path / "restorer")
    torch.manual_seed(1)
    FaceRewardModel(FRMConfig(backbone="cnn", input_size=32, cnn_widths=[8, 16], cnn_depth=1)).save_pretrained(tmp_path / "frm")
    config = {"run": {"save_every": 2, "log_every": 1, "progress": False}, "init_from": str(tmp_path / "restorer"),
              "rewards": {"weights": {"frm": 1.0}, "options": {"frm": {"path": str(tmp_path / "frm")}}},
              "data": {"toy_faces": 6, "size": 32, "toy_identities": 10},
              "train_steps": 6, "batch_size": 4, "sample_steps": 3, "eta": "random", "lr": 1e-4, "reward_weight": 0.1,
              "losses": {"weights": {"wavelet": 0.01}, "options": {"wavelet": {"wavelet": "dtcwt", "levels": 3, "clamp": True}}},
              "dynamic_frm": {"every": 1, "lr": 1e-3}, "held_out": {"every": 3, "toy_faces": 2, "sample_steps": 2}}
    ref, killed = _kill_and_resume(tmp_path, ["refl"], config, ["refl step 3/", 4, "refl step 5/"])
    _assert_same_run(ref, killed)
    _assert_same_run(ref, killed, model="frm")  # the dynamic FRM too


def test_refl_on_a_one_step_restorer_resumes_bit_identically_after_sigkill(tmp_path):
    from facereward.models.frm import FaceRewardModel, FRMConfig
    from facereward.models.onestep import OneStepConfig, OneStepRestorer

    torch.manual_seed(0)  # latent: the VAE encoder trains too, and the posterior noise is drawn per row
    OneStepRestorer.build(OneStepConfig(mode="latent", size=32)).save_pretrained(tmp_path / "restorer")
    torch.manual_seed(1)
    FaceRewardModel(FRMConfig(backbone="cnn", input_size=32, cnn_widths=[8, 16], cnn_depth=1)).save_pretrained(tmp_path / "frm")
    config = {"run": {"save_every": 2, "log_every": 1, "progress": False}, "init_from": str(tmp_path / "restorer"),
              "rewards": {"weights": {"frm": 1.0}, "options": {"frm": {"path": str(tmp_path / "frm")}}},
              "data": {"toy_faces": 6, "size": 32, "toy_identities": 10}, "lora": {"rank": 2},
              "train_steps": 6, "batch_size": 4, "lr": 1e-3, "reward_weight": 0.1,
              "losses": {"weights": {"wavelet": 0.01}, "options": {"wavelet": {"wavelet": "dtcwt", "levels": 3, "clamp": True}}},
              "dynamic_frm": {"every": 1, "lr": 1e-3}, "held_out": {"every": 3, "toy_faces": 2}}
    ref, killed = _kill_and_resume(tmp_path, ["refl"], config, ["refl step 3/", 4])
    _assert_same_run(ref, killed)
    _assert_same_run(ref, killed, model="frm")


def test_lrpo_resumes_bit_identically_after_sigkill(tmp_path, pixel_restorer):
    pixel_restorer.save_pretrained(tmp_path / "restorer")
    config = {"run": {"save_every": 1, "log_every": 1, "progress": False}, "init_from": str(tmp_path / "restorer"),
              "data": {"toy_faces": 6, "size": 32, "toy_identities": 10}, "rewards": {"weights": {"wavelet": 0.5, "ssim": 0.5}},
              "group_size": 3, "inputs_per_batch": 2, "batches_per_epoch": 1, "epochs": 4, "sample_steps": 4, "micro_batch": 3,
              "train_batch_size": 3, "reg_steps": 2, "lr": 1e-4, "held_out": {"every": 2, "toy_faces": 2, "sample_steps": 2}}
    ref, killed = _kill_and_resume(tmp_path, ["lrpo"], config, ["lrpo step 2/", 3, "lrpo step 3/"])
    _assert_same_run(ref, killed)


def test_nft_resumes_bit_identically_after_sigkill(tmp_path, pixel_restorer):
    """The old policy and the optimizer-step count (its averaging decay) come back with the trained network."""
    pixel_restorer.save_pretrained(tmp_path / "restorer")
    config = {"run": {"save_every": 1, "log_every": 1, "progress": False}, "init_from": str(tmp_path / "restorer"),
              "data": {"toy_faces": 6, "size": 32, "toy_identities": 10}, "rewards": {"weights": {"wavelet": 0.5, "ssim": 0.5}},
              "group_size": 3, "inputs_per_batch": 2, "batches_per_epoch": 1, "epochs": 4, "sample_steps": 3, "micro_batch": 3,
              "steps_per_epoch": 2, "lr": 1e-4, "old_decay_rate": 0.1, "held_out": {"every": 2, "toy_faces": 2, "sample_steps": 2}}
    ref, killed = _kill_and_resume(tmp_path, ["nft"], config, ["nft step 2/", 3])
    _assert_same_run(ref, killed)
