"""LRPO (docs/methods.md 2): advantages, noise-level weights, PPO-clip, the regulariser, group batches, runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from facereward.data.datasets import InMemoryHQDataset
from facereward.models.ddim import DDIMSchedule, q_sample
from facereward.models.restorer import Restorer
from facereward.models.ddim import ddim_step_with_logprob, gaussian_log_prob, make_scheduler
from facereward.train.lrpo import (
    EpochBuffer,
    LRPOConfig,
    assign_advantages,
    check_config,
    likelihood_regulariser,
    minibatches,
    noise_level_weights,
    noised_gt_targets,
    pad_zero_advantage,
    ppo_clip_loss,
    step_advantages,
    step_loss,
    train_lrpo,
    trained_step_table,
)
from facereward.train.lrpo import _zero_stats as zero_stats
from facereward.train.groups import group_advantages, group_batch
from facereward.weights import WEIGHTS_DIR

TOY_FRM = str(WEIGHTS_DIR / "toy-frm")


# ---- advantages ---------------------------------------------------------------------------------


def test_group_advantages_have_zero_mean_per_group_and_the_global_std():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, generator=g) * 3 + 1
    groups = torch.tensor([5, 5, 5, 2, 2, 2, 9, 9, 9, 7, 7, 7])
    adv = group_advantages(rewards, groups, "global")
    for gid in groups.unique():
        assert abs(float(adv[groups == gid].mean())) < 1e-6
    means = {int(gid): rewards[groups == gid].mean() for gid in groups.unique()}
    by_hand = torch.stack([(r - means[int(gid)]) / (rewards.std(unbiased=False) + 1e-4) for r, gid in zip(rewards, groups)])
    assert torch.allclose(adv, by_hand, atol=1e-5)
    per_group = group_advantages(rewards, groups, "group")
    for gid in groups.unique():
        sel = groups == gid
        assert abs(float(per_group[sel].mean())) < 1e-6
        assert torch.allclose(per_group[sel], (rewards[sel] - rewards[sel].mean()) / (rewards[sel].std(unbiased=False) + 1e-4), atol=1e-5)


def test_a_group_with_equal_rewards_gets_exactly_zero_advantage_and_is_dropped():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.2, 0.5, 0.9])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(rewards, groups)
    assert (adv[:3] == 0).all() and (adv[3:] != 0).all()

    config = LRPOConfig(init_from="x")
    buffer = _buffer(6, n_train=2, groups=groups)
    assign_advantages(buffer, rewards, config, 2, OneProcess())
    assert not buffer.keep[:3].any() and buffer.keep[3:].all()
    assert buffer.advantages.shape == (6, 2) and (buffer.advantages[:3] == 0).all()
    config.zero_advantage, config.batches_per_epoch = "pad", 4  # the original pads to a multiple of its sampling batches
    assign_advantages(buffer, rewards, config, 2, OneProcess())
    assert int(buffer.keep.sum()) == 4 and buffer.keep[3:].all()


class OneProcess:
    process_index, num_processes = 0, 1

    def gather(self, x):
        return x

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


def _buffer(n: int, n_train: int, groups=None, seed: int = 0) -> EpochBuffer:
    g = torch.Generator().manual_seed(seed)
    return EpochBuffer(samples=torch.randn(n_train + 1, n, 2, 4, 4, generator=g), log_probs=torch.randn(n, n_train, generator=g),
                       sigmas=torch.rand(n, n_train + 1, generator=g) + 0.1, cond=torch.randn(n, 2, 4, 4, generator=g),
                       z_gt=torch.randn(n, 2, 4, 4, generator=g), group_ids=groups if groups is not None else torch.arange(n),
                       rows=torch.arange(n))


def test_trained_step_tables_all_window_and_random():
    config = LRPOConfig(init_from="x", sample_steps=8)  # 7 trainable steps
    rows = torch.tensor([3, 0, 5])
    assert trained_step_table(config, 7, rows, 0).tolist() == [list(range(7))] * 3
    config.trained_steps, config.trained_count, config.window_every = "window", 3, 2
    starts = [trained_step_table(config, 7, rows, e)[0, 0].item() for e in range(12)]
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 0, 0]  # one step later every 2 epochs, wrapping after 4
    assert trained_step_table(config, 7, rows, 2).tolist() == [[1, 2, 3]] * 3
    config.trained_steps = "random"
    table = trained_step_table(config, 7, rows, 0)
    assert table.shape == (3, 3) and all(sorted(set(r)) == r for r in table.tolist())  # distinct, ascending
    assert len({tuple(r) for r in table.tolist()}) > 1  # per sample
    again = trained_step_table(config, 7, torch.tensor([5, 3]), 0)  # by global row: the same on any process split
    assert again.tolist() == [table[2].tolist(), table[0].tolist()]
    assert trained_step_table(config, 7, rows, 1).tolist() != table.tolist()  # redrawn each epoch
    config.trained_count = 8
    with pytest.raises(ValueError, match=r"trained_count must be in \[0, 7\]"):
        check_config(config)


def test_step_loss_with_a_step_per_row_is_the_per_step_losses_combined():
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), 4)
    n_train, n = 3, 4
    buffer = _buffer(n, n_train, seed=4)
    buffer.advantages = torch.randn(n, n_train, generator=torch.Generator().manual_seed(5))
    buffer.keep = torch.tensor([True, True, True, False])
    buffer.targets = torch.randn(2, n, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    config = LRPOConfig(init_from="x", sample_steps=4, reg_steps=2, clip_range=0.2)
    stats = zero_stats(torch.device("cpu"))
    ks = torch.tensor([0, 2, 1, 2])  # rows 1 and 2 regularised (steps 1, 2), row 0 not, row 3 not kept
    got = step_loss(FakeRestorer(), None, buffer, torch.arange(n), ks, schedule, config, n_train, 3.0, None, OneProcess(),
                    stats, True)
    parts = sum(step_loss(FakeRestorer(), None, buffer, torch.tensor([r]), int(ks[r]), schedule, config, n_train, 3.0, None,
                          OneProcess(), zero_stats(torch.device("cpu")), True) for r in range(n))
    assert torch.allclose(got, parts, rtol=1e-5)
    assert float(stats["reg_count"]) == 2.0 and float(stats["count"]) == 3.0


def test_pad_zero_advantage_and_minibatches():
    keep = torch.tensor([True, False, True, False, False, True, True])
    padded = pad_zero_advantage(keep, 3, np.random.default_rng(0))
    assert int(padded.sum()) == 6 and padded[keep].all()
    assert torch.equal(pad_zero_advantage(keep, 4, np.random.default_rng(0)), keep)  # 4 kept: already a multiple
    order = torch.tensor([4, 0, 3, 1, 2])
    assert [m.tolist() for m in minibatches(5, 2, order)] == [[4, 0], [3, 1], [2]]
    assert [m.tolist() for m in minibatches(5, 0, order)] == [[4, 0, 3, 1, 2]]


class FakeRestorer:
    """eps = 0.3 x_t + cond: enough to exercise the step loss without a network."""

    def predict_eps(self, x_t, t, cond, net=None):
        return 0.3 * x_t + cond


def test_step_loss_is_the_originals_per_step_scale():
    """At a regularised step j: mean_b pg_j + 0.001 mean_b reg_j over the kept samples (docs/methods.md 2.3), by hand."""
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), 4)
    n_train, n = 3, 5
    buffer = _buffer(n, n_train, seed=1)
    buffer.samples[1:] = buffer.samples[1:] * 0.1 + buffer.samples[:-1] * 0.9  # plausible next samples
    buffer.advantages = torch.randn(n, n_train, generator=torch.Generator().manual_seed(2))
    buffer.keep = torch.tensor([True, True, False, True, True])
    buffer.targets = torch.randn(2, n, 2, 4, 4, generator=torch.Generator().manual_seed(3))  # reg_steps = 2: steps 1, 2
    config = LRPOConfig(init_from="x", sample_steps=4, reg_steps=2, clip_range=0.2)
    k, rows = 2, torch.arange(n)
    stats = zero_stats(torch.device("cpu"))
    got = step_loss(FakeRestorer(), None, buffer, rows, k, schedule, config, n_train, 4.0, None, OneProcess(), stats, True)
    x_t, x_prev, t = buffer.samples[k], buffer.samples[k + 1], schedule.timesteps[k].expand(n)
    step = ddim_step_with_logprob(0.3 * x_t + buffer.cond, t, x_t, schedule, 1.0, prev_sample=x_prev)
    ratio = torch.exp(step.log_prob - buffer.log_probs[:, k])
    a = buffer.advantages[:, k]
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
    reg = 1 - torch.exp(gaussian_log_prob(buffer.targets[1], step.mean, step.std) / 40)
    kept = buffer.keep
    assert torch.allclose(got, pg[kept].mean() + 0.001 * reg[kept].mean(), rtol=1e-5)
    # an unregularised step is the policy term alone, on the same scale
    got0 = step_loss(FakeRestorer(), None, buffer, rows, 0, schedule, config, n_train, 4.0, None, OneProcess(), stats, False)
    step0 = ddim_step_with_logprob(0.3 * buffer.samples[0] + buffer.cond, schedule.timesteps[0].expand(n), buffer.samples[0],
                                   schedule, 1.0, prev_sample=buffer.samples[1])
    r0 = torch.exp(step0.log_prob - buffer.log_probs[:, 0])
    a0 = buffer.advantages[:, 0]
    assert torch.allclose(got0, torch.maximum(-a0 * r0, -a0 * r0.clamp(0.8, 1.2))[kept].mean(), rtol=1e-5)
    assert float(stats["count"]) == 8.0 and float(stats["reg_count"]) == 4.0


def test_noise_level_weights_are_sigma_over_its_mean_and_advantages_are_clipped():
    sigmas = torch.tensor([[0.4, 0.3, 0.2, 0.1, 0.0], [0.8, 0.6, 0.4, 0.2, 0.0]])
    w = noise_level_weights(sigmas)
    assert torch.allclose(w, sigmas / sigmas.mean(dim=1, keepdim=True))
    assert torch.allclose(w[0], torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0]))
    adv = torch.tensor([1.0, -4.0])
    per_step = step_advantages(adv, sigmas, "noise_level", clip=5.0)
    assert torch.allclose(per_step[0], torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0]))
    assert torch.allclose(per_step[1], torch.tensor([-5.0, -5.0, -4.0, -2.0, 0.0]))  # -8 and -6 clipped to -5
    uniform = step_advantages(torch.tensor([7.0, -1.0]), sigmas, "uniform", clip=5.0)
    assert torch.allclose(uniform, torch.tensor([[5.0] * 5, [-1.0] * 5]))


# ---- loss terms ---------------------------------------------------------------------------------


def test_ppo_clip_loss_matches_the_definition():
    old = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    new = old + torch.tensor([0.0, 1e-3, -1e-3, 5e-5])
    adv = torch.tensor([1.0, 1.0, -2.0, 3.0])
    terms = ppo_clip_loss(new, old, adv, clip_range=1e-4)
    ratio = torch.exp(new - old)
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 1e-4, 1 + 1e-4))
    assert torch.allclose(terms.loss, expected)
    assert terms.clipped.tolist() == [False, True, True, False]
    same = ppo_clip_loss(old, old, adv, 1e-4)
    assert (same.ratio == 1).all() and not same.clipped.any() and torch.equal(same.loss, -adv)


def test_likelihood_regulariser_matches_a_hand_computation():
    g = torch.Generator().manual_seed(1)
    mean, target = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    std = torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    got = likelihood_regulariser(mean, std, target, temperature=40.0)
    for i in range(2):
        s = float(std[i])
        elems = [-((float(x) - float(m)) ** 2) / (2 * s * s) - math.log(s) - 0.5 * math.log(2 * math.pi)
                 for x, m in zip(target[i].flatten(), mean[i].flatten())]
        assert abs(float(got[i]) - (1 - math.exp(sum(elems) / len(elems) / 40.0))) < 1e-6


def test_gt_targets_closed_form_and_compounding(pixel_restorer):
    schedule = DDIMSchedule.from_scheduler(pixel_restorer.scheduler, 6)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 3, 8, 8, generator=g)
    noise = torch.randn(6, 2, 3, 8, 8, generator=g)
    reg_steps = [3, 4]  # the last two of 5 trained steps: targets at levels t_4 and t_5
    closed = noised_gt_targets(z, schedule, reg_steps, noise, "closed_form")
    for i, j in enumerate([4, 5]):
        t = schedule.timesteps[j].expand(2)
        assert torch.allclose(closed[i], q_sample(z, noise[j], t, schedule.alphas_cumprod))
    comp = noised_gt_targets(z, schedule, reg_steps, noise, "compounding")
    z5 = q_sample(z, noise[5], schedule.timesteps[5].expand(2), schedule.alphas_cumprod)
    z4 = q_sample(z5, noise[4], schedule.timesteps[4].expand(2), schedule.alphas_cumprod)
    assert torch.allclose(comp[1], z5) and torch.allclose(comp[0], z4)


# ---- group batches ------------------------------------------------------------------------------


def _dataset(n: int = 4, size: int = 32) -> InMemoryHQDataset:
    rng = np.random.default_rng(0)
    return InMemoryHQDataset([rng.random((size, size, 3), dtype=np.float32) for _ in range(n)], preset="diffbir", seed=3)


def test_group_batch_rows_of_a_group_share_one_degraded_input():
    ds = _dataset()
    whole = group_batch(ds, [2, 0], 3, group_offset=10, rank=0, world_size=1)
    assert whole.group_ids.tolist() == [10, 10, 10, 11, 11, 11]
    assert all(torch.equal(whole.lq[0], whole.lq[i]) for i in (1, 2))
    assert torch.equal(whole.lq[3], ds[0]["lq"]) and not torch.equal(whole.lq[0], whole.lq[3])
    halves = [group_batch(ds, [2, 0], 3, 10, rank, 2) for rank in (0, 1)]  # one group per process
    assert torch.equal(torch.cat([h.lq for h in halves]), whole.lq)
    split = [group_batch(ds, [1], 4, 0, rank, 2) for rank in (0, 1)]  # one group of 4 over 2 processes
    assert all(torch.equal(h.lq[i], ds[1]["lq"]) for h in split for i in range(2))
    assert [h.group_ids.tolist() for h in split] == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="divide among 4 processes"):
        group_batch(ds, [2, 0], 3, 0, 0, 4)


# ---- runs ---------------------------------------------------------------------------------------


def _config(tmp_path, model_dir, name: str = "run", **fields) -> LRPOConfig:
    from facereward.data.training_data import DataConfig
    from facereward.train.heldout import HeldOutConfig
    from facereward.train.accelerator import RunConfig

    config = LRPOConfig(
        run=RunConfig(output_dir=str(tmp_path / name), save_every=1, log_every=1, progress=False),
        data=DataConfig(toy_faces=6, size=32, toy_identities=10),
        init_from=str(model_dir),
        group_size=3, inputs_per_batch=2, batches_per_epoch=1, epochs=1, sample_steps=4, micro_batch=3, reg_steps=2,
        lr=1e-4, held_out=HeldOutConfig(every=0),
    )
    config.rewards.weights = {"wavelet": 0.5, "ssim": 0.5}
    for key, value in fields.items():
        setattr(config, key, value)
    return config


def _history(run_dir) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["train_log"]


def test_default_stepping_is_one_step_per_minibatch_and_timestep_and_the_clip_acts(tmp_path, pixel_dir):
    """The original's stepping: 6 samples in minibatches of 3, 3 trained steps -> 6 optimizer steps per epoch."""
    config = _config(tmp_path, pixel_dir, lr=1e-3, train_batch_size=3)
    assert config.stepping == "per_timestep" and check_config(config) == 3
    train_lrpo(config)
    (epoch,) = _history(tmp_path / "run")
    assert epoch["ppo/optimizer_steps"] == 6.0
    assert epoch["ppo/ratio_dev_first"] == 0.0  # the first minibatch's first timestep: nothing has stepped yet
    assert epoch["ppo/clip_fraction"] > 0 and epoch["ppo/ratio_dev_max"] > config.clip_range
    config = _config(tmp_path, pixel_dir, "accumulated", lr=1e-3, train_batch_size=3, stepping="per_minibatch")
    train_lrpo(config)
    (epoch,) = _history(tmp_path / "accumulated")
    assert epoch["ppo/optimizer_steps"] == 2.0 and epoch["ppo/ratio_dev_first"] == 0.0


