"""ReFL (docs/methods.md 1.2): gradient routing, truncation, the regulariser, the dynamic FRM, a short run, resume."""

from __future__ import annotations

import json

import pytest
import torch

from facereward.data.training_data import DataConfig
from facereward.models.frm import FaceRewardModel, FRMConfig
from facereward.models.restorer import Restorer
from facereward.measures import MeasuresConfig, register_measure
from facereward.train.accelerator import RunConfig
from facereward.train.heldout import HeldOutConfig
from facereward.train.refl import (
    DynamicFRMConfig,
    ReFLConfig,
    ReFLStep,
    build_losses,
    build_reward_term,
    frm_preference_step,
    residual_regulariser,
    reward_loss,
    train_refl,
)
from facereward.train.trainable import LoraSettings, frozen_copy, prepare_trainable


@pytest.fixture
def tiny_frm():
    torch.manual_seed(1)
    return FaceRewardModel(FRMConfig(backbone="cnn", input_size=32, cnn_widths=[8, 16], cnn_depth=1)).eval()


def _batch(size: int = 32, b: int = 2):
    g = torch.Generator().manual_seed(3)
    hq = torch.rand(b, 3, size, size, generator=g)
    return {"lq": (hq + 0.2 * torch.rand(b, 3, size, size, generator=g)).clamp(0, 1), "hq": hq, "caption": ["a face"] * b}


def _losses(wavelet: float = 0.01, clamp: bool = True) -> MeasuresConfig:
    """The structural terms without LPIPS: the DT-CWT low-pass L1 (the default's options), on the clamped x_hat."""
    return MeasuresConfig(weights={"wavelet": wavelet} if wavelet else {},
                          options={"wavelet": {"wavelet": "dtcwt", "levels": 3, "clamp": clamp}} if wavelet else {})


def _rewards(frm_dir, **weights) -> MeasuresConfig:
    """The reward term: the dynamic FRM at `frm_dir` (weight 1 unless given) and any other weighted measures."""
    return MeasuresConfig(weights={"frm": 1.0, **weights}, options={"frm": {"path": str(frm_dir)}})


def _step(restorer, frm, lora_rank=0, **kw):
    weights = {"reward_weight": 1.0, "reg_weight": 1.0, "losses": _losses(1.0), "sample_steps": 4}
    cfg = ReFLConfig(lora=LoraSettings(rank=lora_rank), **{**weights, **kw})
    trainable = prepare_trainable(restorer, cfg.lora)
    reference = None if lora_rank else frozen_copy(trainable)
    return ReFLStep(cfg, restorer, frm, reference, build_losses(cfg, torch.device("cpu"))), trainable


def test_reward_forms_and_regulariser_by_hand():
    s = torch.tensor([0.25, 2.0, -1.0])
    assert torch.equal(reward_loss(s, "one_minus"), torch.tensor([0.75, -1.0, 2.0]))
    assert torch.equal(reward_loss(s, "negative"), -s)
    assert torch.equal(reward_loss(s, "hinge", margin=1.0), torch.tensor([0.75, 0.0, 2.0]))
    with pytest.raises(ValueError, match="reward_form must be one of"):
        reward_loss(s, "log")
    h = [torch.ones(1, 2, 2), torch.zeros(1, 3)]
    ref = [torch.zeros(1, 2, 2), torch.full((1, 3), 2.0)]
    assert residual_regulariser(h, ref).item() == pytest.approx(1.0 + 4.0)  # sum over j of the mean squared difference


@pytest.mark.parametrize("mode", ["pixel", "latent"])
def test_gradients_reach_only_the_trainable_network(mode, pixel_restorer, latent_restorer, tiny_frm):
    restorer = pixel_restorer if mode == "pixel" else latent_restorer
    step, trainable = _step(restorer, tiny_frm)
    out = step(_batch(), torch.Generator().manual_seed(0))
    out.loss.backward()
    trained = {id(p) for p in trainable.parameters()}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.parameters())
    for name, p in restorer.named_parameters():
        if id(p) not in trained:
            assert p.grad is None, f"{name} got a gradient"
    assert all(p.grad is None for p in tiny_frm.parameters())  # frozen for the generator step, but differentiable
    assert all(p.requires_grad for p in tiny_frm.parameters())  # ...and its flags are back afterwards
    assert {"refl/reward_loss", "refl/reg_loss", "refl/wavelet_loss", "refl/loss", "refl/score"} <= set(out.parts)


