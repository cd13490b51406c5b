"""Diffusion-DPO (docs/methods.md 5.2): the loss, the first step, offline and online pairs, resume, 1 vs 2 processes."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facereward.models.restorer import Restorer
from facereward.train.dpo import (
    DPOConfig,
    PairBatch,
    check_config,
    dpo_loss,
    dpo_terms,
    load_offline_pairs,
    pair_draws,
    pair_terms,
    rank_pairs,
    step_shares,
    train_dpo,
    warmup_lr,
)

LOG2_F32 = float(torch.log(torch.tensor(2.0)))  # -log sigmoid(0) in float32


class OneProcess:
    process_index, num_processes = 0, 1

    def autocast(self):
        return contextlib.nullcontext()


# ---- the loss -----------------------------------------------------------------------------------


def test_loss_matches_a_hand_computation_and_its_gradient_sign():
    # pair 1: model (0.30, 0.50), reference (0.40, 0.45), beta 10: (-0.20) - (-0.05) = -0.15, inside = -5 * -0.15 = 0.75,
    #   loss = log(1 + e^-0.75) = log(1.472367) = 0.386871
    # pair 2: model (0.60, 0.20), reference (0.50, 0.50): 0.40 - 0 = 0.40, inside = -5 * 0.40 = -2.0,
    #   loss = log(1 + e^2) = log(8.389056) = 2.126928
    model_w = torch.tensor([0.30, 0.60], requires_grad=True)
    model_l = torch.tensor([0.50, 0.20], requires_grad=True)
    ref_w, ref_l = torch.tensor([0.40, 0.50]), torch.tensor([0.45, 0.50])
    terms = dpo_terms(model_w, model_l, ref_w, ref_l, beta=10.0)
    assert terms.inside.tolist() == pytest.approx([0.75, -2.0], abs=1e-6)
    assert terms.loss.tolist() == pytest.approx([0.386871, 2.126928], abs=1e-6)
    assert terms.correct.tolist() == [1.0, 0.0]
    loss, accuracy, margin = dpo_loss(model_w, model_l, ref_w, ref_l, beta=10.0)
    accuracy, margin = accuracy.detach(), margin.detach()
    assert loss.detach().item() == pytest.approx((0.386871 + 2.126928) / 2, abs=1e-6)
    assert accuracy.item() == 0.5 and margin.item() == pytest.approx((0.75 - 2.0) / 2, abs=1e-6)
    loss.backward()
    assert (model_w.grad > 0).all() and (model_l.grad < 0).all()  # a lower error on the winner lowers the loss
    # the default beta 5000 with the half is diffusers' beta_dpo 2500 without it (train_diffusion_dpo.py)
    g = torch.Generator().manual_seed(0)
    m_w, m_l, r_w, r_l = (0.1 + 1e-4 * torch.randn(6, generator=g) for _ in range(4))
    diffusers = -F.logsigmoid(2500 * ((r_w - r_l) - (m_w - m_l))).mean()
    assert float(dpo_loss(m_w, m_l, r_w, r_l, DPOConfig().beta)[0]) == pytest.approx(float(diffusers), rel=1e-5)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_the_first_step_is_log_2_against_the_initial_network(pixel_config, lora_rank):
    """Reference = the initial network (a frozen copy, or the LoRA-free base): inside is exactly 0 at the start."""
    from facereward.train.trainable import LoraSettings, Reference, prepare_trainable

    torch.manual_seed(0)
    restorer = Restorer.build(pixel_config)
    module = prepare_trainable(restorer, LoraSettings(rank=lora_rank, target_modules=["conv1", "conv2"]))
    reference = Reference(restorer, module, "auto")
    assert reference.kind == ("base" if lora_rank else "copy")
    g = torch.Generator().manual_seed(1)
    x0_w, x0_l, cond = (torch.rand(3, 3, 32, 32, generator=g) * 2 - 1 for _ in range(3))
    t, noise = pair_draws(0, 0, [0, 1, 2], (3, 32, 32), 1000, torch.device("cpu"))
    terms, model_mse, ref_mse = pair_terms(restorer, module, reference, PairBatch(x0_w, x0_l, cond, cond), t, noise, 5000.0,
                                           OneProcess())
    assert torch.equal(model_mse, ref_mse) and (terms.inside == 0).all()
    assert terms.loss.tolist() == [LOG2_F32] * 3 and terms.correct.sum() == 0
    terms.loss.mean().backward()  # the gradient still flows: the sigmoid's slope at 0 is 1/2
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.requires_grad)


def test_pair_draws_shares_and_warmup():
    t, noise = pair_draws(3, 1, [0, 1, 2, 3], (2, 4, 4), 1000, torch.device("cpu"))
    t2, noise2 = pair_draws(3, 1, [2, 3], (2, 4, 4), 1000, torch.device("cpu"))
    assert torch.equal(t[2:], t2) and torch.equal(noise[2:], noise2)  # independent of which pairs share the call
    assert not torch.equal(pair_draws(3, 2, [2], (2, 4, 4), 1000, torch.device("cpu"))[1][0], noise[2])  # new each epoch
    # 5 pairs in one step over 2 processes, 2 pairs per call: both processes make 2 calls, rank 0's second one empty
    one = step_shares(5, 5, 0, 1, 2)
    two = [step_shares(5, 5, r, 2, 2) for r in (0, 1)]
    assert one == [(5, [[0, 1], [2, 3], [4]])]
    assert two == [[(5, [[0, 1], []])], [(5, [[2, 3], [4]])]]
    assert [m for m, _ in step_shares(7, 3, 0, 1, 2)] == [3, 3, 1]  # the epoch's last step takes what is left
    assert [warmup_lr(1e-3, 4, s) for s in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert warmup_lr(1e-3, 0, 0) == 1e-3


def test_rank_pairs_takes_the_top_k_against_the_bottom_k_and_drops_small_margins():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.2, 0.7, 0.2])
    groups = torch.tensor([7, 7, 7, 7, 3, 3, 3, 3])
    # group 3 first, ranked 6 (0.7), 4, 5, 7 (0.2 each: equal rewards ranked by index); group 7 ranked 1, 2, 3, 0
    assert rank_pairs(rewards, groups, 1) == [(6, 7), (1, 0)]
    assert rank_pairs(rewards, groups, 2) == [(6, 7), (1, 0), (2, 3)]  # group 3's 2nd pair, 4 vs 5: no preference
    assert rank_pairs(rewards, groups, 2, min_margin=0.3) == [(6, 7), (1, 0)]  # 0.5 - 0.3 < 0.3


def test_bad_config_names_the_field():
    for fields, name in (({"beta": 0.0}, "beta"), ({"micro_batch": 0}, "micro_batch"), ({"batch_size": 0}, "batch_size"),
                         ({"pairs_per_group": 5}, "pairs_per_group"), ({"min_margin": -1.0}, "min_margin"),
                         ({"eta": -0.5}, "eta"), ({"data_order": "random"}, "data_order")):
        with pytest.raises(ValueError, match=name):
            check_config(DPOConfig(**fields))
    check_config(DPOConfig())


# ---- offline pairs --------------------------------------------------------------------------------


def _run_config(tmp_path, model_dir, name: str = "run", **fields) -> DPOConfig:
    from facereward.data.training_data import DataConfig
    from facereward.train.accelerator import RunConfig
    from facereward.train.heldout import HeldOutConfig

    config = DPOConfig(
        run=RunConfig(output_dir=str(tmp_path / name), save_every=100, log_every=1, progress=False, speed="off"),
        data=DataConfig(toy_faces=6, size=32, toy_identities=10), init_from=str(model_dir),
        group_size=4, inputs_per_batch=2, batches_per_epoch=1, epochs=1, sample_steps=3, micro_batch=4, batch_size=4,
        lr=1e-3, beta=100.0, held_out=HeldOutConfig(every=0))
    config.rewards.weights = {"wavelet": 0.5, "ssim": 0.5}
    for key, value in fields.items():
        setattr(config, key, value)
    return config


def _history(run_dir) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["train_log"]


def _preference_file(folder, n: int = 8, size: int = 32, tie: bool = False):
    """Smooth chosen images against noisy rejected ones, each with its LQ (a blurred copy)."""
    from facereward.data.imageio import write_image
    from facereward.data.preferences import append_pair

    rng = np.random.default_rng(0)
    for i in range(n):
        yy, xx = np.mgrid[0:size, 0:size] / size
        base = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (xx * rng.uniform(0.5, 2) + c / 3)) * yy for c in range(3)], -1)
        noisy = np.clip(base + rng.normal(0, 0.25, base.shape), 0, 1)
        blurred = (base + np.roll(base, 2, 0) + np.roll(base, 2, 1) + np.roll(base, -2, 0)) / 4
        for tag, image in (("good", base), ("bad", noisy), ("lq", blurred)):
            write_image(folder / f"img/{i}_{tag}.png", image.astype(np.float32))
        append_pair(folder / "pairs.jsonl", {"chosen": f"img/{i}_good.png", "rejected": f"img/{i}_bad.png",
                                             "lq": f"img/{i}_lq.png"})
    if tie:
        append_pair(folder / "pairs.jsonl", {"chosen": "img/0_bad.png", "rejected": "img/1_bad.png", "lq": "img/0_lq.png",
                                             "tie": True})
    return folder / "pairs.jsonl"


def test_offline_pairs_train_the_preference_in(tmp_path, pixel_dir):
    pairs = _preference_file(tmp_path, tie=True)
    config = _run_config(tmp_path, pixel_dir, pairs=str(pairs), epochs=8, batch_size=4, micro_batch=2, lr=2e-3)
    out = train_dpo(config)
    log = _history(tmp_path / "run")
    assert [e["dpo/optimizer_steps"] for e in log] == [2.0] * 8 and [e["pairs/count"] for e in log] == [8.0] * 8  # tie skipped
    assert "reward" not in log[0]  # offline: no reward is computed

    def mean(key: str, epochs: list[dict]) -> float:
        return sum(e[key] for e in epochs) / len(epochs)

    # each epoch draws new t and noise per pair: compare the first two epochs with the last three
    assert mean("dpo/loss", log[-3:]) < 0.5 * LOG2_F32 < mean("dpo/loss", log[:2])
    assert mean("dpo/implicit_accuracy", log[-3:]) >= 0.8 > mean("dpo/implicit_accuracy", log[:2])
    assert mean("dpo/reward_margin", log[-3:]) > 1.0
    trained, base = Restorer.from_pretrained(out), Restorer.from_pretrained(pixel_dir)
    assert any(not torch.equal(a, b) for a, b in zip(trained.unet.state_dict().values(), base.unet.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(trained.cleaner.state_dict().values(), base.cleaner.state_dict().values()))


def test_bad_offline_pairs_are_one_line_errors_naming_the_file(tmp_path, pixel_dir):
    from facereward.data.imageio import write_image
    from facereward.data.preferences import append_pair

    folder = tmp_path / "ok"
    pairs = _preference_file(folder, n=2, tie=True)
    kept, ties = load_offline_pairs(pairs, 32)
    assert len(kept) == 2 and ties == 1
    assert len(load_offline_pairs(pairs, 32, skip_ties=False)[0]) == 3
    write_image(folder / "img/small.png", np.zeros((16, 16, 3), np.float32))
    (folder / "img/broken.png").write_bytes(b"not a png at all")
    cases = {"no_lq": ({"chosen": "img/0_good.png", "rejected": "img/0_bad.png"}, "has no 'lq' image"),
             "broken": ({"chosen": "img/broken.png", "rejected": "img/0_bad.png", "lq": "img/0_lq.png"}, "cannot be read"),
             "small": ({"chosen": "img/0_good.png", "rejected": "img/small.png", "lq": "img/0_lq.png"},
                       "is 16x16, the model restores 32x32")}
    for name, (record, problem) in cases.items():
        path = folder / f"{name}.jsonl"
        append_pair(path, {"chosen": "img/1_good.png", "rejected": "img/1_bad.png", "lq": "img/1_lq.png"})
        append_pair(path, record)
        with pytest.raises(ValueError) as err:
            load_offline_pairs(path, 32)
        message = str(err.value)
        assert f"{path}:2: " in message and problem in message and "\n" not in message, message
    with pytest.raises(ValueError, match=r"no_lq\.jsonl:2: the pair has no 'lq'"):  # and the trainer stops on it
        train_dpo(_run_config(tmp_path, pixel_dir, pairs=str(folder / "no_lq.jsonl")))


# ---- online pairs ---------------------------------------------------------------------------------


def test_online_pairs_are_ranked_by_the_reward_and_train(tmp_path, pixel_dir):
    config = _run_config(tmp_path, pixel_dir, epochs=2, pairs_per_group=2, micro_batch=3, eta=1.0)
    out = train_dpo(config)
    first, second = _history(tmp_path / "run")
    assert first["pairs/count"] == 4.0 and first["dpo/optimizer_steps"] == 1.0  # 2 groups x 2 pairs, one step
    # one step: every pair's loss is computed before the update, against the reference = the initial network
    assert first["dpo/implicit_accuracy"] == 0.0 and first["dpo/reward_margin"] == 0.0
    assert first["dpo/loss"] == pytest.approx(LOG2_F32, abs=1e-7) and first["dpo/model_mse"] == first["dpo/ref_mse"]
    assert first["pairs/chosen_reward"] > first["reward"] > first["pairs/rejected_reward"]
    for key in ("reward/wavelet", "reward/ssim", "reward_std", "dpo/grad_norm", "time/epoch_s"):
        assert math.isfinite(first[key]), key
    assert second["dpo/reward_margin"] != 0.0  # the model has moved away from the reference
    assert second["time/train_s"] == pytest.approx(first["time/train_s"] + second["time/epoch_s"], rel=1e-6)
    trained, base = Restorer.from_pretrained(out), Restorer.from_pretrained(pixel_dir)
    assert any(not torch.equal(a, b) for a, b in zip(trained.unet.state_dict().values(), base.unet.state_dict().values()))


def test_lora_and_latent_runs_start_at_log_2(tmp_path, pixel_dir, latent_restorer):
    """LoRA: the reference is the LoRA-free base (no copy); latent mode: offline images are VAE-encoded (posterior mean)."""
    from facereward.train.trainable import LoraSettings

    lora = _run_config(tmp_path, pixel_dir, "lora", lora=LoraSettings(rank=2, target_modules=["conv1", "conv2"]), lr=1e-2)
    out = train_dpo(lora)
    (epoch,) = _history(tmp_path / "lora")
    assert epoch["dpo/implicit_accuracy"] == 0.0 and epoch["dpo/reward_margin"] == 0.0  # one step: all before the update
    assert epoch["dpo/loss"] == pytest.approx(LOG2_F32, abs=1e-7)
    trained = Restorer.from_pretrained(out)  # LoRA merged into a plain folder
    assert not any("lora" in k for k in trained.unet.state_dict())
    assert any(not torch.equal(a, b) for a, b in zip(trained.unet.state_dict().values(),
                                                      Restorer.from_pretrained(pixel_dir).unet.state_dict().values()))
    latent_restorer.save_pretrained(tmp_path / "latent")
    pairs = _preference_file(tmp_path / "prefs", n=4)
    out = train_dpo(_run_config(tmp_path, tmp_path / "latent", "latent", pairs=str(pairs), batch_size=4, micro_batch=2))
    (epoch,) = _history(tmp_path / "latent")
    assert epoch["pairs/count"] == 4.0 and epoch["dpo/implicit_accuracy"] == 0.0 and epoch["dpo/reward_margin"] == 0.0
    trained, base = Restorer.from_pretrained(out), Restorer.from_pretrained(tmp_path / "latent")
    assert trained.mode == "latent"
    assert any(not torch.equal(a, b) for a, b in zip(trained.controlnet.state_dict().values(),
                                                      base.controlnet.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(trained.unet.state_dict().values(), base.unet.state_dict().values()))


# ---- resume and processes -------------------------------------------------------------------------


def _cli_config(model_dir) -> dict:
    return {"run": {"save_every": 1, "log_every": 1, "progress": False}, "init_from": str(model_dir),
            "data": {"toy_faces": 6, "size": 32, "toy_identities": 10}, "rewards": {"weights": {"wavelet": 0.5, "ssim": 0.5}},
            "group_size": 4, "inputs_per_batch": 1, "batches_per_epoch": 2, "sample_steps": 3, "micro_batch": 2,
            "pairs_per_group": 2, "beta": 100.0, "lr": 1e-4}


def test_dpo_resumes_bit_identically_after_sigkill(tmp_path, pixel_dir):
    from test_resume_exact import _assert_same_run, _kill_and_resume

    # 4 pairs an epoch in 2 steps; the warmup's 5 steps run across the kills
    config = {**_cli_config(pixel_dir), "epochs": 4, "batch_size": 2, "warmup_steps": 5,
              "held_out": {"every": 2, "toy_faces": 2, "sample_steps": 2}}
    ref, killed = _kill_and_resume(tmp_path, ["dpo"], config, ["dpo step 2/", 3, "dpo step 3/"])
    _assert_same_run(ref, killed)


def test_dpo_on_two_processes_matches_one(tmp_path, pixel_dir):
    from test_multiprocess import _assert_close_weights, _launch_two, _write

    from facereward.cli import run as cli_run

    # 1 input x G = 4 per sampling batch: on 2 processes every group is split; one optimizer step of 4 pairs per epoch
    config = {**_cli_config(pixel_dir), "epochs": 2, "batch_size": 4, "held_out": {"every": 0}}
    config["run"] = {**config["run"], "save_every": 2, "speed": "off"}
    assert cli_run(["dpo", "--config", str(_write(tmp_path, "one", config, "one"))]) == 0
    proc = _launch_two(["dpo", "--config", str(_write(tmp_path, "two", config, "two"))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _history(tmp_path / "one"), _history(tmp_path / "two")
    for key in ("reward", "reward_std", "reward/wavelet", "reward/ssim", "pairs/chosen_reward", "pairs/rejected_reward",
                "dpo/loss", "dpo/model_mse"):  # the first epoch's samples and the losses before any update
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-5, abs=1e-7), key
    assert two[0]["pairs/count"] == one[0]["pairs/count"] == 4.0
    assert two[0]["dpo/optimizer_steps"] == one[0]["dpo/optimizer_steps"] == 1.0
    # the step's gradient (after DDP's average) is the one-process gradient: each process's loss share is scaled right
    assert two[0]["dpo/grad_norm"] == pytest.approx(one[0]["dpo/grad_norm"], rel=1e-4)
    assert two[1]["reward"] == pytest.approx(one[1]["reward"], rel=1e-3)
    _assert_close_weights(tmp_path / "one" / "model", tmp_path / "two" / "model", pixel_dir)
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["num_processes"] == 2