@pytest.mark.parametrize("mode", ["window", "random"])
def test_training_a_subset_of_steps_takes_fewer_optimizer_steps_and_learns(tmp_path, pixel_dir, mode):
    """6 samples in minibatches of 3, 2 of 3 trainable steps per sample: 4 optimizer steps instead of 6."""
    config = _config(tmp_path, pixel_dir, lr=1e-3, train_batch_size=3, trained_steps=mode, trained_count=2, reg_steps=1)
    out = train_lrpo(config)
    (epoch,) = _history(tmp_path / "run")
    assert epoch["ppo/optimizer_steps"] == 4.0 and epoch["ppo/ratio_dev_first"] == 0.0
    assert math.isfinite(epoch["ppo/regulariser"]) and epoch["ppo/ratio_dev_max"] > 0
    base, trained = Restorer.from_pretrained(pixel_dir), Restorer.from_pretrained(out)
    assert any(not torch.equal(a, b) for a, b in zip(trained.unet.state_dict().values(), base.unet.state_dict().values()))


def test_pixel_run_first_inner_epoch_has_ratio_one_then_learns(tmp_path, pixel_dir):
    """The accumulated variant over all samples: one step per inner epoch, so the first inner epoch has ratio 1 throughout."""
    config = _config(tmp_path, pixel_dir, inner_epochs=2, lr=1e-3, stepping="per_minibatch", train_batch_size=0)
    out = train_lrpo(config)
    (epoch,) = _history(tmp_path / "run")
    assert epoch["ppo/inner0/ratio_dev_max"] == 0.0 and epoch["ppo/inner0/clip_fraction"] == 0.0
    assert epoch["ppo/inner0/approx_kl"] == 0.0
    assert epoch["ppo/inner1/ratio_dev_max"] > 0  # the optimizer step moved the policy
    assert epoch["ppo/inner0/optimizer_steps"] == 1.0
    assert abs(epoch["adv/mean"]) < 1e-5 and epoch["adv/kept_fraction"] == 1.0
    for key in ("reward", "reward/wavelet", "reward/ssim", "reward_std", "ppo/inner0/regulariser", "ppo/inner0/grad_norm"):
        assert math.isfinite(epoch[key]), key
    trained = Restorer.from_pretrained(out)
    base = Restorer.from_pretrained(pixel_dir)
    moved = [not torch.equal(a, b) for a, b in zip(trained.unet.state_dict().values(), base.unet.state_dict().values())]
    assert any(moved)
    assert all(torch.equal(a, b) for a, b in zip(trained.cleaner.state_dict().values(), base.cleaner.state_dict().values()))