def _saved_tensors(step: ReFLStep, batch) -> int:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(batch, torch.Generator().manual_seed(0))
    return count


def test_no_graph_is_kept_for_the_no_grad_steps(pixel_restorer, tiny_frm):
    """The autograd graph holds step k's forward only: the same size for 3 and 12 sampling steps."""
    batch = _batch()
    short, _ = _step(pixel_restorer, tiny_frm, sample_steps=3, grad_window=1)
    n_short = _saved_tensors(short, batch)
    long, _ = _step(pixel_restorer, tiny_frm, sample_steps=12, grad_window=1)
    assert n_short > 0 and _saved_tensors(long, batch) == n_short


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_regulariser_is_exactly_zero_at_step_zero(lora_rank, latent_restorer, tiny_frm):
    step, _ = _step(latent_restorer, tiny_frm, lora_rank=lora_rank)
    out = step(_batch(), torch.Generator().manual_seed(0))
    assert out.parts["refl/reg_loss"].item() == 0.0
    assert out.parts["refl/reward_loss"].item() != 0.0


def test_regulariser_grows_once_the_network_moves(pixel_restorer, tiny_frm):
    step, trainable = _step(pixel_restorer, tiny_frm)
    with torch.no_grad():
        for p in trainable.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert step(_batch(), torch.Generator().manual_seed(0)).parts["refl/reg_loss"].item() > 0


def test_one_dynamic_frm_update_prefers_the_gt(pixel_restorer, tiny_frm):
    step, _ = _step(pixel_restorer, tiny_frm)
    batch = _batch(b=4)
    restored = step(batch, torch.Generator().manual_seed(0)).restored
    with torch.no_grad():
        before = (tiny_frm.score(batch["hq"]) - tiny_frm.score(restored)).mean()
    opt = torch.optim.AdamW([p for p in tiny_frm.parameters() if p.requires_grad], lr=1e-3)
    frm_preference_step(tiny_frm, opt, batch["hq"], restored, None, grad_clip=1.0)
    with torch.no_grad():
        after = (tiny_frm.score(batch["hq"]) - tiny_frm.score(restored)).mean()
    assert after > before


def _config(tmp_path, restorer_dir, frm_dir, **kw) -> ReFLConfig:
    run = RunConfig(output_dir=str(tmp_path / "run"), progress=False, save_every=2, log_every=1)
    defaults = dict(run=run, data=DataConfig(toy_faces=8, size=32), init_from=str(restorer_dir), rewards=_rewards(frm_dir),
                    train_steps=4, batch_size=2, sample_steps=3, eta=1.0, losses=_losses(),
                    held_out=HeldOutConfig(every=2, toy_faces=2, sample_steps=3, identity="none"))
    defaults.update(kw)
    return ReFLConfig(**defaults)


@pytest.fixture
def saved(tmp_path, pixel_restorer, tiny_frm):
    pixel_restorer.save_pretrained(tmp_path / "restorer")
    tiny_frm.save_pretrained(tmp_path / "frm")
    return tmp_path / "restorer", tmp_path / "frm"


def test_short_run_trains_saves_and_resumes(tmp_path, saved):
    model = train_refl(_config(tmp_path, *saved, train_steps=2, lr=1e-3))
    restored = Restorer.from_pretrained(model)
    initial = Restorer.from_pretrained(saved[0])
    assert any(not torch.equal(a, b) for a, b in zip(restored.unet.state_dict().values(), initial.unet.state_dict().values()))
    assert FaceRewardModel.from_pretrained(tmp_path / "run" / "frm")
    train_refl(_config(tmp_path, *saved, train_steps=4, lr=1e-3, run=RunConfig(output_dir=str(tmp_path / "run"), progress=False,
                                                                          save_every=2, log_every=1, resume="latest")))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["step"] for h in metrics["held_out"]] == [0, 2, 4]  # the resumed run carries the history on
    assert json.loads((tmp_path / "run" / "speed.json").read_text())["refl"]["source"] == "resumed"
    assert {"psnr", "ssim", "frm/initial", "frm/live"} <= set(metrics["held_out"][0])
    assert (tmp_path / "run" / "checkpoints" / "step-00000004" / "frm.safetensors").is_file()


