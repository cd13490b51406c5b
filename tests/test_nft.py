"""DiffusionNFT (docs/methods.md 5.1): the loss against a hand computation, x0 from each prediction type, the old
policy's averaging, the update's direction, and short runs (full, LoRA with KL, latent with held-out)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from facereward.models.ddim import output_to_x0, training_target
from facereward.models.restorer import Restorer
from facereward.train.groups import GroupSamples
from facereward.train.nft import (
    NFTConfig,
    check_config,
    nft_loss,
    old_decay,
    optimality,
    train_nft,
    update_epoch,
    update_old,
)
from facereward.weights import WEIGHTS_DIR

TOY_FRM = str(WEIGHTS_DIR / "toy-frm")


def test_nft_loss_matches_a_hand_computation():
    # x0 = 0, x0_theta = (1, 3), x0_old = (1, 1), beta = 0.5, r = 0.75:
    # positive = 0.5 (1, 3) + 0.5 (1, 1) = (1, 2): mean square 2.5 / mean |.| 1.5 = 5/3
    # negative = 1.5 (1, 1) - 0.5 (1, 3) = (1, 0): mean square 0.5 / mean |.| 0.5 = 1
    # loss = (0.75 * 5/3 + 0.25 * 1) / 0.5 = 3
    x0_theta = torch.tensor([[1.0, 3.0]], requires_grad=True)
    terms = nft_loss(x0_theta, torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2), torch.tensor([0.75]), beta=0.5)
    assert terms.positive.item() == pytest.approx(5 / 3) and terms.negative.item() == pytest.approx(1.0)
    assert terms.loss.item() == pytest.approx(3.0)
    terms.loss.sum().backward()
    # the weights are constants: d/dx0_theta = r/beta * beta * 2 (1, 2) / (2 * 1.5) + (1-r)/beta * (-beta) * 2 (1, 0) / (2 * 0.5)
    #                                     = 0.75 (2/3, 4/3) - 0.25 (2, 0) = (0, 1)
    assert x0_theta.grad[0].tolist() == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("kind, theta, old", [
    # abar = 0.64 (sqrt 0.8, sqrt(1 - abar) 0.6), x_t = (1, 1): outputs chosen so that x0_theta = (1, 3), x0_old = (1, 1)
    ("epsilon", [1 / 3, -7 / 3], [1 / 3, 1 / 3]),  # eps = (x_t - 0.8 x0) / 0.6
    ("v_prediction", [-1 / 3, -11 / 3], [-1 / 3, -1 / 3]),  # v = (0.8 x_t - x0) / 0.6
])
def test_the_loss_from_eps_or_v_outputs_is_the_hand_computed_one(kind, theta, old):
    """The same implicit policies from either parameterisation: the loss of the hand computation above, 3.0."""
    x_t, abar = torch.ones(1, 2), torch.tensor([0.64])
    x0_theta = output_to_x0(torch.tensor([theta]), x_t, abar, kind)
    x0_old = output_to_x0(torch.tensor([old]), x_t, abar, kind)
    assert x0_theta[0].tolist() == pytest.approx([1.0, 3.0]) and x0_old[0].tolist() == pytest.approx([1.0, 1.0])
    assert nft_loss(x0_theta, x0_old, torch.zeros(1, 2), torch.tensor([0.75]), beta=0.5).loss.item() == pytest.approx(3.0)


def test_optimality_weights_and_the_old_policy_decay_schedules():
    assert optimality(torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 7.0]), 5.0).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
    assert [old_decay(s, 0, 0.001, 0.5) for s in (0, 100, 499, 2000)] == pytest.approx([0.0, 0.1, 0.499, 0.5])  # type 1
    assert [old_decay(s, 75, 0.0075, 0.999) for s in (50, 75, 175, 1000)] == pytest.approx([0.0, 0.0, 0.75, 0.999])  # 2
    assert old_decay(10, 0, 0.0, 0.0) == 0.0  # type 0: the old policy is the trained one after every epoch


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_x0_from_each_prediction_type_is_exact_and_affine(kind):
    """The derivation's premise: x0 = a x_t + b output, so mixing outputs mixes x0 predictions with the same weights."""
    g = torch.Generator().manual_seed(0)
    x0, noise, abar = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g), torch.tensor([0.9, 0.3, 0.01])
    x_t = abar.sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar).sqrt().view(-1, 1, 1, 1) * noise
    target = training_target(x0, noise, abar, kind)
    assert torch.allclose(output_to_x0(target, x_t, abar, kind), x0, atol=1e-4)
    a, b = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    for beta in (0.1, 1.0, -1.5):  # the negative policy's weights (1 + beta, -beta) are an affine mix too
        mixed = output_to_x0(beta * a + (1 - beta) * b, x_t, abar, kind)
        expected = beta * output_to_x0(a, x_t, abar, kind) + (1 - beta) * output_to_x0(b, x_t, abar, kind)
        assert torch.allclose(mixed, expected, atol=1e-3)