def test_resume_continues_the_same_run(tmp_path, pixel_dir):
    straight = train_lrpo(_config(tmp_path, pixel_dir, "straight", epochs=2, train_batch_size=3))
    train_lrpo(_config(tmp_path, pixel_dir, "resumed", epochs=1, train_batch_size=3))
    config = _config(tmp_path, pixel_dir, "resumed", epochs=2, train_batch_size=3)
    config.run.resume = "latest"
    resumed = train_lrpo(config)
    a, b = _history(tmp_path / "straight"), _history(tmp_path / "resumed")
    assert [e["epoch"] for e in b] == [1, 2] and b[1]["ppo/optimizer_steps"] == 6.0  # 2 minibatches x 3 steps
    assert a[1]["reward"] == pytest.approx(b[1]["reward"], abs=1e-6)
    # the training wall-clock carries over the resume (reward per compute, docs/methods.md 2.4)
    assert b[1]["time/train_s"] == pytest.approx(b[0]["time/train_s"] + b[1]["time/epoch_s"], rel=1e-6)
    sa, sb = Restorer.from_pretrained(straight).unet.state_dict(), Restorer.from_pretrained(resumed).unet.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-7) for k in sa)


def test_lora_run_with_kl_to_the_base_and_uniform_advantages(tmp_path, pixel_dir):
    from facereward.train.trainable import LoraSettings

    config = _config(tmp_path, pixel_dir, lora=LoraSettings(rank=2, target_modules=["conv1", "conv2"]), kl_beta=0.1,
                     adv_weighting="uniform", adv_std="group", reg_noising="compounding", lr=1e-2, inner_epochs=2,
                     stepping="per_minibatch", train_batch_size=0)
    out = train_lrpo(config)
    (epoch,) = _history(tmp_path / "run")
    assert epoch["ppo/inner0/kl"] == 0.0 and epoch["ppo/inner1/kl"] > 0  # the base is the reference
    assert epoch["ppo/inner0/ratio_dev_max"] == 0.0
    trained = Restorer.from_pretrained(out)  # LoRA merged into a plain folder
    assert not any("lora" in k for k in trained.unet.state_dict())