def test_lora_run_saves_a_plain_restorer(tmp_path, saved):
    model = train_refl(_config(tmp_path, *saved, train_steps=2, lr=1e-2, lora=LoraSettings(rank=2), held_out=HeldOutConfig(every=0)))
    loaded = Restorer.from_pretrained(model)
    assert not any("lora" in k for k in loaded.unet.state_dict())
    initial = Restorer.from_pretrained(saved[0])
    assert any(not torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(), initial.unet.state_dict().values()))


def test_short_run_on_toy_faces_raises_the_held_out_frm_score(tmp_path):
    """The shipped toy restorer and FRM: a few ReFL steps (fixed FRM, reward only) raise the held-out score."""
    cfg = ReFLConfig(
        run=RunConfig(output_dir=str(tmp_path / "run"), progress=False, save_every=100, log_every=1),
        data=DataConfig(toy_faces=16, toy_identities=200, size=64), train_steps=3, batch_size=2, sample_steps=4, lr=1e-4,
        reward_weight=0.01, reg_weight=0.0, losses=MeasuresConfig(weights={}), dynamic_frm=DynamicFRMConfig(every=0),
        held_out=HeldOutConfig(every=3, toy_faces=4, sample_steps=4, identity="none"),
    )
    train_refl(cfg)
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["held_out"]
    assert history[-1]["frm/initial"] > history[0]["frm/initial"] + 0.5


def test_bad_configs_fail_with_one_line(tmp_path, saved):
    with pytest.raises(ValueError, match="eta must be a number or 'random'"):
        train_refl(_config(tmp_path, *saved, eta="sometimes"))
    with pytest.raises(ValueError, match="data.size 64 differs"):
        train_refl(_config(tmp_path, *saved, data=DataConfig(toy_faces=4, size=64)))
    for paths in ({}, {"backbone_path": "vgg16.pth"}):  # the recipe asks for LPIPS and a weight file is missing
        losses = MeasuresConfig(weights={"wavelet": 0.01, "lpips": 0.01}, options={"lpips": {"net": "vgg", **paths}})
        with pytest.raises(ValueError, match=r"^losses\.weights\.lpips: measure 'lpips' needs (options|both) backbone_path and "
                                             r"heads_path .*; or --set losses\.weights\.lpips=0"):
            train_refl(_config(tmp_path, *saved, losses=losses))
    with pytest.raises(ValueError, match=r"rewards\.weights\.psnr_nd: 'psnr_nd' is not differentiable \(ReFL backpropagates"):
        train_refl(_config(tmp_path, *saved, rewards=_rewards(saved[1], psnr_nd=0.1)))
    frm_options = MeasuresConfig(weights={"frm": 1.0}, options={"frm": {"path": str(saved[1]), "scale": 2.0}})
    with pytest.raises(ValueError, match=r"rewards\.options\.frm\.scale: ReFL's frm is its dynamic FRM, which takes only path"):
        train_refl(_config(tmp_path, *saved, rewards=frm_options))
    with pytest.raises(ValueError, match=r"rewards\.options\.frm\.path: no Face Reward Model for your restorer: set --frm PATH"):
        train_refl(_config(tmp_path, *saved, rewards=MeasuresConfig(weights={"frm": 1.0})))  # never the toy FRM silently


def _negative_mse(images, gt=None, captions=None):
    return -((images - gt) ** 2).flatten(1).mean(1)


register_measure("psnr_nd", fn=_negative_mse, kind="FR", lower_better=False, differentiable=False, overwrite=True)