def test_update_old_averages_only_the_trained_parameters():
    old, new = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        old.weight.fill_(1.0), old.bias.fill_(1.0), new.weight.fill_(5.0), new.bias.fill_(5.0)
    update_old(old, new, ["weight"], decay=0.25)
    assert old.weight.unique().tolist() == [4.0] and old.bias.unique().tolist() == [1.0]  # 0.25 * 1 + 0.75 * 5


def _config(tmp_path, model_dir, name: str = "run", **fields) -> NFTConfig:
    from facereward.data.training_data import DataConfig
    from facereward.train.accelerator import RunConfig
    from facereward.train.heldout import HeldOutConfig

    config = NFTConfig(
        run=RunConfig(output_dir=str(tmp_path / name), save_every=1, log_every=1, progress=False, speed="off"),
        data=DataConfig(toy_faces=6, size=32, toy_identities=10), init_from=str(model_dir),
        group_size=3, inputs_per_batch=2, batches_per_epoch=1, epochs=1, sample_steps=4, micro_batch=3, lr=1e-4,
        kl_beta=0.0, held_out=HeldOutConfig(every=0))
    config.rewards.weights = {"wavelet": 0.5, "ssim": 0.5}
    for key, value in fields.items():
        setattr(config, key, value)
    return config


def test_the_update_pulls_x0_predictions_towards_high_reward_samples(tmp_path, pixel_restorer):
    """Two samples of one input, r = 1 and r = 0: after a few updates the network's x0 prediction from a point between
    them has moved towards the r = 1 sample relative to the r = 0 one (the margin grows; with the signs of the two
    policies swapped it shrinks)."""
    from accelerate import Accelerator

    from facereward.train.trainable import LoraSettings, frozen_copy, prepare_trainable

    restorer = pixel_restorer
    config = _config(tmp_path, "unused", micro_batch=2, lr=3e-3, sample_steps=4)
    n_train = check_config(config)
    module = prepare_trainable(restorer, LoraSettings())
    old = frozen_copy(module)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=config.lr)
    g = torch.Generator().manual_seed(0)
    lq = torch.rand(1, 3, 32, 32, generator=g).expand(2, -1, -1, -1)
    cond = restorer.condition(restorer.clean(lq)).detach()
    good, bad = torch.full((1, 3, 32, 32), 0.8), torch.full((1, 3, 32, 32), -0.8)
    samples = GroupSamples(x0=torch.cat([good, bad]), cond=cond, group_ids=torch.zeros(2, dtype=torch.long),
                           rows=torch.arange(2), scores={"reward": torch.tensor([1.0, 0.0])})
    schedule = restorer.schedule(config.sample_steps)

    def distances() -> tuple[float, float]:
        noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
        t = schedule.timesteps[1:2]
        abar = restorer.scheduler.alphas_cumprod[t]
        x_t = abar.sqrt() * torch.zeros(1, 3, 32, 32) + (1 - abar).sqrt() * noise  # between the two samples
        with torch.no_grad():
            x0 = output_to_x0(restorer.predict_output(x_t, t, cond[:1]), x_t, abar, restorer.prediction_type)
        return float((x0 - good).pow(2).mean()), float((x0 - bad).pow(2).mean())

    before = distances()
    for epoch in range(6):
        update_epoch(restorer, module, old, optimizer, samples, torch.tensor([1.0, 0.0]), schedule, config, n_train, None,
                     accelerator, epoch)
        update_old(old, module, [n for n, p in module.named_parameters() if p.requires_grad], 0.0)
    after = distances()
    assert after[1] - after[0] > before[1] - before[0] + 1.0, (before, after)


