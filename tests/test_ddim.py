"""DDIM as a Gaussian policy (docs/methods.md 2.1), rollouts and ReFL truncation (docs/methods.md 1.2)."""

from __future__ import annotations

import math

import pytest
import torch

from facereward.models.ddim import (
    DDIMSchedule,
    Trajectory,
    ddim_step_with_logprob,
    make_scheduler,
    predict_x0,
    rollout,
    truncated_rollout,
)


@pytest.fixture
def schedule50():
    return DDIMSchedule.from_scheduler(make_scheduler(), 50)


def _abars(schedule: DDIMSchedule, t: int) -> tuple[float, float]:
    """(abar_t, abar_prev) by hand, float64, from the diffusers scheduler's alphas_cumprod."""
    ac = make_scheduler().alphas_cumprod.to(torch.float64)
    prev = t - 20  # 1000 // 50
    return float(ac[t]), float(ac[prev]) if prev >= 0 else 1.0


def _sigma(abar_t: float, abar_prev: float, eta: float) -> float:
    return eta * math.sqrt((1 - abar_prev) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_prev)


def _hand_step(x_t, eps, t: int, eta: float, schedule):
    """mu and sigma of docs/methods.md 2.1, in float64."""
    at, ap = _abars(schedule, t)
    s = _sigma(at, ap, eta)
    x_t, eps = x_t.double(), eps.double()
    x0 = (x_t - math.sqrt(1 - at) * eps) / math.sqrt(at)
    mu = math.sqrt(ap) * x0 + math.sqrt(1 - ap - s**2) * eps
    return mu, s, x0