class RangeSpy(torch.nn.Module):
    """An FRM stand-in that records the range of what it scores."""

    def __init__(self, frm):
        super().__init__()
        self.frm, self.seen = frm, []

    def freeze_for_reward(self):
        return self.frm.freeze_for_reward()

    def forward(self, images, captions=None):
        self.seen.append((float(images.detach().min()), float(images.detach().max())))
        return self.frm(images, captions)


@pytest.mark.parametrize("clamp", [True, False])
def test_x_hat_is_clamped_before_the_rewards_and_the_structural_term(clamp, pixel_restorer, tiny_frm, monkeypatch):
    from facereward.measures import wavelet

    decode = pixel_restorer.decode
    monkeypatch.setattr(pixel_restorer, "decode", lambda z: decode(z) * 3 - 1)  # well outside [0, 1]
    seen_by_dwt = []
    lowpass_l1 = wavelet.lowpass_l1
    monkeypatch.setattr(wavelet, "lowpass_l1", lambda x, gt, *a, **k: seen_by_dwt.append((float(x.detach().min()), float(x.detach().max())))
                        or lowpass_l1(x, gt, *a, **k))
    spy = RangeSpy(tiny_frm)
    step, _ = _step(pixel_restorer, spy, clamp_x_hat=clamp, losses=_losses(1.0, clamp=clamp))  # the wavelet term's own clamp
    out = step(_batch(), torch.Generator().manual_seed(0))
    lo, hi = spy.seen[0]
    assert (0 <= lo and hi <= 1) == clamp and (0 <= seen_by_dwt[0][0] and seen_by_dwt[0][1] <= 1) == clamp
    # the FRM update's rejected image is the one the reward scored: clamped when clamp_x_hat, as the original (RT:296)
    assert (out.restored.min() >= 0 and out.restored.max() <= 1) == clamp


def test_a_composite_reward_term_by_hand(pixel_restorer, tiny_frm):
    """R = 0.5 s(x_hat) + 0.5 SSIM(x_hat, gt): the reward loss is w_r * mean(1 - R), its parts logged."""
    from facereward.measures.fullref import ssim

    rewards = MeasuresConfig(weights={"frm": 0.5, "ssim": 0.5})
    cfg_kw = dict(rewards=rewards, reg_weight=0.0, losses=MeasuresConfig(weights={}))
    step, _ = _step(pixel_restorer, tiny_frm, **cfg_kw)
    step.rewards = build_reward_term(step.config, torch.device("cpu"))
    out = step(_batch(), torch.Generator().manual_seed(0))
    x = out.restored.clamp(0, 1)
    with torch.no_grad():
        expected_r = 0.5 * tiny_frm(x) + 0.5 * ssim(x, _batch()["hq"], y_channel=False, quantize=False)
    assert out.parts["refl/reward"].item() == pytest.approx(expected_r.mean().item(), rel=1e-4)
    assert out.loss.item() == pytest.approx((1 - expected_r).mean().item(), rel=1e-4)  # reward_weight 1 in _step
    assert set(out.parts) >= {"refl/reward/ssim", "refl/score"}
    out.loss.backward()  # the composite is differentiable end to end


def test_accumulate_last_only_keeps_only_the_last_micro_batch(tmp_path, saved):
    """The original's zero_grad inside accelerate's accumulate block: an update from the last of 2 micro-batches only."""
    from facereward.models.restorer import Restorer

    def run(name, **kw):
        cfg = _config(tmp_path / name, *saved, train_steps=1, batch_size=1, reg_weight=0.0, losses=MeasuresConfig(weights={}), lr=1e-2,
                      dynamic_frm=DynamicFRMConfig(every=0), held_out=HeldOutConfig(every=0), **kw)
        cfg.run.gradient_accumulation_steps = 2
        return Restorer.from_pretrained(train_refl(cfg)).unet.state_dict()

    summed, last = run("summed"), run("last", accumulate_last_only=True)
    assert any(not torch.equal(summed[k], last[k]) for k in summed)