def test_latent_run_with_frm_reward_kl_to_a_copy_and_held_out(tmp_path, latent_restorer):
    from facereward.train.heldout import HeldOutConfig

    latent_restorer.save_pretrained(tmp_path / "latent")
    config = _config(tmp_path, tmp_path / "latent", kl_beta=0.05, reg_steps=2,
                     held_out=HeldOutConfig(every=1, toy_faces=2, sample_steps=2, identity="none"))
    config.rewards.weights = {"frm": 0.1, "wavelet": 0.3}
    config.rewards.options = {"frm": {"path": TOY_FRM}}
    out = train_lrpo(config)
    base_scores, epoch = _history(tmp_path / "run")
    assert epoch["ppo/ratio_dev_first"] == 0.0 and math.isfinite(epoch["reward/frm"])
    held = {"held_out/psnr", "held_out/reward", "held_out/reward/frm", "held_out/reward/wavelet"}
    assert held <= set(epoch) and held == {k for k in base_scores if k != "held_out/ssim"} - {"epoch"}  # epoch 0: the base
    assert base_scores["epoch"] == 0 and "reward" not in base_scores
    trained = Restorer.from_pretrained(out)
    assert trained.mode == "latent"
    base = Restorer.from_pretrained(tmp_path / "latent")
    assert all(torch.equal(a, b) for a, b in zip(trained.unet.state_dict().values(), base.unet.state_dict().values()))