def _toy_eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic, t-dependent stand-in denoiser."""
    scale = (t.to(x.dtype) / 1000.0).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.5 * torch.tanh(x) + 0.1 * scale


# ---- the schedule ---------------------------------------------------------------------------


def test_schedule_timesteps_981_to_1(schedule50):
    assert schedule50.timesteps.dtype == torch.long
    assert schedule50.timesteps.tolist() == list(range(981, 0, -20))
    assert schedule50.num_steps == 50
    assert schedule50.prev_timestep[981].item() == 961 and schedule50.prev_timestep[1].item() == -1
    assert schedule50.timesteps[0].item() == 981 and schedule50.timesteps[-1].item() == 1


def test_last_step_sigma_is_exactly_zero(schedule50):
    sig = schedule50.sigmas(schedule50.timesteps, 1.0)
    assert sig.dtype == torch.float64
    assert sig[-1].item() == 0.0
    assert (sig[:-1] > 0).all()


def test_middle_sigma_matches_methods_formula(schedule50):
    for t in (981, 501, 21):
        at, ap = _abars(schedule50, t)
        for eta in (1.0, 0.3):
            got = schedule50.sigmas(torch.tensor([t]), eta).item()
            assert got == pytest.approx(_sigma(at, ap, eta), rel=1e-12, abs=0)


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_invalid_step_count_raises(steps):
    with pytest.raises(ValueError, match="DDIM steps"):
        DDIMSchedule.from_scheduler(make_scheduler(), steps)


# ---- one step --------------------------------------------------------------------------------


@pytest.mark.parametrize("t,eta", [(981, 1.0), (501, 1.0), (501, 0.4), (41, 1.0)])
def test_step_log_prob_matches_hand_gaussian(schedule50, t, eta):
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    x_prev = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    mu, s, x0 = _hand_step(x_t, eps, t, eta, schedule50)

    out = ddim_step_with_logprob(eps, t, x_t, schedule50, eta, prev_sample=x_prev)
    hand = (-((x_prev - mu) ** 2) / (2 * s**2) - math.log(s) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    ref = torch.distributions.Normal(mu, s).log_prob(x_prev).mean(dim=(1, 2, 3))
    assert out.log_prob.shape == (3,)
    torch.testing.assert_close(out.log_prob.double(), hand, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.log_prob.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.mean, mu, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.pred_x0, x0, rtol=0, atol=1e-10)
    assert out.std.flatten().tolist() == pytest.approx([s] * 3, rel=1e-12)
    assert torch.equal(out.prev_sample, x_prev)

    # a drawn sample: mean + sigma * noise, and its log-prob is the same hand Gaussian density
    drawn = ddim_step_with_logprob(eps, t, x_t, schedule50, eta, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(drawn.prev_sample, mu + s * noise, rtol=0, atol=1e-10)
    hand_drawn = torch.distributions.Normal(mu, s).log_prob(drawn.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(drawn.log_prob.double(), hand_drawn, rtol=0, atol=1e-5)


def test_step_log_prob_float32_inputs(schedule50):
    """The usual fp32 path also matches the float64 hand density (looser: fp32 mean)."""
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(2, 4, 6, 6, generator=g)
    eps = torch.randn(2, 4, 6, 6, generator=g)
    out = ddim_step_with_logprob(eps, 501, x_t, schedule50, 1.0, generator=g)
    mu, s, _ = _hand_step(x_t, eps, 501, 1.0, schedule50)
    hand = torch.distributions.Normal(mu, s).log_prob(out.prev_sample.double()).mean(dim=(1, 2, 3))
    assert out.log_prob.dtype == torch.float32
    torch.testing.assert_close(out.log_prob.double(), hand, rtol=0, atol=1e-4)


def test_per_sample_timesteps_and_eta_match_separate_calls(schedule50):
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(3, 4, 5, 5, generator=g)
    eps = torch.randn(3, 4, 5, 5, generator=g)
    x_prev = torch.randn(3, 4, 5, 5, generator=g)
    ts = torch.tensor([981, 501, 21])
    etas = torch.tensor([1.0, 0.5, 0.25])
    batched = ddim_step_with_logprob(eps, ts, x_t, schedule50, etas, prev_sample=x_prev)
    for i in range(3):
        one = ddim_step_with_logprob(eps[i : i + 1], int(ts[i]), x_t[i : i + 1], schedule50, float(etas[i]), prev_sample=x_prev[i : i + 1])
        assert torch.equal(batched.mean[i : i + 1], one.mean)
        assert torch.equal(batched.pred_x0[i : i + 1], one.pred_x0)
        assert torch.equal(batched.std[i : i + 1], one.std)
        torch.testing.assert_close(batched.log_prob[i : i + 1], one.log_prob, rtol=1e-6, atol=1e-6)
    # the three samples really are on different steps/etas
    assert len(set(batched.std.flatten().tolist())) == 3

    # drawn samples: per-sample mean + per-sample sigma * the batch's noise
    drawn = ddim_step_with_logprob(eps, ts, x_t, schedule50, etas, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5))
    for i in range(3):
        one = ddim_step_with_logprob(eps[i : i + 1], int(ts[i]), x_t[i : i + 1], schedule50, float(etas[i]), prev_sample=x_prev[i : i + 1])
        torch.testing.assert_close(drawn.prev_sample[i], one.mean[0] + one.std[0] * noise[i], rtol=0, atol=1e-6)


# ---- sigma = 0 steps are finite ----------------------------------------------------------


@pytest.mark.parametrize("t,eta", [(1, 1.0), (501, 0.0), (981, 0.0)])
def test_sigma_zero_steps_are_finite_with_finite_grads(schedule50, t, eta):
    g = torch.Generator().manual_seed(4)
    x_t = torch.randn(2, 3, 4, 4, generator=g)
    w = torch.tensor(0.7, requires_grad=True)
    eps = w * x_t
    out = ddim_step_with_logprob(eps, t, x_t, schedule50, eta, generator=g)
    assert (out.std == 0).all()
    for name in ("prev_sample", "mean", "log_prob", "pred_x0"):
        assert torch.isfinite(getattr(out, name)).all(), name
    assert torch.equal(out.prev_sample, out.mean)
    assert torch.equal(out.log_prob, torch.zeros(2))

    (out.mean.square().sum() + out.log_prob.sum()).backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.item() != 0

    # recomputing with a given prev_sample (and grad through the mean) is finite too
    w.grad = None
    prev = out.prev_sample.detach() + 0.1
    again = ddim_step_with_logprob(w * x_t, t, x_t, schedule50, eta, prev_sample=prev)
    assert torch.equal(again.log_prob, torch.zeros(2))
    (again.log_prob.sum() + again.mean.sum()).backward()
    assert torch.isfinite(w.grad).all()


# ---- rollouts ----------------------------------------------------------------------------


def test_recomputed_log_prob_gives_ratio_exactly_one(latent_restorer):
    r = latent_restorer
    lq = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = r.condition(r.clean(lq))
    schedule = DDIMSchedule.from_scheduler(r.scheduler, 6)
    x_T = torch.randn(r.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(1))
    traj = rollout(r.eps_fn(cond), x_T, schedule, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert isinstance(traj, Trajectory)
    assert traj.samples.shape == (7, *x_T.shape)
    assert traj.log_probs.shape == (2, 6) and traj.sigmas.shape == (2, 6)
    assert torch.equal(traj.samples[0], x_T)
    assert torch.equal(traj.final, traj.samples[-1])
    assert (traj.log_probs[:, :-1] != 0).all() and (traj.log_probs[:, -1] == 0).all()

    eps_fn = r.eps_fn(cond)
    for k in range(schedule.num_steps):
        t_b = traj.timesteps[k].expand(2)
        x_k = traj.samples[k]
        with torch.no_grad():
            new = ddim_step_with_logprob(eps_fn(x_k, t_b), t_b, x_k, schedule, 1.0, prev_sample=traj.samples[k + 1])
        assert torch.equal(new.log_prob.float(), traj.log_probs[:, k]), k
        assert torch.equal(torch.exp(new.log_prob.float() - traj.log_probs[:, k]), torch.ones(2))
    # the training path recomputes with grad enabled on the trainable net: still ratio 1
    k = 2
    t_b = traj.timesteps[k].expand(2)
    new = ddim_step_with_logprob(eps_fn(traj.samples[k], t_b), t_b, traj.samples[k], schedule, 1.0, prev_sample=traj.samples[k + 1])
    assert new.log_prob.requires_grad
    assert torch.equal(new.log_prob.detach().float(), traj.log_probs[:, k])


def test_eta_zero_restore_is_deterministic(pixel_restorer):
    lq = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = pixel_restorer.restore(lq, steps=5, eta=0.0, generator=torch.Generator().manual_seed(11))["restored"]
    b = pixel_restorer.restore(lq, steps=5, eta=0.0, generator=torch.Generator().manual_seed(11))["restored"]
    assert torch.equal(a, b)


def test_eta_zero_rollout_uses_no_step_noise(pixel_restorer):
    r = pixel_restorer
    lq = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cond = r.condition(r.clean(lq))
    schedule = DDIMSchedule.from_scheduler(r.scheduler, 5)
    assert (schedule.sigmas(schedule.timesteps, 0.0) == 0).all()
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t1 = rollout(r.eps_fn(cond), x_T, schedule, eta=0.0, generator=torch.Generator().manual_seed(2))
    t2 = rollout(r.eps_fn(cond), x_T, schedule, eta=0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t1.samples, t2.samples)
    assert (t1.sigmas == 0).all() and (t1.log_probs == 0).all() and (t1.etas == 0).all()
    assert torch.isfinite(t1.samples).all()
    # contrast: with eta = 1 the generator does matter
    s1 = rollout(r.eps_fn(cond), x_T, schedule, eta=1.0, generator=torch.Generator().manual_seed(2), record=False)
    s2 = rollout(r.eps_fn(cond), x_T, schedule, eta=1.0, generator=torch.Generator().manual_seed(3), record=False)
    assert isinstance(s1, torch.Tensor) and not torch.equal(s1, s2)


def test_random_eta_is_recorded_per_step(schedule50):
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), 10)
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    traj = rollout(_toy_eps_fn, x_T, schedule, eta="random", generator=torch.Generator().manual_seed(1))
    assert traj.etas.shape == (3, 10)
    assert ((traj.etas >= 0) & (traj.etas <= 1)).all()
    assert len(set(traj.etas[0].tolist())) == 10  # redrawn at every step
    assert torch.equal(traj.etas, traj.etas[:1].expand(3, -1))  # one draw per step, shared by the batch
    expected = torch.stack([schedule.sigmas(schedule.timesteps, traj.etas[i].double()) for i in range(3)]).float()
    torch.testing.assert_close(traj.sigmas, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad", ["rand", "", "1.0"])
def test_invalid_eta_string_raises(schedule50, bad):
    x_T = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="eta"):
        rollout(_toy_eps_fn, x_T, schedule50, eta=bad)
    with pytest.raises(ValueError, match="eta"):
        truncated_rollout(_toy_eps_fn, x_T, schedule50, grad_step=3, eta=bad)


# ---- ReFL truncation ---------------------------------------------------------------------


@pytest.mark.parametrize("eta", [1.0, "random"])
def test_truncated_rollout_grad_and_consistency(latent_restorer, eta):
    r = latent_restorer
    lq = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = r.condition(r.clean(lq))
    schedule = DDIMSchedule.from_scheduler(r.scheduler, 5)
    x_T = torch.randn(r.latent_shape(1, 32, 32), generator=torch.Generator().manual_seed(1))
    k = 3
    out = truncated_rollout(r.eps_fn(cond), x_T, schedule, grad_step=k, eta=eta, generator=torch.Generator().manual_seed(2))
    traj = rollout(r.eps_fn(cond), x_T, schedule, eta=eta, generator=torch.Generator().manual_seed(2))

    assert out.x_t.grad_fn is None and out.x_t.requires_grad is False
    assert torch.equal(out.x_t, traj.samples[k])
    assert torch.equal(out.t, schedule.timesteps[k].expand(1))
    assert out.pred_x0.requires_grad and out.eps.requires_grad
    abar_t, _ = schedule.alpha_bars(out.t)
    torch.testing.assert_close(out.pred_x0, predict_x0(out.x_t, out.eps, abar_t.reshape(1, 1, 1, 1)))

    out.pred_x0.square().mean().backward()
    grads = [p.grad for p in r.controlnet.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in r.unet.parameters())


def test_truncated_rollout_at_step_zero_starts_from_x_T(schedule50):
    x_T = torch.randn(2, 2, 4, 4)
    w = torch.tensor(0.5, requires_grad=True)
    out = truncated_rollout(lambda x, t: w * x, x_T, schedule50, grad_step=0)
    assert torch.equal(out.x_t, x_T)
    out.pred_x0.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad)


def test_truncated_rollout_prefix_runs_without_grad(schedule50):
    """Steps 0..k-1 call the model with grad off; step k with grad on; x_t is cut from x_T's graph."""
    modes = []
    w = torch.tensor(0.5, requires_grad=True)

    def spy(x, t):
        modes.append(torch.is_grad_enabled())
        return w * x

    x_T = torch.randn(2, 2, 4, 4).requires_grad_()
    out = truncated_rollout(spy, x_T, schedule50, grad_step=4, generator=torch.Generator().manual_seed(0))
    assert modes == [False] * 4 + [True]
    assert out.x_t.grad_fn is None and out.x_t.requires_grad is False
    out0 = truncated_rollout(spy, x_T, schedule50, grad_step=0)
    assert out0.x_t.requires_grad is False and torch.equal(out0.x_t, x_T.detach())
    out0.pred_x0.sum().backward()
    assert x_T.grad is None and w.grad is not None


