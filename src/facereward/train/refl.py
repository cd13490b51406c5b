"""`facereward refl`: DiffusionReward's Reward Feedback Learning with a dynamic Face Reward Model (docs/methods.md 1.2).

Per batch: DDIM from noise to a grad step k (no grad), the trainable network's step-k call with grad,
x0_hat decoded to x_hat, and the generator loss
    w_r * reward(R(x_hat)) + w_reg * sum_j mean((h_j - h_j_ref)^2) + sum_l w_l * loss_l(x_hat, x_gt),
R the `rewards` spec (its "frm" the dynamic FRM, frozen but differentiable), loss_l the `losses` spec's measures
(the original's: DWT_L1 and LPIPS). Every U generator steps the FRM takes one Bradley-Terry step preferring
the GT over the detached restoration (optionally mixed with pairs of the original preference set).
Setting a weight to 0 (or `dynamic_frm.every: 0`) turns that component off for ablations.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facereward.data.datasets import collate_batch
from facereward.data.training_data import DataConfig, build_dataset
from facereward.measures import MeasureEnv, MeasuresConfig, WeightedSum
from facereward.models.ddim import (
    Generators,
    mix_seed,
    randn,
    row_generators,
    truncated_rollout,
)
from facereward.models.frm import MAX_LOGIT_SCALE, FaceRewardModel, bradley_terry_loss
from facereward.models.families import AnyRestorer, load_restorer
from facereward.plugins import import_plugins
from facereward.train.accelerator import (
    RunConfig,
    check_engine,
    full_network,
    make_accelerator,
)
from facereward.train.checkpoints import (
    checkpoint_run,
    restore_run,
    resume_run,
    write_run_config,
)
from facereward.train.data_stream import BatchStream, data_position, resumable_loader
from facereward.train.heldout import HeldOutConfig, HeldOutEvaluator, HeldOutMonitor, write_metrics
from facereward.train.progress import ProgressLog
from facereward.train.speed import Workload, speed_up_stage2
from facereward.train.trainable import (
    LoraSettings,
    adapters_disabled,
    frozen_copy,
    has_lora,
    prepare_trainable,
    save_restorer,
    trainable_parameters,
)
from facereward.weights import default_restorer_path

REWARD_FORMS = ("one_minus", "negative", "hinge")


@dataclass
class DynamicFRMConfig:
    """The FRM's own Bradley-Terry updates during ReFL (docs/methods.md 1.2 step 6); every: 0 keeps it fixed."""

    every: int = 10  # U: one FRM step per U generator steps
    lr: float = 2e-6
    weight_decay: float = 0.35  # AdamW, on weight matrices only (gains, biases and the logit scale get 0), as the original
    grad_clip: float = 1.0
    loss_weight: float = 0.1  # the Bradley-Terry loss is scaled by this (the original's 0.1)
    vision_unlocked_groups: int | None = None  # clip FRMs: OpenCLIP-style unlocking (the original: 20); None keeps the FRM's own
    text_unlocked_layers: int | None = None  # ... and the last text layers (the original: 11)
    pairs: str | None = None  # the original preference JSONL, mixed in so the FRM does not forget it
    pairs_per_update: int = 0  # preference pairs added to each update (0: none)
    use_captions: bool = True
    # the original's details (docs/methods.md section 4, "ReFL's FRM step"); configs/refl_original.yaml sets them
    offset: int = 0  # the FRM steps after generator steps offset, offset + every, ... (0: every, 2 every, ...; the original: 1)
    max_logit_scale: float | None = MAX_LOGIT_SCALE  # log tau clamped to at most this (log 100); None: unclamped (the original)
    reduction: str = "mean"  # the Bradley-Terry loss over the batch's pairs: mean, or sum (the original)
    divide_by_accumulation: bool = False  # the loss divided by run.gradient_accumulation_steps before the clip (the original,
    # through accelerate's backward)


