"""run.speed: the layout choice (hand-computed), measurement hygiene, explicit settings, caching, resume, and that a
bf16 switch really runs the trained network under autocast while LRPO's log-probs stay fp32 and its first ratio 1."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from facereward.train import speed
from facereward.train.accelerator import RunConfig, make_accelerator
from facereward.train.speed import LAYOUTS, SpeedChoice, Workload, choose_speed, measure, pick


def test_pick_weights_no_grad_and_grad_calls_by_the_workload():
    timings = {"fp32": [0.010, 0.030], "fp32+channels_last": [0.009, 0.032], "bf16": [0.004, 0.060],
               "bf16+channels_last": [0.012, 0.031]}
    # rollout-heavy: 50 x 0.004 + 1 x 0.060 = 0.26 beats fp32's 0.53 and channels_last's 0.482
    assert pick(timings, Workload(4, 50, 1)) == "bf16"
    # training only: 0.030 < 0.031 < 0.032 < 0.060
    assert pick(timings, Workload(4, 0, 1)) == "fp32"
    # 3 x 0.009 + 0.032 = 0.059 < fp32's 0.060 < bf16+channels_last's 0.067 < bf16's 0.072
    assert pick(timings, Workload(4, 3, 1)) == "fp32+channels_last"


class _Net(nn.Module):
    """A conv whose calls take 5 ms, and 100 ms under bf16 autocast, so measurement must drop bf16 (the sleeps keep the
    calls long enough that a loaded machine's jitter cannot make a kept layout look hopeless)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.layouts: list[tuple[bool, bool]] = []

    def forward(self, x):
        autocast = torch.is_autocast_enabled("cpu")
        self.layouts.append((autocast, self.conv.weight.is_contiguous(memory_format=torch.channels_last)))
        time.sleep(0.1 if autocast else 0.005)
        return self.conv(x)


def test_measure_drops_a_slow_layout_and_leaves_the_network_and_rng_as_they_were():
    net, x = _Net(), torch.randn(2, 3, 8, 8)
    state = torch.get_rng_state()
    timings = measure(lambda grad: net(x), net, torch.device("cpu"), list(LAYOUTS), budget_s=10, rounds=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in net.parameters()) and net.conv.weight.is_contiguous(), net.layouts
    assert timings["bf16"] == [float("inf")] * 2 and timings["bf16+channels_last"] == [float("inf")] * 2
    assert all(0.005 < t < 0.05 for name in ("fp32", "fp32+channels_last") for t in timings[name]), timings
    # each layout ran as named: the hopeless ones (20x slower) two no-grad calls only, the kept ones every round
    assert net.layouts.count((True, False)) == 2 and net.layouts.count((True, True)) == 2
    assert net.layouts.count((False, True)) == 9 and net.layouts.count((False, False)) == 9


def _choose(tmp_path, run: RunConfig, calls: list[int], workload=Workload(2, 5, 1)) -> tuple[SpeedChoice, _Net]:
    net, x = _Net(), torch.randn(2, 3, 8, 8)
    accelerator = make_accelerator(run, "speed-test")

    def probe(grad):
        calls.append(grad)
        return net(x)

    choice = choose_speed(run, accelerator, net, probe, workload, {"model": "tiny"}, "test", budget_s=5)
    accelerator.end_training()
    return choice, net


def test_auto_measures_once_then_reads_the_cache_and_explicit_settings_win(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEREWARD_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[int] = []
    first, _ = _choose(tmp_path, RunConfig(output_dir=str(tmp_path / "a")), calls)
    assert first.source == "measured" and first.mixed_precision == "no" and calls
    assert json.loads((tmp_path / "a" / "speed.json").read_text())["test"]["mixed_precision"] == "no"
    calls.clear()
    second, _ = _choose(tmp_path, RunConfig(output_dir=str(tmp_path / "b")), calls)
    assert second.source.startswith("cached in") and not calls and second.timings == first.timings
    explicit, net = _choose(tmp_path, RunConfig(output_dir=str(tmp_path / "c"), mixed_precision="bf16", channels_last=True), calls)
    assert (explicit.source, explicit.mixed_precision, explicit.channels_last) == ("explicit", "bf16", True) and not calls
    assert net.conv.weight.is_contiguous(memory_format=torch.channels_last)
    off, net = _choose(tmp_path, RunConfig(output_dir=str(tmp_path / "d"), speed="off"), calls)
    assert (off.source, off.mixed_precision, off.channels_last) == ("off", "no", False) and not calls
    # only the layout left open is measured: channels_last fixed on, precision free
    half, _ = _choose(tmp_path, RunConfig(output_dir=str(tmp_path / "e"), channels_last=True), calls)
    assert set(half.timings) >= {"fp32+channels_last", "bf16+channels_last"} and half.channels_last


def test_a_resumed_run_keeps_its_recorded_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEREWARD_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    out.mkdir()
    timings = {"fp32": [1.0, 1.0], "fp32+channels_last": [1.0, 1.0], "bf16": [0.1, 0.1], "bf16+channels_last": [2.0, 2.0]}
    (out / "speed.json").write_text(json.dumps({"test": {"timings": timings}}))
    calls: list[int] = []
    choice, _ = _choose(tmp_path, RunConfig(output_dir=str(out), resume="latest"), calls)
    assert (choice.source, choice.mixed_precision, choice.channels_last) == ("resumed", "bf16", False) and not calls


def test_bad_speed_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="run.speed must be one of auto, off, got 'fast'"):
        make_accelerator(RunConfig(output_dir=str(tmp_path), speed="fast"), "x")
    with pytest.raises(ValueError, match="run.channels_last must be true, false or unset"):
        make_accelerator(RunConfig(output_dir=str(tmp_path), channels_last="yes"), "x")


def test_switching_to_bf16_makes_prepared_forwards_and_autocast_run_in_bf16(tmp_path):
    accelerator = make_accelerator(RunConfig(output_dir=str(tmp_path)), "x")
    assert accelerator.mixed_precision == "no"
    speed.set_mixed_precision(accelerator, "bf16")
    net = nn.Sequential(nn.Linear(4, 4))
    seen = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))  # inside the prepared forward's autocast
    prepared = accelerator.prepare(net)
    out = prepared(torch.randn(2, 4))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32  # accelerate hands fp32 back
    with accelerator.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    speed.set_mixed_precision(accelerator, "no")
    with accelerator.autocast():
        assert not torch.is_autocast_enabled("cpu")
    accelerator.end_training()


