"""`facereward train-base`: the base restorer, stage 1 (L1) then stage 2 (epsilon prediction), docs/methods.md 0.

Stage 1 trains the cleaner C on (LQ, HQ) with L1. Stage 2 freezes C and trains the stage-2 network
(the pixel UNet, or the ControlNet in latent mode) with `||eps - eps_theta(x_t, t, cond(C(lq)))||^2`.
The result is a restorer folder at OUTPUT/model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from facereward.data.datasets import collate_batch
from facereward.data.training_data import DataConfig, build_dataset
from facereward.models.ddim import (
    make_scheduler,
    q_sample,
    scheduler_defaults,
    training_target,
)
from facereward.models.families import require_multi_step
from facereward.models.restorer import Restorer, RestorerConfig
from facereward.plugins import import_plugins
from facereward.train.accelerator import RunConfig, engine_of, make_accelerator
from facereward.train.checkpoints import (
    checkpoint_run,
    restore_run,
    resume_run,
    write_run_config,
)
from facereward.train.data_stream import BatchStream, data_position, resumable_loader
from facereward.train.progress import ProgressLog
from facereward.train.speed import Workload, speed_up_cleaner, speed_up_stage2


@dataclass
class TrainBaseConfig:
    SMOKE: ClassVar[dict[str, float]] = {"stage1_steps": 2, "stage2_steps": 2, "batch_size": 2, "warmup_steps": 1,
                                         "data.toy_faces": 8, "run.save_every": 2}  # facereward.smoke
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/base", save_every=500))
    data: DataConfig = field(default_factory=DataConfig)
    model: RestorerConfig = field(default_factory=RestorerConfig)
    init_from: str | None = None  # start from an existing restorer folder instead of random weights
    imports: list[str] = field(default_factory=list)  # plugin modules or .py files imported first (register_degradation, ...)
    # with init_from: take its weights but the noise schedule and prediction type of `model` (e.g. fine-tune an
    # eps model into a v-prediction one); the model's sampling defaults (spacing, final alpha-bar) are kept
    init_schedule: bool = False
    stage1_steps: int = 1000
    stage2_steps: int = 5000
    batch_size: int = 16
    stage1_lr: float = 2e-4
    stage2_lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    loss_weighting: str = "uniform"  # "uniform" or "min_snr": weight min(SNR_t, gamma) / SNR_t (Hang et al. 2023)
    min_snr_gamma: float = 5.0


def stage1_loss(restorer: Restorer, batch: dict[str, Any], net: torch.nn.Module | None = None) -> torch.Tensor:
    """L1 between C(lq) and the HQ image; `net` is the (wrapped) cleaner being trained, default the restorer's own."""
    return F.l1_loss((restorer.cleaner if net is None else net)(batch["lq"]), batch["hq"])