@dataclass
class ReFLConfig:
    """All ReFL settings; defaults are the original's (docs/methods.md 1.2) but for the corrections docs/methods.md
    section 4 lists (configs/refl_original.yaml has every original value)."""

    SMOKE: ClassVar[dict[str, float]] = {  # facereward.smoke
        "train_steps": 2, "batch_size": 2, "sample_steps": 3, "data.toy_faces": 8, "dynamic_frm.every": 1, "run.save_every": 2,
        "held_out.every": 2, "held_out.toy_faces": 2, "held_out.max_images": 2, "held_out.sample_steps": 2}

    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/refl", save_every=500, log_every=10))
    data: DataConfig = field(default_factory=DataConfig)
    init_from: str | None = None  # the restorer folder to fine-tune (default: the shipped toy restorer)
    imports: list[str] = field(default_factory=list)  # plugin modules or .py files imported first (register_measure, ...)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train_steps: int = 3500  # optimizer steps
    batch_size: int = 1
    lr: float = 5e-5
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    sample_steps: int = 50  # T DDIM steps
    spacing: str | None = None  # timestep spacing leading | linspace | trailing; None: the restorer's
    final_alpha_bar: str | None = None  # one | first (alpha-bar_0: ldm's DDIM, as both originals); None: the restorer's
    grad_window: int = 2  # the grad step is drawn from the last `grad_window` of the T steps
    eta: float | str | None = "random"  # a number, "random": redrawn from U(0, 1) every step (the original), None: the restorer's
    reward_weight: float = 0.005  # w_r
    reward_form: str = "one_minus"  # one_minus: 1 - R; negative: -R; hinge: relu(margin - R)
    reward_margin: float = 1.0
    # R, the reward term's weighted measures (differentiable reward forms only); "frm" is the dynamic FRM, whose folder is
    # options.frm.path (default: the shipped toy FRM)
    rewards: MeasuresConfig = field(default_factory=lambda: MeasuresConfig(weights={"frm": 1.0}))
    clamp_x_hat: bool = True  # x_hat clamped to [0, 1] before the rewards (each loss term has its own `clamp` option)
    accumulate_last_only: bool = False  # the original's quirk: zero_grad inside the accumulate block keeps the last micro-batch
    reg_weight: float = 1e-4  # w_reg, residuals vs the frozen initial network
    # the structural terms, measures minimised as they are (lower is better): the original's DT-CWT low-pass L1 on the
    # clamped x_hat and LPIPS (VGG) on the unclamped one; LPIPS needs options.lpips.backbone_path and heads_path
    losses: MeasuresConfig = field(default_factory=lambda: MeasuresConfig(
        weights={"wavelet": 0.01, "lpips": 0.01},
        options={"wavelet": {"wavelet": "dtcwt", "levels": 3, "clamp": True}, "lpips": {"net": "vgg"}}))
    use_captions: bool = True  # pass captions to caption-scoring FRMs
    dynamic_frm: DynamicFRMConfig = field(default_factory=DynamicFRMConfig)
    held_out: HeldOutConfig = field(default_factory=HeldOutConfig)


def reward_loss(scores: Tensor, form: str, margin: float = 1.0) -> Tensor:
    """Per-image reward term to minimise (docs/methods.md 1.2 step 4): 1 - R, -R, or relu(margin - R)."""
    if form == "one_minus":
        return 1 - scores
    if form == "negative":
        return -scores
    if form == "hinge":
        return F.relu(margin - scores)
    raise ValueError(f"reward_form must be one of {', '.join(REWARD_FORMS)}, got {form!r}")


def residual_regulariser(residuals: list[Tensor], reference: list[Tensor]) -> Tensor:
    """sum_j mean((h_j - h_j_ref)^2) over the trainable network's outputs (docs/methods.md 1.2 step 4)."""
    if len(residuals) != len(reference):
        raise ValueError(f"{len(residuals)} residuals but {len(reference)} reference residuals")
    return sum(((h.float() - r.float()) ** 2).mean() for h, r in zip(residuals, reference))


