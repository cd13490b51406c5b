"""LRPO epoch against trl's DDPOTrainer epoch on the same tiny SD UNet + VAE, interleaved repeats in one process.

    bash benchmarks/setup_trl.sh    # once: .venv-trl with trl 0.23.1 (its DDPOTrainer) beside facereward
    .venv-trl/bin/python benchmarks/vs_trl_ddpo.py [--repeats 3] [--threads 2] [--steps 10] [--batch 4] [--samples 16]
        [--size 32] [--pairs lora full] [--cfg-off unguided|train-only] [--stepping per_timestep|per_minibatch]

What it measures: the wall time of one epoch (sample the trajectories, score them, advantages, the PPO update over
every trained step) divided by (trajectories x trained steps per trajectory): ms per trained trajectory-step, for

- trl CFG on: `DDPOTrainer.step` at trl's defaults (guidance 5.0, train_cfg True: every sampling and training UNet
  call runs uncond + cond in one doubled batch);
- trl CFG off: the same with sample_guidance_scale 1.0 and train_cfg False (trl's sampler turns CFG off for a scale
  <= 1, but its training loss doubles the batch whenever train_cfg is True, whatever the scale: both settings are
  needed to run single-batch calls). trl 0.23.1's sampler crashes at scale <= 1 on diffusers >= 0.21 (see
  `_unguided_prompts`), so this one setting runs with that one-line fix; `--cfg-off train-only` instead keeps
  guidance 5.0 in sampling (unchanged trl) and turns off only train_cfg;
- ours: `facereward.train.lrpo` (sample_epoch, assign_advantages, set_regulariser_targets, update_epoch through a
  one-process Accelerator, as benchmarks/lrpo_epoch.py), on the latent restorer the UNet and VAE come from, with
  the README's default `run.speed: auto` applied as `train_lrpo` applies it (its pick is printed).

Both sides use the UNet and VAE of `Restorer.build(RestorerConfig(mode="latent", size=32, ...))` (same config and
weights, 32 px images, 4x16x16 latents; `--size 64`: 4x32x32, where the calls are less bound by per-op overhead). trl's pipeline is a StableDiffusionPipeline folder written to a temp dir
with those, a DDIM scheduler of the same betas (set_alpha_to_one False, as SD's: with True trl's last step has
sigma 0 and its log-prob is NaN), a tiny random CLIPTextModel (hidden size = the UNet's cross_attention_dim,
context = our prompt length) and a character-level CLIPTokenizer built offline. Per denoising step our policy calls
the ControlNet + the frozen UNet (DiffBIR's layout); trl's calls the UNet (twice the batch with CFG).

Matched: denoising steps, trajectories per epoch (trl: sample_batch_size x sample_num_batches_per_epoch; ours:
group_size x inputs_per_batch x batches_per_epoch), batch (trl's sample and train batch = our micro_batch and
train_batch_size), one inner epoch, fp32. Trained: LoRA of rank 4 on to_q/to_k/to_v/to_out.0 on both (trl's
hard-coded LoRA; ours on the ControlNet), then (--pairs full) full weights (trl: the whole UNet; ours: the ControlNet).
Not changed from trl's defaults but for: mixed_precision "no" (trl's default fp16 cannot run on CPU: accelerate
refuses fp16 without a GPU), sample_num_steps / batch sizes / batches per epoch as above, log_with None, a random
reward (trl's cost is the diffusion model; ours scores wavelet + ssim as lrpo_epoch.py, with real spread so no
sample is dropped for zero advantage), its progress bar off, and `step` always called as epoch 0 (trl saves a
checkpoint after every epoch > 0 at save_freq 1; our epoch functions save nothing).
Trained steps differ by design: trl trains all T steps (train_timestep_fraction 1.0), LRPO at most T - 1 (its last
step has sigma 0), hence the per-trained-step normalisation. Optimizer steps differ too and are counted (a hook on
each optimizer): trl accumulates over a train batch's timesteps (accelerate's gradient_accumulation_steps =
train_gradient_accumulation_steps x trained steps), one AdamW step per train batch; LRPO's default per_timestep
stepping takes one per (minibatch, trained step) (--stepping per_minibatch: one per minibatch, as trl).

Repeats alternate trl CFG on, trl CFG off, ours (per --pairs), so drift lands on all; after one warm-up each.
The Accelerators share accelerate's GradientState: each side's accumulation count is set back before its epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import string
import tempfile
import time
import warnings
from pathlib import Path

import torch

from facereward.data.training_data import DataConfig, build_dataset
from facereward.models.ddim import DDIMSchedule
from facereward.models.restorer import Restorer, RestorerConfig
from facereward.measures import MeasuresConfig, WeightedSum
from facereward.train.accelerator import RunConfig, make_accelerator
from facereward.train.lrpo import (LRPOConfig, assign_advantages, check_config, lrpo_workload, sample_epoch,
                                   set_regulariser_targets, update_epoch)
from facereward.train.speed import speed_up_stage2
from facereward.train.trainable import LoraSettings, prepare_trainable, trainable_parameters

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # trl's DefaultDDPOStableDiffusionPipeline.get_trainable_layers


def _restorer(size: int) -> Restorer:
    torch.manual_seed(0)
    return Restorer.build(RestorerConfig(mode="latent", size=size, cleaner_kwargs={"channels": 8, "num_blocks": 1, "downscale": 2}))


def _set_accumulation(steps: int) -> None:
    """accelerate's GradientState is one per process, shared by every Accelerator: the last one built sets its count."""
    from accelerate.state import GradientState

    state = GradientState()
    state.plugin_kwargs = {**state.plugin_kwargs, "num_steps": steps}