def _bf16_wins(*args, **kwargs):
    """Timings in which bf16 autocast is the cheapest layout."""
    return {"fp32": [1.0, 1.0], "fp32+channels_last": [1.0, 1.0], "bf16": [0.5, 0.5], "bf16+channels_last": [0.6, 0.6]}


def test_lrpo_under_a_chosen_bf16_keeps_fp32_log_probs_and_a_first_ratio_of_exactly_one(tmp_path, pixel_restorer, monkeypatch):
    from facereward.models import ddim
    from facereward.train import lrpo
    from test_lrpo import _config, _history

    monkeypatch.setenv("FACEREWARD_CACHE_DIR", str(tmp_path / "cache"))  # these made-up timings stay out of the session's
    monkeypatch.setattr(speed, "measure", _bf16_wins)
    pixel_restorer.save_pretrained(tmp_path / "pixel")
    dtypes: dict[str, set] = {"conv": set(), "log_prob": set(), "x_t": set()}
    pixel_restorer.unet.conv_in.register_forward_hook(lambda m, i, o: dtypes["conv"].add(o.dtype))
    step = lrpo.ddim_step_with_logprob

    def recording(*args, **kwargs):
        out = step(*args, **kwargs)
        dtypes["log_prob"].add(out.log_prob.dtype)
        dtypes["x_t"].update({args[2].dtype, out.prev_sample.dtype})
        return out

    monkeypatch.setattr(lrpo, "ddim_step_with_logprob", recording)  # the training steps' recompute
    monkeypatch.setattr(ddim, "ddim_step_with_logprob", recording)  # the rollout's steps
    monkeypatch.setattr(lrpo.Restorer, "from_pretrained", classmethod(lambda cls, path: pixel_restorer))
    config = _config(tmp_path, tmp_path / "pixel", lr=1e-3, train_batch_size=3)
    lrpo.train_lrpo(config)
    (epoch,) = _history(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "speed.json").read_text())["lrpo"]["mixed_precision"] == "bf16"
    # the network runs in bf16; the sampling chain and the log-probs stay fp32
    assert dtypes == {"conv": {torch.bfloat16}, "log_prob": {torch.float32}, "x_t": {torch.float32}}
    assert epoch["ppo/ratio_dev_first"] == 0.0 and epoch["ppo/ratio_dev_max"] > 0


def test_compile_compiles_the_trained_network_and_the_frozen_unet_in_place(tmp_path, latent_restorer, monkeypatch):
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    speed.compile_networks(RunConfig(compile=False), latent_restorer.controlnet)
    assert compiled == []
    run = RunConfig(output_dir=str(tmp_path), compile=True, speed="off")
    accelerator = make_accelerator(run, "x")
    speed.speed_up_stage2(run, accelerator, latent_restorer, latent_restorer.controlnet, Workload(2, 1, 1), "t")
    assert compiled == [latent_restorer.controlnet, latent_restorer.unet]
    accelerator.end_training()