def test_cli_ablation_switches_and_bad_keys(tmp_path, saved):
    import yaml
    from typer.testing import CliRunner

    from facereward.cli import app

    out = tmp_path / "cli"
    args = ["refl", "--init-from", str(saved[0]), "--frm", str(saved[1]), "--toy-faces", "4", "--train-steps", "1",
            "--output-dir", str(out), "--set", "data.size=32", "--set", "sample_steps=2", "--set", "held_out.every=0",
            "--set", "batch_size=2", "--set", "run.progress=false"]
    result = CliRunner().invoke(app, [*args, "--no-regulariser", "--no-dynamic-frm", "--no-structural"])
    assert result.exit_code == 0, result.output
    assert "(the FRM stayed fixed)" in result.output and "evolved" not in result.output
    assert result.output.startswith("refl: 1 steps at batch 2") and f"tensorboard --logdir {out}" in result.output
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["reg_weight"] == 0 and written["dynamic_frm"]["every"] == 0
    assert written["losses"]["weights"] == {} and written["reward_weight"] > 0  # --no-structural: no wavelet, no LPIPS
    assert written["train_steps"] == 1 and written["rewards"]["options"]["frm"]["path"] == str(saved[1])  # --frm
    bad = CliRunner().invoke(app, [*args, "--set", "reward_wieght=1"])
    assert bad.exit_code != 0 and "unknown key 'reward_wieght'" in str(bad.exception or bad.output)


def test_dynamic_frm_mixes_in_the_original_pairs_with_gradient_accumulation(tmp_path, saved, monkeypatch):
    import numpy as np

    from facereward.data.imageio import write_image
    from facereward.data.preferences import append_pair
    from facereward.train import refl as refl_module

    rng = np.random.default_rng(0)
    pairs = tmp_path / "pairs.jsonl"
    for i in range(3):
        write_image(tmp_path / f"img/{i}_w.png", rng.random((48, 48, 3)).astype(np.float32))  # another size: resized
        write_image(tmp_path / f"img/{i}_l.png", rng.random((48, 48, 3)).astype(np.float32))
        append_pair(pairs, {"chosen": f"img/{i}_w.png", "rejected": f"img/{i}_l.png", "source": "test"})
    seen = []
    real_step = refl_module.frm_preference_step

    def spy(frm, optimizer, chosen, rejected, captions, grad_clip, reduce=None, loss_weight=1.0, *args):
        seen.append(chosen.shape[0])
        assert loss_weight == 0.1  # the original scales the FRM's Bradley-Terry loss by 0.1
        return real_step(frm, optimizer, chosen, rejected, captions, grad_clip, reduce, loss_weight)

    monkeypatch.setattr(refl_module, "frm_preference_step", spy)
    run = RunConfig(output_dir=str(tmp_path / "mix"), progress=False, save_every=100, gradient_accumulation_steps=2)
    dyn = refl_module.DynamicFRMConfig(every=1, lr=1e-3, pairs=str(pairs), pairs_per_update=2)
    train_refl(_config(tmp_path, *saved, train_steps=2, run=run, dynamic_frm=dyn, held_out=HeldOutConfig(every=0)))
    assert seen == [2 + 2, 2 + 2]  # one update per optimizer step (not per micro-batch): the batch's GTs + 2 pairs


def test_setting_one_measure_option_keeps_the_other_defaults():
    from facereward.config import load_config

    frm = load_config(ReFLConfig, None, ["rewards.options.frm.path=FRM"])  # what --frm sets
    assert frm.rewards.weights == {"frm": 1.0}  # the reward term stays the FRM alone (not frm 0.3 + wavelet 0.3)
    lpips = load_config(ReFLConfig, None, ["losses.options.lpips.backbone_path=a.pth", "losses.options.lpips.heads_path=b.pth"])
    assert lpips.losses.weights == {"wavelet": 0.01, "lpips": 0.01}  # what --lpips-backbone/--lpips-heads set
    off = load_config(ReFLConfig, None, ["losses.weights.lpips=0"])  # what the missing-LPIPS error tells the user to do
    assert off.losses.weights == {"wavelet": 0.01, "lpips": 0}