def _history(run_dir) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["train_log"]


def test_a_run_takes_its_steps_and_learns(tmp_path, pixel_dir):
    config = _config(tmp_path, pixel_dir, epochs=2, lr=1e-3)
    assert check_config(config) == 3  # int(0.99 * 4)
    out = train_nft(config)
    first, second = _history(tmp_path / "run")
    assert first["nft/optimizer_steps"] == 1.0 and first["nft/old_decay"] == pytest.approx(0.001)
    assert second["nft/old_decay"] == pytest.approx(0.002)
    assert 0 <= first["nft/r_mean"] <= 1 and math.isfinite(first["nft/loss"])
    assert first["nft/old_gap"] == 0.0 and second["nft/old_gap"] > 0  # the old policy starts as the trained network
    base, trained = Restorer.from_pretrained(pixel_dir), Restorer.from_pretrained(out)
    assert any(not torch.equal(a, b) for a, b in zip(trained.unet.state_dict().values(), base.unet.state_dict().values()))
    train_nft(_config(tmp_path, pixel_dir, "three", steps_per_epoch=3, inner_epochs=2))  # 6 samples: 3 steps of 2, twice
    (epoch,) = _history(tmp_path / "three")
    assert epoch["nft/optimizer_steps"] == 6.0 and epoch["nft/old_decay"] == pytest.approx(0.006)


def test_lora_run_with_kl_to_the_base_and_a_latent_run_with_held_out(tmp_path, pixel_dir, latent_restorer):
    from facereward.train.heldout import HeldOutConfig
    from facereward.train.trainable import LoraSettings

    config = _config(tmp_path, pixel_dir, lora=LoraSettings(rank=2, target_modules=["conv1", "conv2"]), kl_beta=0.1,
                     epochs=2, lr=1e-2, beta=0.1, adv_std="group")
    out = train_nft(config)
    first, second = _history(tmp_path / "run")
    assert first["nft/kl"] == 0.0 and second["nft/kl"] > 0  # the LoRA-free base is the reference
    assert not any("lora" in k for k in Restorer.from_pretrained(out).unet.state_dict())

    latent_restorer.save_pretrained(tmp_path / "latent")
    config = _config(tmp_path, tmp_path / "latent", "latent", eta=0.5,
                     held_out=HeldOutConfig(every=1, toy_faces=2, sample_steps=2, identity="none"))
    config.rewards.weights = {"frm": 0.1, "wavelet": 0.3}
    config.rewards.options = {"frm": {"path": TOY_FRM}}
    train_nft(config)
    base, epoch = _history(tmp_path / "latent")
    assert base["epoch"] == 0 and {"held_out/reward", "held_out/psnr"} <= set(epoch) and math.isfinite(epoch["reward/frm"])


def test_bad_config_names_the_field(tmp_path, pixel_dir):
    for fields, message in (({"group_size": 1}, "group_size"), ({"beta": 0.0}, "beta"), ({"adv_std": "batch"}, "adv_std"),
                            ({"timestep_fraction": 0.1}, "timestep_fraction"), ({"old_decay_max": 1.0}, "old_decay_max"),
                            ({"steps_per_epoch": 7}, "steps_per_epoch"), ({"eta": -1.0}, "eta")):
        with pytest.raises(ValueError, match=message):
            check_config(_config(tmp_path, pixel_dir, **fields))
    with pytest.raises(ValueError, match="kl_reference 'base' needs LoRA"):
        train_nft(_config(tmp_path, pixel_dir, kl_beta=0.1, kl_reference="base"))