def test_bad_config_names_the_field(tmp_path, pixel_dir):
    for fields, message in (({"micro_batch": 0}, "micro_batch"), ({"group_size": 0}, "group_size"),
                            ({"adv_std": "batch"}, "adv_std"), ({"timestep_fraction": 0.1}, "timestep_fraction"),
                            ({"reg_steps": 4}, "reg_steps"), ({"clip_range": 0.0}, "clip_range"),
                            ({"eta": 0.0}, "eta")):
        with pytest.raises(ValueError, match=message):
            check_config(_config(tmp_path, pixel_dir, **fields))
    assert check_config(_config(tmp_path, pixel_dir, sample_steps=50)) == 49
    config = _config(tmp_path, pixel_dir, group_size=3, inputs_per_batch=1)
    with pytest.raises(ValueError, match="kl_reference 'base' needs LoRA"):
        train_lrpo(_config(tmp_path, pixel_dir, kl_beta=0.1, kl_reference="base"))
    assert config.group_size == 3


def test_cli_lrpo_runs_an_ablation_and_reports_bad_rewards(tmp_path, pixel_dir):
    from typer.testing import CliRunner

    from facereward.cli import app

    tiny = ["--set", "data.size=32", "--set", "data.toy_identities=10", "--set", "group_size=2", "--set", "inputs_per_batch=2",
            "--set", "batches_per_epoch=1", "--set", "sample_steps=3", "--set", "micro_batch=4", "--set", "held_out.every=0",
            "--set", "run.progress=false"]
    args = ["lrpo", "--init-from", str(pixel_dir), "--toy-faces", "4", "--epochs", "1", "--output-dir", str(tmp_path / "cli"),
            "--reward", "wavelet=0.7", "--reward", "psnr=0.01", "--no-regulariser", "--uniform-advantages", *tiny]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "saved the LRPO restorer" in result.output
    saved = (tmp_path / "cli" / "config.yaml").read_text()
    assert "reg_weight: 0.0" in saved and "adv_weighting: uniform" in saved
    (epoch,) = _history(tmp_path / "cli")
    assert {k for k in epoch if k.startswith("reward/")} == {"reward/wavelet", "reward/psnr"}
    assert epoch["ppo/regulariser"] == 0.0
    bad = CliRunner().invoke(app, ["lrpo", "--reward", "wavelet"])
    assert bad.exit_code == 2 and "NAME=WEIGHT" in bad.output


