"""Checkpoint robustness: corrupt files are found and skipped, `auto` resumes or starts fresh, orphans go, bad values fail early."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from facereward.data.training_data import DataConfig
from facereward.train.accelerator import RunConfig
from facereward.train.base import TrainBaseConfig, check_config, train_base
from facereward.train.checkpoints import (
    CheckpointError,
    checkpoint_problem,
    find_checkpoint,
    load_checkpoint,
    remove_orphaned_temps,
    resume_run,
    save_checkpoint,
)
from facereward.train.lrpo import LRPOConfig
from facereward.train.lrpo import check_config as check_lrpo_config


def _save(out: Path, step: int, num_processes: int = 1) -> Path:
    torch.manual_seed(step)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return save_checkpoint(out, step, {"model": model}, {"stage1": opt}, {"epoch": 0, "num_processes": num_processes}, keep=5)


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _fresh() -> tuple[dict[str, torch.nn.Module], dict[str, torch.optim.Optimizer]]:
    model = torch.nn.Linear(3, 2)
    return {"model": model}, {"stage1": torch.optim.AdamW(model.parameters(), lr=1e-3)}


@pytest.mark.parametrize(("victim", "why"), [("model.safetensors", "truncated model.safetensors"),
                                             ("stage1.optim.pt", "corrupt stage1.optim.pt")])
@pytest.mark.parametrize("resume", ["latest", "auto"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, victim, why, resume):
    _save(tmp_path, 20)
    newest = _save(tmp_path, 40)
    _truncate(newest / victim)
    lines: list[str] = []
    assert find_checkpoint(tmp_path, resume, lines.append) == tmp_path / "checkpoints" / "step-00000020"
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith(f"warning: {newest}: {why}") and lines[0].endswith("; using step-00000020")


def test_safetensors_truncation_is_caught_by_the_header_check(tmp_path):
    path = _save(tmp_path, 1)
    assert checkpoint_problem(path) is None
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-4])  # only the last tensor bytes missing
    assert checkpoint_problem(path) == "truncated model.safetensors"
    (path / "state.json").write_text("{")
    assert checkpoint_problem(path) == "unreadable state.json"


def test_all_corrupt_is_an_error_for_latest_and_a_fresh_start_for_auto(tmp_path):
    for step in (20, 40):
        _truncate(_save(tmp_path, step) / "model.safetensors")
    with pytest.raises(CheckpointError, match="no valid checkpoint to resume from") as err:
        find_checkpoint(tmp_path, "latest", lambda line: None)
    assert "\n" not in str(err.value) and "step-00000040: truncated model.safetensors" in str(err.value)
    lines: list[str] = []
    assert find_checkpoint(tmp_path, "auto", lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("warning: ") and lines[0].endswith("; starting fresh")
    assert "step-00000020: truncated" in lines[0] and "step-00000040: truncated" in lines[0]


def test_auto_without_checkpoints_starts_fresh_and_says_so(tmp_path, capsys):
    assert find_checkpoint(tmp_path, "auto") is None
    assert capsys.readouterr().err == f"run.resume auto: no checkpoint in {tmp_path / 'checkpoints'}; starting fresh\n"
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        find_checkpoint(tmp_path, "latest")


def test_a_missing_process_rng_file_makes_the_checkpoint_invalid(tmp_path):
    path = _save(tmp_path, 6, num_processes=2)
    assert checkpoint_problem(path) == "no rng-1.safetensors"


def test_an_explicit_corrupt_folder_is_one_line_naming_the_file(tmp_path):
    path = _save(tmp_path, 3)
    _truncate(path / "stage1.optim.pt")
    with pytest.raises(CheckpointError, match=r"step-00000003: corrupt stage1\.optim\.pt") as err:
        find_checkpoint(tmp_path, str(path))
    assert "\n" not in str(err.value)
    modules, optimizers = _fresh()
    with pytest.raises(CheckpointError, match=r"step-00000003: corrupt stage1\.optim\.pt") as err:
        load_checkpoint(path, modules, optimizers)
    assert "\n" not in str(err.value)
    _truncate(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"step-00000003: truncated model\.safetensors$"):
        load_checkpoint(path, modules, optimizers)


def test_orphaned_temporaries_are_removed(tmp_path):
    _save(tmp_path, 2)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-00000004").mkdir()
    (root / ".tmp-step-00000004" / "model.safetensors").write_bytes(b"half")
    (root / ".latest.tmp").write_text("step-00000004")
    assert sorted(p.name for p in remove_orphaned_temps(tmp_path)) == [".latest.tmp", ".tmp-step-00000004"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]


def test_a_fresh_start_beside_a_corrupt_newer_checkpoint_keeps_its_own(tmp_path):
    _truncate(_save(tmp_path, 40) / "model.safetensors")
    model, opt = _fresh()
    save_checkpoint(tmp_path, 4, model, opt, {}, keep=1)  # pruning must not take step 4 for being the oldest
    assert find_checkpoint(tmp_path, "latest").name == "step-00000004"


def test_resume_run_rejects_a_different_number_of_processes(tmp_path):
    path = _save(tmp_path, 5, num_processes=2)
    (path / "rng-1.safetensors").write_bytes((path / "rng-0.safetensors").read_bytes())  # the other process's
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1)
    with pytest.raises(CheckpointError, match=r"^run\.resume: .*step-00000005 ran on 2 processes, this run on 1"):
        resume_run(accelerator, RunConfig(output_dir=str(tmp_path), resume="latest"))
    assert resume_run(accelerator, RunConfig(output_dir=str(tmp_path))) is None


def _base_config(tmp_path: Path) -> TrainBaseConfig:
    from facereward.models.restorer import PixelUNetConfig, RestorerConfig

    model = RestorerConfig(mode="pixel", size=32, cleaner_kwargs={"channels": 8, "num_blocks": 1, "downscale": 2},
                           pixel=PixelUNetConfig(block_out_channels=[16, 32], attention_levels=[False, False], norm_num_groups=8))
    return TrainBaseConfig(run=RunConfig(output_dir=str(tmp_path / "run"), save_every=2, log_every=1, progress=False, resume="auto"),
                           data=DataConfig(toy_faces=4, size=32, toy_identities=4), model=model,
                           stage1_steps=1, stage2_steps=1, batch_size=2, warmup_steps=0)


def test_train_base_with_resume_auto_twice(tmp_path, capsys):
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / ".tmp-step-00000002").mkdir()  # a save killed midway in an earlier run
    train_base(_base_config(tmp_path))
    assert f"run.resume auto: no checkpoint in {root}; starting fresh" in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]
    before = (root / "step-00000002" / "state.json").stat().st_mtime_ns
    first_log = json.loads((tmp_path / "run" / "metrics.json").read_text())["train_log"]

    train_base(_base_config(tmp_path))  # resumes at the end: no more steps, the model saved again
    assert f"run.resume auto: resuming from {root / 'step-00000002'}" in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]
    assert (root / "step-00000002" / "state.json").stat().st_mtime_ns == before
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train_log"] == first_log  # no steps, the log kept

    state = json.loads((root / "step-00000002" / "state.json").read_text())
    (root / "step-00000002" / "state.json").write_text(json.dumps({**state, "num_processes": 2}))
    (root / "step-00000002" / "rng-1.safetensors").write_bytes((root / "step-00000002" / "rng-0.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="ran on 2 processes, this run on 1"):
        train_base(_base_config(tmp_path))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("stage1_steps", -1, "stage1_steps must be >= 0, got -1"),
    ("stage2_steps", -3, "stage2_steps must be >= 0, got -3"),
])
def test_train_base_rejects_bad_step_counts(tmp_path, field, value, message):
    config = _base_config(tmp_path)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=f"^{message}$"):
        train_base(config)
    assert not (tmp_path / "run").exists()  # before any work starts
    with pytest.raises(ValueError, match="^stage1_steps and stage2_steps are both 0"):
        check_config(TrainBaseConfig(stage1_steps=0, stage2_steps=0))
    check_config(TrainBaseConfig(stage1_steps=0, stage2_steps=1))


@pytest.mark.parametrize(("field", "value"), [("group_size", 1), ("group_size", 0), ("sample_steps", 0), ("epochs", 0),
                                              ("inputs_per_batch", 0), ("batches_per_epoch", -1)])
def test_lrpo_rejects_values_that_cannot_train(field, value):
    config = LRPOConfig()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=f"^{field} must be >= {2 if field == 'group_size' else 1}") as err:
        check_lrpo_config(config)
    assert "\n" not in str(err.value)


def test_fp16_on_cpu_is_one_line_not_a_silent_fp32_run(tmp_path):
    from facereward.train.accelerator import make_accelerator

    with pytest.raises(ValueError, match=r"^run\.mixed_precision: fp16 needs a GPU .*use bf16 or no$"):
        make_accelerator(RunConfig(output_dir=str(tmp_path), mixed_precision="fp16", cpu=True), "x")
