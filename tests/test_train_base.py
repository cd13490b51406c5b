"""train-base: the loss goes down, checkpoints are atomic and resume, configs reject bad keys."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import yaml

from facereward.config import ConfigError, load_config
from facereward.data.imageio import write_image
from facereward.data.training_data import DataConfig, build_dataset
from facereward.models.ddim import make_scheduler, output_to_eps, scheduler_defaults, training_target
from facereward.models.restorer import PixelUNetConfig, Restorer, RestorerConfig
from facereward.train.accelerator import RunConfig
from facereward.train.base import (
    TrainBaseConfig,
    initial_restorer,
    stage1_loss,
    stage2_loss,
    train_base,
)
from facereward.train.checkpoints import CheckpointError, find_checkpoint, load_checkpoint, restore_rng, save_checkpoint


def _tiny_model() -> RestorerConfig:
    return RestorerConfig(
        mode="pixel", size=32,
        pixel=PixelUNetConfig(block_out_channels=[16, 32], attention_levels=[False, False], norm_num_groups=8),
        cleaner_kwargs={"channels": 8, "num_blocks": 1, "downscale": 2},
    )


def _config(tmp_path, **kw) -> TrainBaseConfig:
    base = dict(
        run=RunConfig(output_dir=str(tmp_path / "run"), save_every=4, log_every=1, progress=False),
        data=DataConfig(toy_faces=24, size=32, toy_identities=10),
        model=_tiny_model(), stage1_steps=4, stage2_steps=4, batch_size=4, warmup_steps=0,
    )
    base.update(kw)
    return TrainBaseConfig(**base)


def test_stage1_and_stage2_losses_go_down_on_a_fixed_batch():
    torch.manual_seed(0)
    restorer = Restorer.build(_tiny_model())
    ds = build_dataset(DataConfig(toy_faces=8, size=32, toy_identities=4))
    batch = {k: torch.stack([ds[i][k] for i in range(8)]) for k in ("hq", "lq")}
    opt = torch.optim.Adam(restorer.cleaner.parameters(), lr=2e-3)
    first = stage1_loss(restorer, batch).item()
    for _ in range(40):
        opt.zero_grad()
        stage1_loss(restorer, batch).backward()
        opt.step()
    assert stage1_loss(restorer, batch).item() < 0.9 * first

    opt = torch.optim.Adam(restorer.unet.parameters(), lr=2e-3)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731 - the same t and noise each time
    first = stage2_loss(restorer, batch, gen()).item()
    for _ in range(30):
        opt.zero_grad()
        stage2_loss(restorer, batch, gen()).backward()
        opt.step()
    assert stage2_loss(restorer, batch, gen()).item() < 0.5 * first


def test_train_base_writes_a_loadable_model_and_resumes(tmp_path):
    cfg = _config(tmp_path)
    out = train_base(cfg)
    restorer = Restorer.from_pretrained(out)
    assert restorer.config.size == 32
    ckpt = find_checkpoint(cfg.run.output_dir, "latest")
    assert ckpt.name == "step-00000008"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 8
    assert (tmp_path / "run" / "config.yaml").is_file()
    speed = json.loads((tmp_path / "run" / "speed.json").read_text())  # run.speed: auto chose per stage
    assert set(speed) == {"train-base/stage1", "train-base/stage2"} and len(speed["train-base/stage2"]["timings"]) == 4
    # no temporary folders left behind
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp*"))

    # resuming with more stage-2 steps continues from step 8 and ends at 12
    longer = _config(tmp_path, stage2_steps=8)
    longer.run.resume = "latest"
    train_base(longer)
    assert find_checkpoint(cfg.run.output_dir, "latest").name == "step-00000012"
    # keep_checkpoints=2 prunes older ones
    assert len(list((tmp_path / "run" / "checkpoints").glob("step-*"))) == 2


def test_checkpoint_round_trip_restores_weights_and_optimizer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    path = save_checkpoint(tmp_path, 5, {"m": model}, {"o": opt}, {"epoch": 2}, generators={"sampler": gen})
    expected = (torch.rand(3), torch.rand(3, generator=gen), np.random.rand(2), random.random())  # what the run draws next
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    state = load_checkpoint(path, {"m": model2}, {"o": opt2})
    assert state == {"step": 5, "epoch": 2, "checkpoint": str(path)}
    gen2 = torch.Generator().manual_seed(99)
    restore_rng(state, {"sampler": gen2})
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.rand(3, generator=gen2), expected[1])
    assert np.array_equal(np.random.rand(2), expected[2]) and random.random() == expected[3]  # numpy's and Python's too
    with pytest.raises(CheckpointError, match="no state for the random generator 'other'"):
        restore_rng(state, {"other": torch.Generator()})
    assert torch.equal(model.weight, model2.weight)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path, {"m": torch.nn.Linear(4, 2)}, {})
    with pytest.raises(CheckpointError, match="no checkpoint"):
        find_checkpoint(tmp_path / "elsewhere", "latest")


def test_config_yaml_overrides_and_bad_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"batch_size": 3, "run": {"seed": 7}, "model": {"pixel": {"layers_per_block": 2}}}))
    cfg = load_config(TrainBaseConfig, path, ["run.seed=9", "stage2_lr=1e-5"])
    assert (cfg.batch_size, cfg.run.seed, cfg.stage2_lr, cfg.model.pixel.layers_per_block) == (3, 9, 1e-5, 2)
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'bogus'"):
        path.write_text("bogus: 1\n")
        load_config(TrainBaseConfig, path)
    with pytest.raises(ConfigError, match="--set run.seed=abc: expected an integer"):
        load_config(TrainBaseConfig, None, ["run.seed=abc"])
    path.write_text("batch_size: 3\n")
    with pytest.raises(ConfigError, match=r"^--set bogus=1: unknown key 'bogus' in TrainBaseConfig"):  # not blamed on c.yaml
        load_config(TrainBaseConfig, path, ["bogus=1"])
    with pytest.raises(ConfigError, match=r"^--set run.sede=1: unknown key 'sede' in run \(known: output_dir, seed"):
        load_config(TrainBaseConfig, path, ["run.sede=1"])
    with pytest.raises(ConfigError, match="model.mode"):
        load_config(TrainBaseConfig, None, ["model.mode=voxel"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(TrainBaseConfig, tmp_path / "missing.yaml")


def test_build_dataset_needs_exactly_one_source(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        build_dataset(DataConfig())
    folder = tmp_path / "hq"
    write_image(folder / "a.png", np.full((32, 32, 3), 0.5, np.float32))
    with pytest.raises(ValueError, match="exactly one"):
        build_dataset(DataConfig(hq_dir=str(folder), toy_faces=4))
    ds = build_dataset(DataConfig(hq_dir=str(folder), size=32))
    assert ds[0]["lq"].shape == (3, 32, 32)


def test_two_cpu_processes_train_together(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU joins one gloo group (not two lone runs)."""
    import os
    import subprocess
    import sys

    cfg = {
        "run": {"output_dir": str(tmp_path / "run"), "save_every": 2, "log_every": 1, "progress": False},
        "data": {"toy_faces": 8, "size": 32, "toy_identities": 10},
        "model": {"mode": "pixel", "size": 32, "cleaner_kwargs": {"channels": 8, "num_blocks": 1, "downscale": 2},
                  "pixel": {"block_out_channels": [16, 32], "attention_levels": [False, False], "norm_num_groups": 8}},
        "stage1_steps": 1, "stage2_steps": 1, "batch_size": 2,
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no", "-m", "facereward.cli", "train-base", "--config", str(tmp_path / "c.yaml")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("saved the restorer to") == 1  # only the main process reports
    assert proc.stdout.count("train-base: 2 steps") == 1
    state = json.loads((find_checkpoint(tmp_path / "run", "latest") / "state.json").read_text())
    assert state["num_processes"] == 2 and state["step"] == 2


def test_min_snr_weighting_matches_a_hand_computation():
    torch.manual_seed(0)
    restorer = Restorer.build(_tiny_model())
    batch = {"hq": torch.rand(3, 3, 32, 32), "lq": torch.rand(3, 3, 32, 32)}
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    uniform = stage2_loss(restorer, batch, gen())
    weighted = stage2_loss(restorer, batch, gen(), weighting="min_snr", min_snr_gamma=5.0)
    # redo the draws by hand
    g = gen()
    t = torch.randint(0, 1000, (3,), generator=g)
    noise = torch.randn((3, 3, 32, 32), generator=g)
    abar = restorer.scheduler.alphas_cumprod[t].float()
    x_t = abar.sqrt().view(-1, 1, 1, 1) * (batch["hq"] * 2 - 1) + (1 - abar).sqrt().view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        cond = restorer.condition(restorer.clean(batch["lq"]))
        per = (restorer.predict_eps(x_t, t, cond) - noise).pow(2).flatten(1).mean(1)
    snr = abar / (1 - abar)
    assert torch.allclose(uniform, per.mean(), atol=1e-6)
    assert torch.allclose(weighted, (per * torch.minimum(snr, torch.tensor(5.0)) / snr).mean(), atol=1e-6)
    with pytest.raises(ValueError, match="loss_weighting"):
        stage2_loss(restorer, batch, gen(), weighting="p2")


def test_v_and_x0_prediction_targets_and_min_snr_weights_match_a_hand_computation():
    """abar = 0.25: v = 0.5 eps - 0.866 x0; Min-SNR weights min(SNR, g) / (SNR + 1) for v and min(SNR, g) for x0."""
    x0, noise, abar = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.25])
    assert training_target(x0, noise, abar, "v_prediction").item() == pytest.approx(0.5 * 2 - 0.75 ** 0.5 * 1, abs=1e-6)
    assert training_target(x0, noise, abar, "sample").item() == 1.0
    x_t = 0.5 * x0 + 0.75 ** 0.5 * noise
    for kind in ("epsilon", "v_prediction", "sample"):
        assert output_to_eps(training_target(x0, noise, abar, kind), x_t, abar, kind).item() == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        training_target(x0, noise, abar, "flow")

    for kind in ("v_prediction", "sample"):
        torch.manual_seed(0)
        restorer = Restorer.build(RestorerConfig(**{**_tiny_model().__dict__, "prediction_type": kind}))
        assert restorer.prediction_type == kind and restorer.scheduler.config.prediction_type == kind
        batch = {"hq": torch.rand(3, 3, 32, 32), "lq": torch.rand(3, 3, 32, 32)}
        gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
        g = gen()
        t = torch.randint(0, 1000, (3,), generator=g)
        eps = torch.randn((3, 3, 32, 32), generator=g)
        a = restorer.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        x0 = batch["hq"] * 2 - 1
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = a.sqrt() * eps - (1 - a).sqrt() * x0 if kind == "v_prediction" else x0
        with torch.no_grad():
            cond = restorer.condition(restorer.clean(batch["lq"]))
            out = restorer.predict_output(x_t, t, cond)
            per = (out - target).pow(2).flatten(1).mean(1)
            # the sampler's eps is the conversion of the raw output
            implied = (a.sqrt() * out + (1 - a).sqrt() * x_t if kind == "v_prediction" else (x_t - a.sqrt() * out) / (1 - a).sqrt())
            assert torch.allclose(restorer.predict_eps(x_t, t, cond), implied, atol=1e-5)
        snr = a.flatten() / (1 - a.flatten())
        weight = snr.clamp(max=5.0) / (snr + 1 if kind == "v_prediction" else 1)
        assert torch.allclose(stage2_loss(restorer, batch, gen(), weighting="min_snr"), (per * weight).mean(), atol=1e-6)