def _count_steps(optimizer: torch.optim.Optimizer) -> list[int]:
    count = [0]
    optimizer.register_step_post_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def write_sd_folder(restorer: Restorer, folder: Path) -> None:
    """A diffusers StableDiffusionPipeline folder with the restorer's UNet and VAE (config and weights), offline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    context = restorer.prompt_embeds.shape[1]
    chars = [*string.ascii_lowercase, ".", "-"]  # a character-level CLIP BPE vocabulary, as tests/test_clipiqa.py
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f"{c}</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    files = folder.parent / "tokenizer-files"
    files.mkdir()
    (files / "vocab.json").write_text(json.dumps(vocab))
    (files / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=context)
    n = len(vocab)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=n, hidden_size=restorer.unet.config.cross_attention_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=context, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1))
    unet = UNet2DConditionModel.from_config(restorer.unet.config)
    unet.load_state_dict(restorer.unet.state_dict())
    vae = AutoencoderKL.from_config(restorer.vae.config)
    vae.load_state_dict(restorer.vae.state_dict())
    scheduler = DDIMScheduler.from_config(restorer.scheduler.config, set_alpha_to_one=False)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)


def _unguided_prompts(pipe) -> None:
    """Make trl's sampler run at guidance <= 1: the one change to what trl runs (--cfg-off unguided).

    trl's `pipeline_step` always passes `negative_prompt_embeds` and calls diffusers' deprecated `_encode_prompt`,
    which since diffusers 0.21 concatenates [negative, prompt] whether or not CFG is on: without CFG the UNet then
    gets 2B text rows for B latents and fails. This keeps the prompt half when CFG is off, as `_encode_prompt` did
    before 0.21; nothing else changes (one UNet call on B rows per step, as trl's sampler intends for scale <= 1).
    """
    original = pipe._encode_prompt

    def encode(prompt, device, num_images_per_prompt, do_classifier_free_guidance, *args, **kwargs):
        embeds = original(prompt, device, num_images_per_prompt, do_classifier_free_guidance, *args, **kwargs)
        return embeds if do_classifier_free_guidance else embeds[embeds.shape[0] // 2:]

    pipe._encode_prompt = encode


class TrlSide:
    def __init__(self, folder: Path, args: argparse.Namespace, cfg: bool, lora: bool):
        from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

        self.name = f"trl CFG {'on' if cfg else 'off'}"
        config = DDPOConfig(sample_num_steps=args.steps, sample_batch_size=args.batch, train_batch_size=args.batch,
                            sample_num_batches_per_epoch=args.samples // args.batch, num_epochs=1, mixed_precision="no",
                            log_with=None, train_timestep_fraction=1.0, logdir=str(folder.parent / "trl-logs"))
        if not cfg:
            config.train_cfg = False
            if args.cfg_off == "unguided":
                config.sample_guidance_scale = 1.0
        self.config = config
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipeline = DefaultDDPOStableDiffusionPipeline(str(folder), use_lora=lora)
            if not cfg and args.cfg_off == "unguided":
                _unguided_prompts(pipeline.sd_pipeline)
            generator = torch.Generator().manual_seed(1)
            self.trainer = DDPOTrainer(config, lambda images, prompts, meta: (torch.randn(len(images), generator=generator), {}),
                                       lambda: ("a face", {}), pipeline)
        self.trainer.sd_pipeline.set_progress_bar_config(disable=True)
        self.accumulation = self.trainer.accelerator.gradient_state.num_steps
        self.opt_steps = _count_steps(self.trainer.optimizer.optimizer)
        unet = self.trainer.sd_pipeline.unet
        self.trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        latent = self.trainer.sd_pipeline.sd_pipeline
        self.size = unet.config.sample_size * latent.vae_scale_factor
        self.latent = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        self.trajectories = config.sample_batch_size * config.sample_num_batches_per_epoch
        self.trained_steps = self.trainer.num_train_timesteps
        guided = config.sample_guidance_scale > 1.0
        self.call = (f"UNet on {2 * args.batch if guided else args.batch} rows sampling, "
                     f"{2 * args.batch if config.train_cfg else args.batch} training")
        self.global_step = 0

    def run(self) -> tuple[float, int]:
        _set_accumulation(self.accumulation)
        before = self.opt_steps[0]
        start = time.perf_counter()
        self.global_step = self.trainer.step(0, self.global_step)
        return time.perf_counter() - start, self.opt_steps[0] - before


class OurSide:
    name = "ours (LRPO)"

    def __init__(self, args: argparse.Namespace, lora: bool):
        group, inputs = args.group_size, 2
        if args.samples % (group * inputs) or args.samples % args.batch:
            raise SystemExit(f"--samples {args.samples} must be a multiple of group_size x 2 inputs = {group * inputs} "
                             f"and of --batch {args.batch}")
        self.config = config = LRPOConfig(
            run=RunConfig(output_dir=tempfile.mkdtemp(), progress=False), data=DataConfig(toy_faces=16, size=args.size),
            group_size=group, inputs_per_batch=inputs, batches_per_epoch=args.samples // (group * inputs), sample_steps=args.steps,
            micro_batch=args.batch, train_batch_size=args.batch, reg_steps=2, lr=1e-6, stepping=args.stepping)
        config.rewards = MeasuresConfig(weights={"wavelet": 0.5, "ssim": 0.5})
        self.n_train = check_config(config)
        self.accelerator = make_accelerator(config.run, "bench")
        self.restorer = _restorer(args.size)
        module = prepare_trainable(self.restorer, LoraSettings(rank=args.lora_rank, target_modules=list(LORA_TARGETS))
                                   if lora else LoraSettings())
        self.trainable = sum(p.numel() for p in trainable_parameters(module))
        # the README's default run.speed: auto, as train_lrpo applies it (prints what it picked)
        self.speed = speed_up_stage2(config.run, self.accelerator, self.restorer, module, lrpo_workload(config, self.n_train),
                                     "lrpo")
        optimizer = torch.optim.AdamW(trainable_parameters(module), lr=config.lr, weight_decay=config.weight_decay)
        self.opt_steps = _count_steps(optimizer)
        self.net, self.optimizer = self.accelerator.prepare(module, optimizer)
        self.reward = WeightedSum.from_config(config.rewards, device=self.accelerator.device)
        self.dataset = build_dataset(config.data)
        self.schedule = DDIMSchedule.from_scheduler(self.restorer.scheduler, config.sample_steps)
        self.trajectories = config.batches_per_epoch * config.inputs_per_batch * config.group_size
        self.trained_steps = self.n_train
        self.size = args.size
        self.latent = tuple(self.restorer.latent_shape(1, args.size, args.size)[1:])
        self.call = f"ControlNet + UNet on {args.batch} rows"
        self.epoch = 0
        self.kept: list[int] = []

    def run(self) -> tuple[float, int]:
        _set_accumulation(1)
        c, before = self.config, self.opt_steps[0]
        start = time.perf_counter()
        buffer, scores = sample_epoch(self.restorer, self.dataset, self.schedule, c, self.n_train, self.reward,
                                      self.accelerator, self.epoch, self.net)
        assign_advantages(buffer, scores["reward"], c, self.n_train, self.accelerator, self.epoch)
        set_regulariser_targets(buffer, self.schedule, c, self.n_train, self.epoch)
        update_epoch(self.restorer, self.net, self.optimizer, buffer, self.schedule, c, self.n_train, None,
                     self.accelerator, self.epoch)
        seconds = time.perf_counter() - start
        self.kept.append(int(buffer.keep.sum()))
        self.epoch += 1
        return seconds, self.opt_steps[0] - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps T (both sides)")
    parser.add_argument("--size", type=int, default=32, help="image size in px (latents are size / 2: the tiny VAE)")
    parser.add_argument("--batch", type=int, default=4, help="trl sample/train batch = our micro_batch/train_batch_size")
    parser.add_argument("--samples", type=int, default=16, help="trajectories per epoch (both sides)")
    parser.add_argument("--group-size", type=int, default=4, help="ours: G (2 inputs per batch)")
    parser.add_argument("--lora-rank", type=int, default=4, help="ours with LoRA (trl's is fixed at 4)")
    parser.add_argument("--stepping", default="per_timestep", choices=["per_timestep", "per_minibatch"], help="ours")
    parser.add_argument("--cfg-off", default="unguided", choices=["unguided", "train-only"],
                        help="trl CFG off: guidance 1.0 + train_cfg False (needs the _unguided_prompts fix), or "
                             "train_cfg False only (sampling keeps guidance 5.0, unchanged trl)")
    parser.add_argument("--pairs", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    args = parser.parse_args()
    if args.lora_rank < 1:
        parser.error("--lora-rank must be >= 1")
    torch.set_num_threads(args.threads)
    import logging

    import diffusers
    import transformers
    from accelerate import PartialState

    for lib in (diffusers, transformers):  # the folder's save/load bars and per-load notes
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    logging.getLogger("trl").setLevel(logging.ERROR)  # "no LoRA weights found", "no image_samples_hook"
    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' _encode_prompt deprecation, per call

    PartialState()  # trl's pipeline logs through accelerate's logger, which raises before any accelerate state exists
    tmp = Path(tempfile.mkdtemp())
    folder = tmp / "sd"
    write_sd_folder(_restorer(args.size), folder)
    sides = {kind: [TrlSide(folder, args, True, kind == "lora"), TrlSide(folder, args, False, kind == "lora"),
                    OurSide(args, kind == "lora")] for kind in args.pairs}
    print(f"{args.size} px, T={args.steps}, batch {args.batch}, {args.samples} trajectories/epoch, {args.threads} threads, fp32, "
          f"ours stepping {args.stepping}, trl CFG off = {args.cfg_off}")
    for kind, group in sides.items():
        print(f"\n[{kind}] side         image latent     traj  trained/traj  opt steps/epoch  trainable  per-step call")
        for side in group:
            seconds, steps = side.run()  # warm-up
            print(f"[{kind}] {side.name:12s} {side.size:3d}px {'x'.join(map(str, side.latent)):9s} {side.trajectories:5d}"
                  f"  {side.trained_steps:12d}  {steps:15d}  {side.trainable:9d}  {side.call}  (warm-up {seconds:.2f} s)",
                  flush=True)
    print()
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.repeats):
        for kind, group in sides.items():
            line = []
            for side in group:
                seconds, _ = side.run()
                ms = 1000 * seconds / (side.trajectories * side.trained_steps)
                times.setdefault((kind, side.name), []).append(ms)
                line.append(f"{side.name} {seconds:.2f} s = {ms:.2f} ms")
            print(f"  repeat {r + 1} [{kind}]: " + ", ".join(line), flush=True)
    for kind, group in sides.items():
        kept = group[2].kept
        if min(kept) < group[2].trajectories:
            print(f"note [{kind}]: ours dropped zero-advantage samples (kept {min(kept)}..{max(kept)})")
    print(f"\nms per trained trajectory-step (median of {args.repeats}; epoch wall / (trajectories x trained steps)):")
    print("  pair  trl CFG on  trl CFG off  ours    ours/trl-on (min med max)   ours/trl-off (min med max)")
    for kind in sides:
        on, off, ours = (times[(kind, n)] for n in ("trl CFG on", "trl CFG off", "ours (LRPO)"))
        r_on = [o / t for o, t in zip(ours, on)]
        r_off = [o / t for o, t in zip(ours, off)]
        fmt = lambda v: f"{min(v):.2f} {statistics.median(v):.2f} {max(v):.2f}"  # noqa: E731
        print(f"  {kind:4s}  {statistics.median(on):10.2f}  {statistics.median(off):11.2f}  {statistics.median(ours):5.2f}"
              f"   {fmt(r_on):24s}   {fmt(r_off)}")
    for group in sides.values():
        group[2].accelerator.end_training()


if __name__ == "__main__":
    main()