def test_gradient_checkpointing_trains_the_same_weights(tmp_path, latent_restorer):
    """run.gradient_checkpointing recomputes the ControlNet's activations in backward: same weights, less memory."""
    latent_restorer.save_pretrained(tmp_path / "latent")
    plain = _config(tmp_path, tmp_path / "latent", "plain", lr=1e-3)
    checkpointed = _config(tmp_path, tmp_path / "latent", "checkpointed", lr=1e-3)
    checkpointed.run.gradient_checkpointing = True
    plain.run.speed = checkpointed.run.speed = "off"  # one layout for both: only checkpointing differs
    a = Restorer.from_pretrained(train_lrpo(plain)).controlnet.state_dict()
    b = Restorer.from_pretrained(train_lrpo(checkpointed)).controlnet.state_dict()
    base = Restorer.from_pretrained(tmp_path / "latent").controlnet.state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_gradient_checkpointing_on_a_network_without_it_is_one_line(pixel_restorer):
    from facereward.train.trainable import LoraSettings, prepare_trainable

    pixel_restorer.unet._supports_gradient_checkpointing = False  # as a user's own stage-2 network might be
    with pytest.raises(ValueError, match=r"^run\.gradient_checkpointing: the UNet2DModel does not support it$"):
        prepare_trainable(pixel_restorer, LoraSettings(), gradient_checkpointing=True)
