"""DDIM with per-step Gaussian log-probabilities (docs/methods.md 2.1), rollouts and ReFL truncation (1.2).

The schedule is a diffusers `DDIMScheduler` (so it saves and loads as a diffusers folder); the
step maths is ours, batched, with timesteps and eta given per sample, and no host syncs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Callable, Literal, Union

import torch
from diffusers import DDIMScheduler

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A denoiser with its condition bound: eps = fn(x_t, t), t a (B,) long tensor."""

Eta = Union[float, Literal["random"]]
"""A fixed eta, or "random": redrawn from U(0, 1) at every step (the DiffusionReward quirk, docs/methods.md 1.2)."""

Generators = Union[torch.Generator, Sequence[torch.Generator], None]
"""One generator for the batch, or one per sample (row i's noise from generator i, so a sample's draws do not depend
on which other samples share its batch or process)."""

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape` (rows first) from one generator or one per row."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])


def row_generators(device: torch.device | str, *seeds: int) -> list[torch.Generator]:
    """One generator per row, seeded with the given ints (see `Generators`)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def mix_seed(*words: int) -> int:
    """One 32-bit seed from several ints (numpy's SeedSequence): e.g. (run seed, step, sample row, purpose)."""
    import numpy as np

    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1)[0])


Spacing = Literal["leading", "linspace", "trailing"]
"""How T sampling timesteps are picked from the training schedule's n (docs/methods.md 0, "Sampling"):
- "leading": ldm's and diffusers' DDIM grid floor(i n / T) + 1 (981, 961, ..., 1 for 50): both papers' sampler;
- "linspace": round(i * (n - 1) / (T - 1)) (999, 979, ..., 0 for 50): DiffBIR's spaced sampler;
- "trailing": round(n - i * n / T) - 1 (999, 979, ..., 19 for 50)."""
SPACINGS = ("leading", "linspace", "trailing")

FinalAlphaBar = Literal["one", "first"]
"""The alpha-bar the last step lands on: 1 (sigma 0 on the last step) or alpha-bar_0 (ldm's DDIM, both papers)."""
FINAL_ALPHA_BARS = ("one", "first")

PredictionType = Literal["epsilon", "v_prediction", "sample"]
"""What the stage-2 network outputs (diffusers' names; docs/methods.md 0, "Prediction target"): the noise eps, the
velocity v = sqrt(abar) eps - sqrt(1 - abar) x0 (better conditioned at high noise), or x0 itself. The sampler and
both trainers work on eps, converted by `output_to_eps`."""
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def make_scheduler(
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
    spacing: Spacing = "leading",
    final_alpha_bar: FinalAlphaBar = "one",
    prediction_type: PredictionType = "epsilon",
) -> DDIMScheduler:
    """A DDIM schedule whose config records the default spacing, final alpha-bar and what the network predicts."""
    _check_choice("spacing", spacing, SPACINGS)
    _check_choice("final_alpha_bar", final_alpha_bar, FINAL_ALPHA_BARS)
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    return DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=beta_schedule,
        clip_sample=False,
        set_alpha_to_one=final_alpha_bar == "one",
        steps_offset=1,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
    )


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def sampling_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: Spacing = "leading") -> list[int]:
    """T distinct descending timesteps in [0, n) whose first is at the top of the schedule, for any 1 <= T <= n.

    "leading" is ldm's grid where that reaches the top 15% of the schedule and its last stride (T = 7, 8, 10, 20, 50,
    ...; for T not dividing n the stride is n / T floored per step, not n // T, so the grid spans the schedule);
    otherwise (T = 1-6, T = n, a few others) it is shifted to end at n - 1, so sampling from pure noise starts at the
    right level (alpha-bar <= 0.023 at t >= 850 for SD's schedule).
    "linspace" with T = 1 is [n - 1] (DiffBIR's spacing would give [0]).
    """
    n = int(num_train_timesteps)
    if not 1 <= num_steps <= n:
        raise ValueError(f"DDIM steps must be in [1, {n}], got {num_steps}")
    if spacing == "leading":
        grid = [i * n // num_steps + 1 for i in range(num_steps)]
        top = grid[-1]
        if top > n - 1 or top < n - n / num_steps or top < 0.85 * n:
            grid = [g + (n - 1 - top) for g in grid]
    elif spacing == "linspace":
        grid = [n - 1] if num_steps == 1 else [round(i * (n - 1) / (num_steps - 1)) for i in range(num_steps)]
    elif spacing == "trailing":
        grid = [round(n - i * n / num_steps) - 1 for i in range(num_steps)][::-1]
    else:
        _check_choice("spacing", spacing, SPACINGS)
    return sorted(grid, reverse=True)


def scheduler_defaults(scheduler: DDIMScheduler) -> tuple[str, str]:
    """(spacing, final alpha-bar) a scheduler's config records: diffusers' `timestep_spacing` and `set_alpha_to_one`."""
    cfg = scheduler.config
    return cfg.get("timestep_spacing", "leading"), "one" if cfg.get("set_alpha_to_one", True) else "first"


@dataclass
class DDIMSchedule:
    """T DDIM timesteps over the training schedule (e.g. 981, 961, ..., 1 for 50) and each one's predecessor."""

    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) float64
    final_alpha_cumprod: float
    timesteps: torch.Tensor  # (T,) long, descending
    prev_timestep: torch.Tensor  # (num_train_timesteps,) long: the next timestep sampled after t, -1 after the last

    @classmethod
    def from_timesteps(cls, alphas_cumprod: torch.Tensor, timesteps: Sequence[int], final_alpha_cumprod: float,
                       device: torch.device | str = "cpu") -> "DDIMSchedule":
        """A schedule over any distinct timesteps (sorted descending here); the last lands on `final_alpha_cumprod`."""
        n = int(alphas_cumprod.shape[0])
        ts = sorted({int(t) for t in timesteps}, reverse=True)
        if len(ts) != len(timesteps) or not ts or ts[0] >= n or ts[-1] < 0:
            raise ValueError(f"timesteps must be distinct integers in [0, {n}), got {list(timesteps)}")
        prev = torch.full((n,), -1, dtype=torch.long)
        for t, p in zip(ts[:-1], ts[1:]):
            prev[t] = p
        return cls(
            alphas_cumprod=alphas_cumprod.to(device=device, dtype=torch.float64),
            final_alpha_cumprod=float(final_alpha_cumprod),
            timesteps=torch.tensor(ts, dtype=torch.long, device=device),
            prev_timestep=prev.to(device),
        )

    @classmethod
    def from_scheduler(cls, scheduler: DDIMScheduler, num_steps: int, device: torch.device | str = "cpu",
                       spacing: Spacing | None = None, final_alpha_bar: FinalAlphaBar | None = None) -> "DDIMSchedule":
        """`num_steps` timesteps of `scheduler`'s training schedule; spacing and final alpha-bar default to its config's."""
        cfg = scheduler.config
        default_spacing, default_final = scheduler_defaults(scheduler)
        spacing, final_alpha_bar = spacing or default_spacing, final_alpha_bar or default_final
        _check_choice("final_alpha_bar", final_alpha_bar, FINAL_ALPHA_BARS)
        alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
        final = 1.0 if final_alpha_bar == "one" else float(alphas_cumprod[0])
        timesteps = sampling_timesteps(num_steps, cfg.num_train_timesteps, spacing)
        return cls.from_timesteps(alphas_cumprod, timesteps, final, device)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def alpha_bars(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(abar_t, abar_prev) for timesteps `t`; the last timestep's prev is the final alpha-bar."""
        prev = self.prev_timestep[t]
        abar_t = self.alphas_cumprod[t]
        final = torch.full_like(abar_t, self.final_alpha_cumprod)
        abar_prev = torch.where(prev >= 0, self.alphas_cumprod[prev.clamp(min=0)], final)
        return abar_t, abar_prev

    def sigmas(self, t: torch.Tensor, eta: float | torch.Tensor = 1.0) -> torch.Tensor:
        """DDIM sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (docs/methods.md 2.1), float64."""
        abar_t, abar_prev = self.alpha_bars(t)
        return eta * torch.sqrt((1 - abar_prev) / (1 - abar_t)) * torch.sqrt((1 - abar_t / abar_prev).clamp(min=0))

    def to(self, device: torch.device | str) -> "DDIMSchedule":
        return DDIMSchedule(self.alphas_cumprod.to(device), self.final_alpha_cumprod, self.timesteps.to(device),
                            self.prev_timestep.to(device))


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x_{t-1}
    mean: torch.Tensor  # mu_theta(x_t)
    std: torch.Tensor  # sigma_t, broadcastable to the sample
    log_prob: torch.Tensor  # (B,) mean over elements of log N(prev; mean, std^2); 0 where std = 0
    pred_x0: torch.Tensor


def _per_sample(abar: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return abar.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def output_to_eps(output: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor, prediction_type: PredictionType) -> torch.Tensor:
    """The eps a network output implies at x_t (docs/methods.md 0, "Prediction target"); abar_t per sample.

    v: eps = sqrt(abar) v + sqrt(1 - abar) x_t;  x0: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar).
    """
    abar = _per_sample(abar_t, x_t)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return abar.sqrt() * output + (1 - abar).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - abar.sqrt() * output) / (1 - abar).sqrt()
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")


def training_target(x0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor, prediction_type: PredictionType) -> torch.Tensor:
    """What the network should output for x_t = sqrt(abar) x0 + sqrt(1 - abar) noise: noise, v or x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        abar = _per_sample(abar_t, x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (docs/methods.md 1.2 step 3)."""
    abar = abar_t.to(x_t.dtype)
    return (x_t - torch.sqrt(1 - abar) * eps) / torch.sqrt(abar)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over elements of log N(x; mean, std^2), in fp32 at least; 0 where std = 0."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, mean = x.to(dtype), mean.to(dtype)
    std = std.to(dtype).expand_as(x)
    positive = std > 0
    safe_std = torch.where(positive, std, torch.ones_like(std))
    elem = -((x - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - _HALF_LOG_2PI
    elem = torch.where(positive, elem, torch.zeros_like(elem))
    return elem.mean(dim=tuple(range(1, x.ndim)))


def ddim_step_with_logprob(
    eps: torch.Tensor,
    t: torch.Tensor | int,
    x_t: torch.Tensor,
    schedule: DDIMSchedule,
    eta: float | torch.Tensor = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: Generators = None,
) -> StepOutput:
    """One DDIM step as a Gaussian policy (docs/methods.md 2.1).

    `t` and `eta` are scalars or per-sample (B,). With `prev_sample` given, its log-prob is
    computed instead of drawing a new sample (to recompute the log-prob of a recorded step).
    """
    batch, ndim = x_t.shape[0], x_t.ndim
    t = torch.as_tensor(t, device=x_t.device, dtype=torch.long)
    if t.ndim == 0:
        t = t.expand(batch)
    abar_t, abar_prev = schedule.alpha_bars(t)
    abar_t = abar_t.reshape(batch, *([1] * (ndim - 1)))
    abar_prev = abar_prev.reshape(batch, *([1] * (ndim - 1)))
    std = schedule.sigmas(t, torch.as_tensor(eta, dtype=torch.float64, device=x_t.device)).reshape(batch, *([1] * (ndim - 1)))
    pred_x0 = predict_x0(x_t, eps, abar_t)
    # mu = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps   (docs/methods.md 2.1)
    dir_coef = torch.sqrt((1 - abar_prev - std**2).clamp(min=0))
    mean = torch.sqrt(abar_prev).to(x_t.dtype) * pred_x0 + dir_coef.to(x_t.dtype) * eps
    std_x = std.to(x_t.dtype)
    if prev_sample is None:
        noise = randn(x_t.shape, generator, x_t.device, x_t.dtype)
        prev_sample = mean + std_x * noise
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    return StepOutput(prev_sample=prev_sample, mean=mean, std=std_x, log_prob=log_prob, pred_x0=pred_x0)


def _eta_for_step(eta: Eta, batch: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor | float:
    if eta == "random":
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError("eta 'random' with per-row generators needs eta_generator (one draw for the whole batch)")
        return torch.rand((), generator=generator, device=device).expand(batch)
    if isinstance(eta, str):
        raise ValueError(f"eta must be a number or 'random', got {eta!r}")
    return float(eta)


@dataclass
class Trajectory:
    """A recorded rollout: samples[k] is the input of step k, samples[k + 1] its output."""

    samples: torch.Tensor  # (T + 1, B, ...)
    log_probs: torch.Tensor  # (B, T) float32
    timesteps: torch.Tensor  # (T,) long
    sigmas: torch.Tensor  # (B, T) float32, the std of each step
    etas: torch.Tensor  # (B, T) float32

    @property
    def final(self) -> torch.Tensor:
        return self.samples[-1]


@torch.no_grad()
def rollout(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    schedule: DDIMSchedule,
    eta: Eta = 1.0,
    generator: Generators = None,
    record: bool = True,
    eta_generator: torch.Generator | None = None,
) -> Trajectory | torch.Tensor:
    """Sample from x_T through every step without grad; the trajectory, or only x_0 if not `record`.

    Step noise comes from `generator`; eta="random" draws from `eta_generator` (default: `generator`).
    """
    x = x_T
    batch = x.shape[0]
    samples, log_probs, sigmas, etas = [x], [], [], []
    for t in schedule.timesteps:
        t_b = t.expand(batch)
        step_eta = _eta_for_step(eta, batch, x.device, eta_generator if eta_generator is not None else generator)
        out = ddim_step_with_logprob(eps_fn(x, t_b), t_b, x, schedule, step_eta, generator=generator)
        x = out.prev_sample
        if record:
            samples.append(x)
            log_probs.append(out.log_prob.float())
            sigmas.append(out.std.reshape(batch).float())
            etas.append(torch.as_tensor(step_eta, dtype=torch.float32, device=x.device).expand(batch))
    if not record:
        return x
    return Trajectory(
        samples=torch.stack(samples),
        log_probs=torch.stack(log_probs, dim=1),
        timesteps=schedule.timesteps.clone(),
        sigmas=torch.stack(sigmas, dim=1),
        etas=torch.stack(etas, dim=1),
    )


@dataclass
class TruncatedOutput:
    pred_x0: torch.Tensor  # step k's x0 prediction, with grad
    x_t: torch.Tensor  # the (no-grad) input of step k
    t: torch.Tensor  # (B,) the timestep of step k
    eps: torch.Tensor  # step k's noise prediction, with grad


def truncated_rollout(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    schedule: DDIMSchedule,
    grad_step: int,
    eta: Eta = 1.0,
    generator: Generators = None,
    eta_generator: torch.Generator | None = None,
) -> TruncatedOutput:
    """Run steps 0..k-1 without grad, then step k's model call with grad; k = `grad_step` (docs/methods.md 1.2).

    Step noise comes from `generator`; eta="random" draws from `eta_generator` (default: `generator`).
    """
    if not 0 <= grad_step < schedule.num_steps:
        raise ValueError(f"grad_step must be in [0, {schedule.num_steps - 1}], got {grad_step}")
    batch = x_T.shape[0]
    x = x_T
    with torch.no_grad():
        for t in schedule.timesteps[:grad_step]:
            t_b = t.expand(batch)
            step_eta = _eta_for_step(eta, batch, x.device, eta_generator if eta_generator is not None else generator)
            x = ddim_step_with_logprob(eps_fn(x, t_b), t_b, x, schedule, step_eta, generator=generator).prev_sample
    x = x.detach()
    t_b = schedule.timesteps[grad_step].expand(batch)
    eps = eps_fn(x, t_b)
    abar_t, _ = schedule.alpha_bars(t_b)
    pred_x0 = predict_x0(x, eps, abar_t.reshape(batch, *([1] * (x.ndim - 1))))
    return TruncatedOutput(pred_x0=pred_x0, x_t=x, t=t_b, eps=eps)


def q_sample(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Closed-form forward noising q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t per sample."""
    abar = alphas_cumprod.to(x0.device)[t].to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def output_to_x0(output: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor, prediction_type: PredictionType) -> torch.Tensor:
    """The x0 a network output implies at x_t, affine in the output (docs/methods.md 5.1); abar_t per sample.

    eps: (x_t - sqrt(1 - abar) eps) / sqrt(abar);  v: sqrt(abar) x_t - sqrt(1 - abar) v;  x0: the output.
    """
    abar = _per_sample(abar_t, x_t)
    if prediction_type == "epsilon":
        return (x_t - (1 - abar).sqrt() * output) / abar.sqrt()
    if prediction_type == "v_prediction":
        return abar.sqrt() * x_t - (1 - abar).sqrt() * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")