def frm_param_groups(frm: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of the FRM's trainable parameters: `weight_decay` on weight matrices, 0 on gains, biases, norms and
    the logit scale (every parameter with fewer than 2 dimensions), as the original ReFL builds them."""
    params = [p for p in frm.parameters() if p.requires_grad]
    decay, rest = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def frm_preference_step(frm: FaceRewardModel, optimizer: torch.optim.Optimizer, chosen: Tensor, rejected: Tensor,
                        captions: list[str] | None, grad_clip: float, reduce=None, loss_weight: float = 1.0,
                        max_logit_scale: float | None = MAX_LOGIT_SCALE, reduction: str = "mean",
                        divisor: float = 1.0) -> dict[str, Tensor]:
    """One Bradley-Terry step of the FRM preferring `chosen` over `rejected` (docs/methods.md 1.1, 1.2 step 6).

    The loss is `loss_weight` x the pairs' mean (or sum) Bradley-Terry loss; its gradient is divided by `divisor`
    before the clip (the original's accelerate backward divides by the accumulation steps). `reduce` (e.g.
    accelerator.reduce) averages the gradients over processes before the step.
    """
    frm.train()
    scores = frm(torch.cat([chosen, rejected]), captions * 2 if captions else None)
    s_w, s_l = scores.chunk(2)
    loss = bradley_terry_loss(s_w, s_l, frm.logit_scale, max_logit_scale=max_logit_scale, reduction=reduction) * loss_weight
    optimizer.zero_grad(set_to_none=True)
    (loss / divisor).backward()
    params = [p for p in frm.parameters() if p.requires_grad and p.grad is not None]
    if reduce is not None:
        for p in params:
            p.grad = reduce(p.grad, reduction="mean")
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    frm.eval()
    return {"frm/loss": loss.detach(), "frm/margin": (s_w - s_l).detach().mean()}


@dataclass
class ReFLOutput:
    """One generator micro-step: the total loss (with grad), its logged parts, the detached restoration as the reward saw
    it (clamped to [0, 1] when `clamp_x_hat`)."""

    loss: Tensor
    parts: dict[str, Tensor]
    restored: Tensor


class ReFLStep:
    """The ReFL generator loss for one batch (docs/methods.md 1.2 steps 1-4), independent of the training loop."""

    def __init__(self, config: ReFLConfig, restorer: AnyRestorer, frm: FaceRewardModel, reference: nn.Module | None,
                 losses: WeightedSum | None = None, rewards: WeightedSum | None = None, net: nn.Module | None = None):
        """`rewards`: the reward term's other measures (all but "frm", which is `frm`), weighted as in config.rewards;
        `losses`: the structural terms (config.losses); `net`: the trained network as `accelerator.prepare` returned
        it (default: the restorer's own)."""
        if config.reward_form not in REWARD_FORMS:
            raise ValueError(f"reward_form must be one of {', '.join(REWARD_FORMS)}, got {config.reward_form!r}")
        if not 1 <= config.grad_window <= config.sample_steps:
            raise ValueError(f"grad_window must be in [1, sample_steps={config.sample_steps}], got {config.grad_window}")
        self.config, self.restorer, self.frm, self.reference, self.losses = config, restorer, frm, reference, losses
        self.rewards, self.net = rewards, net
        self.frm_weight = float(config.rewards.weights.get("frm", 0.0))
        self.one_step = restorer.family == "one-step"  # one differentiable call, no trajectory (docs/methods.md 1.3)
        self.schedule = None if self.one_step else restorer.schedule(config.sample_steps, config.spacing,
                                                                     config.final_alpha_bar, device=restorer.device)

    def reference_residuals(self, call) -> list[Tensor]:
        """The initial network's outputs on the same inputs, `call(net)` giving a network's residuals: the trained
        network with its LoRA adapters off, or the frozen copy."""
        with torch.no_grad():
            if self.reference is None:  # the restorer's own (unwrapped) network with its adapters off
                module = self.restorer.stage2_trainable()
                with adapters_disabled(module):
                    return call(module)
            return call(self.reference)

    def restore_with_grad(self, lq: Tensor, generator: Generators, shared: torch.Generator | None):
        """x_hat with gradients, the trained network's residuals, the reference's call, and the grad step k: the one
        step of a one-step restorer, or a multi-step DDIM rollout with grad at one step (docs/methods.md 1.2-1.3)."""
        cfg, restorer = self.config, self.restorer
        if self.one_step:  # the posterior noise (latent mode) from the rows' generators, shared with the reference
            b, _, h, w = lq.shape
            noise = randn(restorer.latent_shape(b, h, w), generator, lq.device, torch.float32)
            x_hat, residuals = restorer.forward_with_residuals(lq, net=self.net, noise=noise)
            return x_hat, residuals, lambda net: restorer.forward_with_residuals(lq, net=net, noise=noise)[1], 0
        with torch.no_grad():
            cond = restorer.condition(restorer.clean(lq))
        b, _, h, w = lq.shape
        x_T = randn(restorer.latent_shape(b, h, w), generator, lq.device, torch.promote_types(cond.dtype, torch.float32))
        # step 1: k from the last `grad_window` steps
        device = shared.device if shared is not None else "cpu"
        k = cfg.sample_steps - 1 - int(torch.randint(cfg.grad_window, (), generator=shared, device=device))
        captured: dict[str, list[Tensor]] = {}

        def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
            eps, residuals = restorer.predict_eps(x_t, t, cond, return_residuals=True, net=self.net)
            captured["residuals"] = residuals  # only the last call (step k, with grad) is used
            return eps

        # steps 2-3: no-grad rollout to k, then step k with grad and x0_hat
        out = truncated_rollout(eps_fn, x_T, self.schedule, k, eta=cfg.eta, generator=generator, eta_generator=shared)
        reference = lambda net: restorer.predict_eps(out.x_t, out.t, cond, return_residuals=True, net=net)[1]  # noqa: E731
        return restorer.decode(out.pred_x0), captured["residuals"], reference, k

    def __call__(self, batch: dict[str, Any], generator: Generators = None, shared: torch.Generator | None = None) -> ReFLOutput:
        """The loss of `batch`. `generator` draws x_T and the step noise (one per row: see `Generators`); `shared`
        draws the grad step k and a random eta, one draw for the whole global batch (default: `generator`)."""
        cfg = self.config
        shared = shared if shared is not None else generator
        if shared is not None and not isinstance(shared, torch.Generator):
            raise ValueError("ReFLStep: per-row generators need a shared generator for k and eta")
        lq, hq = batch["lq"], batch["hq"]
        x_hat, residuals, reference_call, k = self.restore_with_grad(lq, generator, shared)
        x_r = x_hat.clamp(0, 1) if cfg.clamp_x_hat else x_hat  # the original clamps before the FRM
        parts: dict[str, Tensor] = {}
        loss = x_hat.new_zeros(())
        captions = batch.get("caption") if cfg.use_captions else None
        with self.frm.freeze_for_reward():
            scores = self.frm(x_r, captions)
        parts["refl/score"] = scores.detach().mean()
        total = self.frm_weight * scores  # R = w_frm s(x_hat) + sum_j w_j r_j(x_hat, x_gt)
        if self.rewards is not None:
            others = self.rewards(x_r, hq, captions)
            total = total + others.total
            parts.update({f"refl/reward/{k}": v.detach().mean() for k, v in others.components.items()})
        parts["refl/reward"] = total.detach().mean()
        if cfg.reward_weight > 0:
            parts["refl/reward_loss"] = reward_loss(total, cfg.reward_form, cfg.reward_margin).mean()
            loss = loss + cfg.reward_weight * parts["refl/reward_loss"]
        if cfg.reg_weight > 0:
            parts["refl/reg_loss"] = residual_regulariser(residuals, self.reference_residuals(reference_call))
            loss = loss + cfg.reg_weight * parts["refl/reg_loss"]
        if self.losses is not None:  # the structural terms, e.g. DWT_L1 (clamped x_hat) and LPIPS (docs/methods.md 1.2 step 4)
            for name, measure in self.losses.measures.items():
                parts[f"refl/{name}_loss"] = measure(x_hat, hq).mean()
                loss = loss + self.losses.weights[name] * parts[f"refl/{name}_loss"]
        parts["refl/loss"] = loss.detach()
        parts["refl/grad_step"] = torch.tensor(float(k))
        # the FRM update's rejected image is the one the reward scored (clamped as the original, RT:296)
        return ReFLOutput(loss=loss, parts={k_: v.detach() for k_, v in parts.items()}, restored=x_r.detach())


def _frm_options(config: ReFLConfig) -> tuple[str, str | None]:
    """The dynamic FRM's folder (rewards.options.frm.path, or the shipped toy FRM beside the shipped toy restorer) and
    its resize override (rewards.options.frm.resize; None: the folder's own)."""
    from facereward.weights import frm_path_or_default

    options = dict(config.rewards.options.get("frm") or {})
    extra = sorted(set(options) - {"path", "resize"})
    if extra:
        raise ValueError(f"rewards.options.frm.{extra[0]}: ReFL's frm is its dynamic FRM, which takes only path and resize")
    return frm_path_or_default(options.get("path"), config.init_from), options.get("resize")


def build_losses(config: ReFLConfig, device: torch.device, env: MeasureEnv | None = None) -> WeightedSum | None:
    """The structural terms of `config.losses` (measures, lower is better; None when every weight is 0)."""
    weights = {k: v for k, v in config.losses.weights.items() if v != 0}
    if not weights:
        return None
    spec = MeasuresConfig(weights=weights, options={k: v for k, v in config.losses.options.items() if k in weights})
    try:
        return WeightedSum.from_config(spec, as_reward=False, device=device, env=env, where="losses",
                                       require_differentiable="ReFL backpropagates its losses")
    except ValueError as err:
        if "lpips" in str(err) and "backbone_path" in str(err):
            raise ValueError(f"{err}; or --set losses.weights.lpips=0, as configs/refl_toy.yaml does") from None
        raise


def build_reward_term(config: ReFLConfig, device: torch.device, env: MeasureEnv | None = None) -> WeightedSum | None:
    """The reward term's measures other than the dynamic FRM, as a weighted sum of reward forms (None if "frm" is the
    only one). ReFL backpropagates R, so every one must be differentiable (a ValueError names one that is not)."""
    rewards = config.rewards
    others = MeasuresConfig(weights={k: v for k, v in rewards.weights.items() if k != "frm"},
                            options={k: v for k, v in rewards.options.items() if k != "frm"})
    if not others.weights:
        if others.options:
            raise ValueError(f"rewards.options.{sorted(others.options)[0]}: options for a reward without a weight")
        return None
    return WeightedSum.from_config(others, as_reward=True, device=device, env=env, where="rewards",
                                   require_differentiable="ReFL backpropagates the reward; use it in lrpo, or drop it")


def _preference_batches(config: DynamicFRMConfig, seed: int, size: int, accelerator, position: dict[str, int] | None = None):
    """An endless stream of pair batches from the original preference set (resized to `size`), from `position`; or None."""
    if not config.pairs or config.pairs_per_update <= 0:
        return None
    from facereward.data.preferences import load_pairs
    from facereward.train.frm import PairImages, _collate

    pairs = [p for p in load_pairs(config.pairs) if not p.tie]
    if not pairs:
        raise ValueError(f"{config.pairs}: no non-tie preference pairs to mix into the dynamic FRM updates")
    loader = resumable_loader(PairImages(pairs, image_size=size, random_flip=True, seed=seed), config.pairs_per_update, seed,
                              collate_fn=_collate, drop_last=len(pairs) >= config.pairs_per_update)
    return BatchStream(loader, accelerator, position)


def _validate(config: ReFLConfig) -> None:
    if config.train_steps < 1 or config.batch_size < 1:
        raise ValueError("train_steps and batch_size must be >= 1")
    if isinstance(config.eta, str) and config.eta != "random":
        raise ValueError(f"eta must be a number or 'random', got {config.eta!r}")
    dyn = config.dynamic_frm
    if dyn.every < 0:
        raise ValueError("dynamic_frm.every must be >= 0 (0: a fixed FRM)")
    if dyn.offset < 0:
        raise ValueError(f"dynamic_frm.offset must be >= 0, got {dyn.offset}")
    if dyn.reduction not in ("mean", "sum"):
        raise ValueError(f"dynamic_frm.reduction must be mean or sum, got {dyn.reduction!r}")


def frm_update_due(step: int, dyn: DynamicFRMConfig) -> bool:
    """Whether the dynamic FRM steps after generator step `step` (1-based): steps offset, offset + every, ... (>= 1)."""
    return dyn.every > 0 and step >= max(dyn.offset, 1) and (step - dyn.offset) % dyn.every == 0


def refl_workload(config: ReFLConfig, one_step: bool = False) -> Workload:
    """Per step: the rollout's forwards before the grad step (its mean over the grad window), the reference's
    forward when the regulariser is on, and one forward + backward."""
    before = 0 if one_step else config.sample_steps - (config.grad_window + 1) / 2
    return Workload(config.batch_size, before + (1 if config.reg_weight > 0 else 0), 1)


def train_refl(config: ReFLConfig) -> Path:
    """Run (or resume) ReFL; writes OUTPUT/model (restorer), OUTPUT/frm (the evolved FRM), OUTPUT/metrics.json."""
    import_plugins(config.imports, option="imports")
    _validate(config)
    run = config.run
    restorer_path = config.init_from or str(default_restorer_path())
    frm_path, frm_resize = _frm_options(config)
    toy = config.data.toy_faces > 0
    losses = build_losses(config, torch.device("cpu"), MeasureEnv("cpu", toy=toy))  # its errors before anything is loaded
    accelerator = make_accelerator(run, "refl")
    write_run_config(config, run, accelerator)
    device = accelerator.device
    restorer = load_restorer(restorer_path).to(device)
    if config.data.size != restorer.config.size:
        raise ValueError(f"data.size {config.data.size} differs from the restorer's size {restorer.config.size} ({restorer_path})")
    frm = FaceRewardModel.from_pretrained(frm_path, resize=frm_resize).to(device)
    initial_frm = copy.deepcopy(frm).requires_grad_(False).eval()  # frozen: held-out scores on a fixed scale
    trainable = prepare_trainable(restorer, config.lora, gradient_checkpointing=run.gradient_checkpointing)
    check_engine(accelerator, trainable)
    speed_up_stage2(run, accelerator, restorer, trainable, refl_workload(config, restorer.family == "one-step"), "refl")
    reference = None if has_lora(trainable) else (frozen_copy(trainable) if config.reg_weight > 0 else None)
    params = trainable_parameters(trainable)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=tuple(config.adam_betas))
    dyn = config.dynamic_frm
    if dyn.vision_unlocked_groups is not None or dyn.text_unlocked_layers is not None:
        frm.unlock_openclip_style(dyn.vision_unlocked_groups or 0, dyn.text_unlocked_layers or 0)
    frm_params = [p for p in frm.parameters() if p.requires_grad]
    frm_optimizer = (torch.optim.AdamW(frm_param_groups(frm, dyn.weight_decay), lr=dyn.lr)
                     if dyn.every > 0 and frm_params else None)
    if dyn.every > 0 and frm_optimizer is None:
        raise ValueError(f"{frm_path}: the FRM has no trainable parameters for dynamic updates (set dynamic_frm.every: 0)")
    state = resume_run(accelerator, run) or {}
    step = state.get("step", 0)
    dataset = build_dataset(config.data)
    loader = resumable_loader(dataset, config.batch_size, run.seed, num_workers=config.data.num_workers, collate_fn=collate_batch,
                              drop_last=len(dataset) >= config.batch_size)
    # Only the restorer's network goes through prepare (DeepSpeed's one-model rule): the dynamic FRM stays a plain
    # module on every process, its gradients averaged by hand (`frm_preference_step`), its optimizer saved by us.
    wrapped, optimizer, loader = accelerator.prepare(trainable, optimizer, loader)
    modules: dict[str, nn.Module] = {"stage2": wrapped, "frm": frm}
    optimizers = {"restorer": optimizer, **({"frm": frm_optimizer} if frm_optimizer else {})}
    env = MeasureEnv(device, toy=toy)
    losses = losses.to(device) if losses is not None else None
    refl_step = ReFLStep(config, restorer, frm, reference, losses, build_reward_term(config, device, env), net=wrapped)
    evaluator = None
    if config.held_out.every > 0 and accelerator.is_main_process:
        frms = {"initial": initial_frm, **({"live": frm} if frm_optimizer else {})}
        evaluator = HeldOutEvaluator(config.held_out, config.data, restorer.config.size, device, frms)
    monitor = HeldOutMonitor(config.held_out, evaluator, accelerator, "refl", "step", config.train_steps, state.get("held_out"))
    preference_batches = (_preference_batches(dyn, run.seed, restorer.config.size, accelerator, state.get("preference_data"))
                          if frm_optimizer else None)
    batches = BatchStream(loader, accelerator, data_position(state))
    log = ProgressLog(accelerator, config.train_steps, step, "refl", run.log_every, run.progress, history=state.get("train_log"))
    out_dir = Path(run.output_dir)

    def held_out(at: int) -> bool:
        """Evaluate and run the hacking alarm on the unwrapped network (no collectives from one process); True to stop."""
        stop = monitor.evaluate(at, restorer, full_network(accelerator, wrapped, trainable))
        if monitor.last:
            accelerator.log({f"held_out/{k}": v for k, v in monitor.last.items()}, step=at)
            if not run.progress:
                print(f"refl held-out step {at}: " + " ".join(f"{k}={v:.4g}" for k, v in monitor.last.items()), flush=True)
        return stop

    if step == 0 and not monitor.records:
        held_out(0)
    restore_run(accelerator, state, modules, optimizers)  # last, after every setup that draws random numbers
    # micro-batches since the run's start: each one's draws are seeded by it and its rows (docs/methods.md 4)
    micro = step * run.gradient_accumulation_steps
    # reward per compute (docs/methods.md 2.4): the run's training wall-clock, held-out evaluation and saving left out
    trained_s = log.history[-1].get("time/train_s", 0.0) if log.history else 0.0
    step_start = time.perf_counter()
    while step < config.train_steps:
        wrapped.train()
        _, batch = next(batches)
        generators, shared = _step_generators(run.seed, micro, len(batch["lq"]), accelerator)
        micro += 1
        with accelerator.accumulate(wrapped):
            if config.accumulate_last_only:
                optimizer.zero_grad(set_to_none=True)  # acts only on the sync micro-step: the earlier ones are wiped
            with accelerator.autocast():
                result = refl_step(batch, generators, shared)
            accelerator.backward(result.loss)
            if accelerator.sync_gradients and config.grad_clip > 0:
                accelerator.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        step += 1
        scalars = dict(result.parts)
        if frm_optimizer is not None and frm_update_due(step, dyn):
            scalars.update(_dynamic_frm_update(frm, frm_optimizer, dyn, batch, result.restored, preference_batches, accelerator,
                                               run.gradient_accumulation_steps))
        scalars = _mean_over_processes(scalars, accelerator)
        trained_s += time.perf_counter() - step_start
        scalars["time/train_s"] = trained_s
        monitor.add_reward(scalars["refl/reward"])
        log.step(step, scalars)
        stop = False
        if monitor.due(step):
            stop = held_out(step)
        if stop or step % run.save_every == 0 or step == config.train_steps:
            positions = {"data": batches.position(),
                         **({"preference_data": preference_batches.position()} if preference_batches is not None else {})}
            checkpoint_run(accelerator, run, step, modules, optimizers,
                           {**positions, "held_out": monitor.state(), "train_log": log.history})
        if stop:
            accelerator.print(f"refl: stopped at step {step} on the reward-hacking alarm (held_out.stop_on_hacking)")
            break
        step_start = time.perf_counter()
    log.close()
    accelerator.wait_for_everyone()
    full = full_network(accelerator, wrapped, trainable)
    if accelerator.is_main_process:
        save_restorer(restorer, out_dir / "model", net=full)
        frm.save_pretrained(out_dir / "frm")
        write_metrics(out_dir / "metrics.json", "step", monitor.records, log.history)
    accelerator.end_training()
    return out_dir / "model"


def _step_generators(seed: int, micro: int, batch: int, accelerator) -> tuple[list[torch.Generator], torch.Generator]:
    """Micro-batch `micro`'s generators: one per sample, seeded by its row in the global batch (so 1 or N processes draw
    the same), and one shared by all processes for the grad step k and a random eta."""
    rows = [accelerator.process_index * batch + i for i in range(batch)]
    device = accelerator.device
    return (row_generators(device, *(mix_seed(seed, micro, r, 1) for r in rows)),
            torch.Generator(device=device).manual_seed(mix_seed(seed, micro, 2)))


def _mean_over_processes(parts: dict[str, Tensor], accelerator) -> dict[str, Tensor]:
    """The logged numbers averaged over processes, in one collective."""
    if accelerator.num_processes == 1 or not parts:
        return dict(parts)
    stacked = accelerator.reduce(torch.stack([v.float().reshape(()).to(accelerator.device) for v in parts.values()]), "mean")
    return dict(zip(parts, stacked))


def _dynamic_frm_update(frm: FaceRewardModel, optimizer: torch.optim.Optimizer, dyn: DynamicFRMConfig, batch: dict[str, Any],
                        restored: Tensor, preference_batches, accelerator, accumulation: int = 1) -> dict[str, Tensor]:
    """GT preferred over the detached restoration as the reward scored it, plus original preference pairs if configured
    (docs/methods.md 1.2 step 6)."""
    chosen, rejected = batch["hq"], restored.to(batch["hq"].dtype)
    captions = list(batch["caption"]) if dyn.use_captions else None
    if preference_batches is not None:
        _, pref = next(preference_batches)
        chosen = torch.cat([chosen, pref["chosen"].to(chosen.device)])
        rejected = torch.cat([rejected, pref["rejected"].to(rejected.device)])
        if captions is not None:
            captions = captions + list(pref["caption"])
    reduce = accelerator.reduce if accelerator.num_processes > 1 else None
    divisor = float(accumulation) if dyn.divide_by_accumulation else 1.0
    return frm_preference_step(frm, optimizer, chosen, rejected, captions, dyn.grad_clip, reduce, dyn.loss_weight,
                               dyn.max_logit_scale, dyn.reduction, divisor)
