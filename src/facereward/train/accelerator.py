"""The run's Accelerator and what touches its engine: RunConfig, make_accelerator, micro_step, and the
FSDP/DeepSpeed checks and gather every trainer makes (check_engine, set_deepspeed_micro_batch, full_network)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

SPEED_MODES = ("auto", "off")


@dataclass
class RunConfig:
    """Fields every trainer has (embedded as `run` in each trainer's config)."""

    output_dir: str = "runs/train"
    seed: int = 0
    mixed_precision: str | None = None  # "no", "bf16" or "fp16", through accelerate; unset: the launcher's, else "no"
    speed: str = "auto"  # "auto": bf16 autocast and channels_last where measured faster (train/speed.py); "off"
    channels_last: bool | None = None  # the trained network's memory layout; unset: speed decides (off: contiguous)
    compile: bool = False  # torch.compile the networks a step calls (slow to start: minutes on CPU)
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False  # recompute the trained network's activations in backward (refl, lrpo): less memory
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None  # None, "latest", "auto" (latest, or a fresh start if none) or a checkpoint folder
    cpu: bool = False  # force CPU even where a GPU exists (and enable gloo for multi-process CPU runs)
    progress: bool = True


def make_accelerator(run: RunConfig, project_name: str) -> Accelerator:
    """An Accelerator logging to TensorBoard under OUTPUT/logs, seeded per process.

    `run.mixed_precision` unset takes the launcher's (`accelerate launch --config_file ...`, e.g. configs/accelerate/),
    else "no"; set, it wins, and a launcher that says otherwise is named in one line.
    """
    if run.mixed_precision not in (None, "no", "bf16", "fp16"):
        raise ValueError(f"run.mixed_precision must be 'no', 'bf16' or 'fp16', got {run.mixed_precision!r}")
    if run.speed not in SPEED_MODES:
        raise ValueError(f"run.speed must be one of {', '.join(SPEED_MODES)}, got {run.speed!r}")
    if run.channels_last not in (None, True, False) or run.compile not in (True, False):
        raise ValueError("run.channels_last must be true, false or unset, and run.compile true or false")
    if run.gradient_accumulation_steps < 1:
        raise ValueError("run.gradient_accumulation_steps must be >= 1")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if run.mixed_precision and launcher and launcher != run.mixed_precision and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: run.mixed_precision {run.mixed_precision!r} overrides the launcher's {launcher!r}", file=sys.stderr)
    if (run.mixed_precision or launcher) == "fp16" and (run.cpu or not torch.cuda.is_available()):
        raise ValueError("run.mixed_precision: fp16 needs a GPU (accelerate has no fp16 autocast or loss scaling on CPU, "
                         "the run would silently train in fp32); use bf16 or no")
    on_cpu = world_size > 1 and not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if on_cpu and deepspeed:
        # DeepSpeed on several CPU processes: accelerate sets no backend there, so each process would think it is alone
        from accelerate import PartialState

        PartialState(backend="gloo")
    # Without cpu=True, several CPU processes each start as a lone process and silently train apart
    # (but cpu=True turns DeepSpeed off, so not with it).
    cpu = run.cpu or (on_cpu and not deepspeed)
    mixed_precision = run.mixed_precision or launcher or "no"
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision") not in (None, mixed_precision):
        # an earlier run in this process had its precision switched by run.speed (train/speed.py); accelerate's shared
        # state would refuse a new precision, and this run is a new choice
        AcceleratorState._shared_state["_mixed_precision"] = mixed_precision
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        log_with="tensorboard",
        project_dir=run.output_dir,
        cpu=cpu,
    )
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"launched {world_size} processes but accelerate joined {accelerator.num_processes}: they would train apart; "
            "check the accelerate launch settings (on CPU use --multi_gpu with run.cpu=true)"
        )
    accelerator.init_trackers(project_name)
    set_seed(run.seed, device_specific=True)
    return accelerator


@contextlib.contextmanager
def micro_step(accelerator: Accelerator, model: nn.Module, sync: bool) -> Iterator[None]:
    """One backward of the several that make an optimizer step: gradients are synchronised over processes (and
    DeepSpeed's engine steps) only when `sync`, on the step's last backward.

    `accelerator.accumulate` counts a fixed number of micro-steps; LRPO's vary per step (docs/methods.md 2.3), so
    this sets accelerate's sync flag itself, as `accumulate` does.
    """
    accelerator.gradient_state._set_sync_gradients(sync)
    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
        yield
    if not sync:
        accelerator.gradient_state._set_sync_gradients(True)


def _unwrap_model(module: nn.Module) -> nn.Module:
    """The module inside a DDP (or compile) wrapper; itself otherwise."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(module)


def engine_of(accelerator: Accelerator) -> str | None:
    """"fsdp" or "deepspeed" when an engine shards or owns the prepared state, else None (one process or DDP)."""
    from accelerate.utils import DistributedType

    return {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(accelerator.distributed_type)


def sharded_weights(accelerator: Accelerator) -> bool:
    """Whether the prepared weights are split over processes (FSDP, DeepSpeed ZeRO-3)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    engine = engine_of(accelerator)
    return engine == "fsdp" or (engine == "deepspeed" and plugin is not None and plugin.zero_stage == 3)


def set_deepspeed_micro_batch(accelerator: Accelerator, size: int) -> None:
    """Give DeepSpeed the per-process micro-batch its config leaves "auto" (accelerate reads it from a prepared
    dataloader, and LRPO prepares none; DeepSpeed only logs it: the trainer batches itself)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = size


def check_engine(accelerator: Accelerator, module: nn.Module) -> None:
    """Refuse what the engine cannot do with `module` before training starts: LoRA under FSDP or ZeRO-3 (the
    reference is the LoRA-free network in place, which sharding hides)."""
    if sharded_weights(accelerator) and any("lora_" in name for name, _ in module.named_parameters()):
        raise ValueError("LoRA training under FSDP or DeepSpeed ZeRO-3 is not supported (LoRA weights are small: use "
                         "DDP or ZeRO-2, configs/accelerate/ddp.yaml or deepspeed_zero2_offload.yaml)")


def full_network(accelerator: Accelerator, wrapped: nn.Module, module: nn.Module) -> nn.Module | None:
    """The trained network with all its weights, for held-out evaluation and the final save; call it on every process.

    Under DDP and DeepSpeed ZeRO-1/2 every process holds the full weights, so that is `module` (the unwrapped
    network) itself. Under FSDP and ZeRO-3 the weights are sharded: they are gathered (`get_state_dict`, a collective)
    into a copy of `module` on the main process; the other processes get None.
    """
    if not sharded_weights(accelerator):
        return module
    check_engine(accelerator, module)
    state = accelerator.get_state_dict(wrapped)
    if not accelerator.is_main_process:
        return None
    plain = _unwrap_model(module)
    if not (hasattr(plain, "config") and hasattr(type(plain), "from_config")):
        raise ValueError(f"cannot rebuild a {type(plain).__name__} to gather its sharded weights into")
    gathered = type(plain).from_config(plain.config)
    gathered.load_state_dict(state)
    return gathered.to(accelerator.device).eval()