def stage2_loss(restorer: Restorer, batch: dict[str, Any], generator: torch.Generator | None = None,
                weighting: str = "uniform", min_snr_gamma: float = 5.0, net: torch.nn.Module | None = None) -> torch.Tensor:
    """MSE of the stage-2 output against its target (eps, v or x0: the model's `prediction_type`) at a uniform random
    training timestep, conditioned on the frozen C(lq); `net` is the (wrapped) stage-2 network being trained.

    `weighting="min_snr"` is Min-SNR-gamma (Hang et al. 2023): the weight that makes each target's loss equal to
    min(SNR_t, gamma) times the x0 error, SNR_t = abar_t / (1 - abar_t): min(SNR, gamma) / SNR for eps,
    min(SNR, gamma) / (SNR + 1) for v, min(SNR, gamma) for x0.
    """
    if weighting not in ("uniform", "min_snr"):
        raise ValueError(f"loss_weighting must be 'uniform' or 'min_snr', got {weighting!r}")
    with torch.no_grad():
        cond = restorer.condition(restorer.clean(batch["lq"]))
        x0 = restorer.encode(batch["hq"])
    n_train = restorer.scheduler.config.num_train_timesteps
    t = torch.randint(0, n_train, (x0.shape[0],), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    abar = restorer.scheduler.alphas_cumprod.to(x0.device)[t]
    x_t = q_sample(x0, noise, t, restorer.scheduler.alphas_cumprod)
    kind = restorer.prediction_type
    target = training_target(x0, noise, abar, kind)
    per_sample = (restorer.predict_output(x_t, t, cond, net=net).float() - target.float()).pow(2).flatten(1).mean(1)
    if weighting == "min_snr":
        snr = abar.float() / (1 - abar.float())
        denominator = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[kind]
        per_sample = per_sample * snr.clamp(max=min_snr_gamma) / denominator
    return per_sample.mean()


def _lr_lambda(warmup: int, done: int = 0):
    """Linear warmup over `warmup` optimizer steps, `done` of which already ran before a resume."""
    return lambda step: min(1.0, (step + done + 1) / warmup) if warmup > 0 else 1.0


def check_config(config: TrainBaseConfig) -> None:
    """Reject step counts that cannot train (ValueError naming the field)."""
    for name in ("stage1_steps", "stage2_steps"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    if config.stage1_steps == 0 and config.stage2_steps == 0:
        raise ValueError("stage1_steps and stage2_steps are both 0: nothing to train")


SCHEDULE_FIELDS = ("beta_schedule", "beta_start", "beta_end", "prediction_type")


def initial_restorer(config: TrainBaseConfig) -> Restorer:
    """The restorer training starts from: `model` built at random, or `init_from` (with `model`'s schedule if
    `init_schedule`)."""
    if not config.init_from:
        if config.init_schedule:
            raise ValueError("init_schedule needs init_from (the restorer whose weights to start from)")
        return Restorer.build(config.model)
    require_multi_step(config.init_from, "train-base", f"{config.init_from}: train-base trains a cleaner and a multi-step "
                       "stage 2; a one-step restorer is trained by its own script (scripts/train_toy_onestep.py) or imported "
                       "(facereward import-osediff)")
    restorer = Restorer.from_pretrained(config.init_from)
    if config.init_schedule:
        spacing, final = scheduler_defaults(restorer.scheduler)
        for name in SCHEDULE_FIELDS:
            setattr(restorer.config, name, getattr(config.model, name))
        c = restorer.config
        restorer.scheduler = make_scheduler(c.beta_schedule, c.beta_start, c.beta_end,
                                            restorer.scheduler.config.num_train_timesteps, spacing, final, c.prediction_type)
    return restorer


def train_base(config: TrainBaseConfig) -> Path:
    """Run both stages (resuming if asked) and write OUTPUT/model and OUTPUT/metrics.json; returns the model folder."""
    import_plugins(config.imports, option="imports")
    check_config(config)
    run = config.run
    accelerator = make_accelerator(run, "train-base")
    write_run_config(config, run, accelerator)
    restorer = initial_restorer(config)
    if config.data.size != restorer.config.size:
        raise ValueError(f"data.size {config.data.size} differs from the model size {restorer.config.size}")
    restorer.to(accelerator.device)
    dataset = build_dataset(config.data)
    loader = resumable_loader(dataset, config.batch_size, run.seed, num_workers=config.data.num_workers, collate_fn=collate_batch,
                              drop_last=len(dataset) >= config.batch_size)
    cleaner, stage2 = restorer.cleaner, restorer.stage2_trainable()
    opt1 = torch.optim.AdamW(cleaner.parameters(), lr=config.stage1_lr, weight_decay=config.weight_decay)
    opt2 = torch.optim.AdamW(stage2.parameters(), lr=config.stage2_lr, weight_decay=config.weight_decay)
    modules = {"cleaner": cleaner, "stage2": stage2}
    optimizers = {"stage1": opt1, "stage2": opt2}
    if engine_of(accelerator):
        raise ValueError(f"train-base runs on one process or DDP, not {engine_of(accelerator)} (it trains two networks one "
                         "after the other; use configs/accelerate/ddp.yaml)")
    state = resume_run(accelerator, run)
    step = state["step"] if state else 0
    total = config.stage1_steps + config.stage2_steps
    batches = BatchStream(accelerator.prepare(loader), accelerator, data_position(state))
    log = ProgressLog(accelerator, total, step, "train-base", run.log_every, run.progress,
                      history=state.get("train_log") if state else None)
    restore_run(accelerator, state, modules, optimizers)  # last, after every setup that draws random numbers

    for stage, n_steps, module, opt, lr in (
        (1, config.stage1_steps, cleaner, opt1, config.stage1_lr),
        (2, config.stage2_steps, stage2, opt2, config.stage2_lr),
    ):
        start = config.stage1_steps if stage == 2 else 0
        if step >= start + n_steps:
            continue
        restorer.requires_grad_(False)
        module.requires_grad_(True)
        module.train()
        if stage == 1:
            speed_up_cleaner(run, accelerator, restorer, config.batch_size, "train-base/stage1")
        else:
            speed_up_stage2(run, accelerator, restorer, module, Workload(config.batch_size, 0, 1), "train-base/stage2")
        wrapped, opt = accelerator.prepare(module, opt)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.warmup_steps, done=step - start))
        while step < start + n_steps:
            _, batch = next(batches)
            with accelerator.accumulate(wrapped):
                with accelerator.autocast():
                    loss = (stage1_loss(restorer, batch, net=wrapped) if stage == 1
                            else stage2_loss(restorer, batch, weighting=config.loss_weighting, min_snr_gamma=config.min_snr_gamma,
                                             net=wrapped))
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.grad_clip > 0:
                    accelerator.clip_grad_norm_(wrapped.parameters(), config.grad_clip)
                opt.step()  # a no-op on accumulation micro-steps
                opt.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            sched.step()
            step += 1
            log.step(step, {f"stage{stage}/loss": loss, f"stage{stage}/lr": sched.get_last_lr()[0]})
            if step % run.save_every == 0 or step == total:
                checkpoint_run(accelerator, run, step, modules, optimizers, {"data": batches.position(), "train_log": log.history})
        # drop the autocast forward that prepare gives a bf16 stage: a run resumed into the next stage never had it
        accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
        module.eval()
        # back to the layout a resume that starts in the next stage loads it in (channels_last changes conv numerics)
        module.to(memory_format=torch.contiguous_format)
    log.close()
    out = Path(run.output_dir) / "model"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        restorer.save_pretrained(out)
        (Path(run.output_dir) / "metrics.json").write_text(json.dumps({"train_log": log.history}, indent=1))
    accelerator.end_training()
    return out