@pytest.mark.parametrize("k", [-1, 50, 51])
def test_truncated_rollout_invalid_grad_step(schedule50, k):
    with pytest.raises(ValueError, match="grad_step"):
        truncated_rollout(_toy_eps_fn, torch.randn(1, 2, 4, 4), schedule50, grad_step=k)


# ---- timestep spacings and the final alpha-bar (docs/methods.md 0, "Sampling") ---------------------------------


def test_spacings_at_50_steps_match_the_originals():
    from facereward.models.ddim import sampling_timesteps

    assert sampling_timesteps(50, 1000, "leading") == list(range(981, 0, -20))  # ldm DDIM "uniform": both papers
    assert sampling_timesteps(50, 1000, "linspace") == [round(i * 999 / 49) for i in range(49, -1, -1)]  # DiffBIR
    assert sampling_timesteps(50, 1000, "trailing") == list(range(999, 0, -20))


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_every_step_count_is_valid_and_starts_at_the_top(spacing):
    from facereward.models.ddim import sampling_timesteps

    for steps in range(1, 1001):
        ts = sampling_timesteps(steps, 1000, spacing)
        assert len(ts) == steps == len(set(ts)) and ts == sorted(ts, reverse=True), (spacing, steps)
        assert 0 <= ts[-1] and ts[0] <= 999
        # pure noise is the right start: the first timestep is in the top 15% and within one stride of the end
        assert ts[0] >= max(850, 1000 - 1000 / steps), (spacing, steps, ts[0])
        if steps > 1:
            assert ts[-1] <= 1000 / steps, (spacing, steps, ts[-1])  # and the grid reaches the bottom