def test_init_schedule_fine_tunes_an_eps_model_into_v_prediction(tmp_path):
    """init_from + init_schedule: the same weights, `model`'s schedule and target, the sampling defaults kept."""
    eps_model = tmp_path / "eps"
    start = Restorer.build(RestorerConfig(**{**_tiny_model().__dict__, "eta": 0.5}))
    start.scheduler = make_scheduler(spacing="linspace", final_alpha_bar="first")
    start.save_pretrained(eps_model)
    v_model = RestorerConfig(**{**_tiny_model().__dict__, "prediction_type": "v_prediction", "beta_schedule": "linear",
                                "beta_start": 1e-4, "beta_end": 0.02})
    config = _config(tmp_path, init_from=str(eps_model), init_schedule=True, model=v_model, stage1_steps=0, stage2_steps=2)
    first = initial_restorer(config)
    assert first.prediction_type == "v_prediction" and first.scheduler.config.beta_schedule == "linear"
    assert first.scheduler.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)  # DDPM's terminal alpha-bar
    assert scheduler_defaults(first.scheduler) == ("linspace", "first") and first.config.eta == 0.5
    assert all(torch.equal(a, b) for a, b in zip(first.unet.state_dict().values(), start.unet.state_dict().values()))
    trained = Restorer.from_pretrained(train_base(config))
    assert trained.prediction_type == "v_prediction" and trained.config.prediction_type == "v_prediction"
    assert scheduler_defaults(trained.scheduler) == ("linspace", "first")
    out = trained.restore(torch.rand(1, 3, 32, 32), steps=2, generator=torch.Generator().manual_seed(0))["restored"]
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="init_schedule needs init_from"):
        initial_restorer(_config(tmp_path, init_schedule=True))