def test_final_alpha_bar_first_gives_the_papers_last_sigma():
    """ldm's DDIM lands on alpha-bar_0: the last step (t = 1) has sigma ~0.021 at eta 1, not 0."""
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), 50, final_alpha_bar="first")
    ac = make_scheduler().alphas_cumprod.double()
    hand = math.sqrt((1 - ac[0]) / (1 - ac[1])) * math.sqrt(1 - ac[1] / ac[0])
    last = schedule.sigmas(schedule.timesteps[-1:], 1.0).item()
    assert last == pytest.approx(hand, rel=1e-12) and last == pytest.approx(0.0207, abs=5e-4)
    # recorded in a scheduler's config, it is the model's default
    assert DDIMSchedule.from_scheduler(make_scheduler(final_alpha_bar="first"), 50).final_alpha_cumprod == float(ac[0])
    assert DDIMSchedule.from_scheduler(make_scheduler(), 50).final_alpha_cumprod == 1.0
    with pytest.raises(ValueError, match="final_alpha_bar must be one of"):
        DDIMSchedule.from_scheduler(make_scheduler(), 50, final_alpha_bar="zero")


@pytest.mark.parametrize("spacing,final", [("linspace", "one"), ("trailing", "first"), ("leading", "first")])
def test_log_prob_recompute_is_exact_on_any_schedule(spacing, final):
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), 7, spacing=spacing, final_alpha_bar=final)
    traj = rollout(_toy_eps_fn, torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), schedule,
                   eta=1.0, generator=torch.Generator().manual_seed(1))
    for k, t in enumerate(schedule.timesteps):
        again = ddim_step_with_logprob(_toy_eps_fn(traj.samples[k], t.expand(2)), t, traj.samples[k], schedule, 1.0,
                                       prev_sample=traj.samples[k + 1])
        assert torch.isfinite(again.log_prob).all()
        assert torch.equal(torch.exp(again.log_prob.float() - traj.log_probs[:, k]), torch.ones(2))
    # the step after t goes to the next listed timestep
    ts = schedule.timesteps.tolist()
    assert [int(schedule.prev_timestep[t]) for t in ts] == ts[1:] + [-1]


def test_restore_accepts_every_step_count_from_1_to_1000():
    from facereward.models.restorer import PixelUNetConfig, Restorer, RestorerConfig

    r = Restorer.build(RestorerConfig(size=8, cleaner_kwargs={"channels": 8, "num_blocks": 1, "downscale": 1},
                                      pixel=PixelUNetConfig(block_out_channels=[8, 8], attention_levels=[False, False],
                                                            norm_num_groups=4)))
    lq = torch.rand(1, 3, 8, 8)
    for steps in (1, 2, 1000):  # 1000 once raised IndexError, 1 and 2 started at t = 1 and 501
        out = r.restore(lq, steps=steps, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out["restored"]).all()
