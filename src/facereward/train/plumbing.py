"""What every trainer shares: accelerate setup, TensorBoard logging, progress, atomic checkpoints, resume.

A checkpoint is a folder `OUTPUT/checkpoints/step-XXXXXXXX/` holding `NAME.safetensors` per module,
`NAME.optim.pt` per optimizer that was not prepared and accelerate's `optimizer*.bin` for the prepared ones
(plain tensors and numbers, read back with weights_only=True), `rng-RANK.safetensors` per process and
`state.json`; under FSDP or DeepSpeed the prepared model and optimizer are the engine's own files from
`accelerator.save_state`. It is written under a temporary name and renamed into place, and
`OUTPUT/checkpoints/latest` names the newest complete one, so a crash never leaves a torn checkpoint
behind. Resuming still checks each file (a disk can fill or a copy stop short) and falls back to the
previous valid checkpoint. The trainers make two calls: `resume_run` (which checkpoint, its state) before
setup and `restore_run` (load it all) after `prepare`, just before the first step.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from facereward.config import save_config


SPEED_MODES = ("auto", "off")


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not match the run; one line naming it."""


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


def write_run_config(config: Any, run: RunConfig, accelerator: Accelerator) -> None:
    """Save the full config as OUTPUT/config.yaml (main process only)."""
    if accelerator.is_main_process:
        Path(run.output_dir).mkdir(parents=True, exist_ok=True)
        save_config(config, Path(run.output_dir) / "config.yaml")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    state: dict[str, Any],
    keep: int = 2,
    generators: dict[str, torch.Generator] | None = None,
) -> Path:
    """Write checkpoint `step` of a single process atomically and prune all but the newest `keep`; returns its folder."""
    tmp = _fresh_temp(output_dir, step)
    save_file(rng_state(generators), tmp / "rng-0.safetensors")
    return _publish(output_dir, step, tmp, modules, optimizers, state, keep)


def _fresh_temp(output_dir: str | Path, step: int) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _publish(output_dir: str | Path, step: int, tmp: Path, modules: dict[str, nn.Module],
             optimizers: dict[str, torch.optim.Optimizer], state: dict[str, Any], keep: int) -> Path:
    """Add our own files (modules, optimizers, state.json) to `tmp`, fsync, rename it into place, point `latest` at it, prune."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    for name, module in modules.items():
        save_file(_plain_state_dict(module), tmp / f"{name}.safetensors")
    for name, optimizer in optimizers.items():
        torch.save(optimizer.state_dict(), tmp / f"{name}.optim.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / "latest")
    # Only folders up to this step: newer ones (a corrupt one a fresh start skipped) must not crowd this one out.
    older = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name <= final.name)
    for old in older[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in _unwrap_model(module).state_dict().items()}


def _unwrap_model(module: nn.Module) -> nn.Module:
    """The module inside a DDP (or compile) wrapper; itself otherwise."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(module)


def _unwrap_optimizer(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer holds the torch one


def engine_of(accelerator: Accelerator) -> str | None:
    """"fsdp" or "deepspeed" when an engine shards or owns the prepared state, else None (one process or DDP)."""
    from accelerate.utils import DistributedType

    return {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(accelerator.distributed_type)


def _sharded(accelerator: Accelerator) -> bool:
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
    if _sharded(accelerator) and any("lora_" in name for name, _ in module.named_parameters()):
        raise ValueError("LoRA training under FSDP or DeepSpeed ZeRO-3 is not supported (LoRA weights are small: use "
                         "DDP or ZeRO-2, configs/accelerate/ddp.yaml or deepspeed_zero2_offload.yaml)")


def full_network(accelerator: Accelerator, wrapped: nn.Module, module: nn.Module) -> nn.Module | None:
    """The trained network with all its weights, for held-out evaluation and the final save; call it on every process.

    Under DDP and DeepSpeed ZeRO-1/2 every process holds the full weights, so that is `module` (the unwrapped
    network) itself. Under FSDP and ZeRO-3 the weights are sharded: they are gathered (`get_state_dict`, a collective)
    into a copy of `module` on the main process; the other processes get None.
    """
    if not _sharded(accelerator):
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


def _prepared_names(accelerator: Accelerator, modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer]) -> tuple[list[str], list[str]]:
    """The names (keys of `modules`, `optimizers`) of what went through `accelerator.prepare`, in accelerate's order."""
    by_module = {id(_unwrap_model(m)): name for name, m in modules.items()}
    by_optimizer = {id(_unwrap_optimizer(o)): name for name, o in optimizers.items()}
    models = [by_module.get(id(_unwrap_model(m))) for m in accelerator._models]
    opts = [by_optimizer.get(id(_unwrap_optimizer(o))) for o in accelerator._optimizers]
    if None in models or None in opts:
        raise ValueError("checkpoint: a prepared model or optimizer has no name in the checkpoint's modules/optimizers")
    return models, opts


def checkpoint_run(
    accelerator: Accelerator,
    run: RunConfig,
    step: int,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    state: dict[str, Any],
    generators: dict[str, torch.Generator] | None = None,
) -> None:
    """Save checkpoint `step`; every process calls it. Atomic: written into a temp folder that is renamed into place.

    What went through `accelerator.prepare` is saved by `accelerator.save_state` (each process's shards under
    FSDP or DeepSpeed; without an engine a hook writes each prepared model as `NAME.safetensors`, the layout
    `load_checkpoint` reads). The other modules and optimizers are written by the main process as
    `NAME.safetensors` / `NAME.optim.pt`, and every process writes its RNG states to `rng-RANK.safetensors`.
    """
    accelerator.wait_for_everyone()
    root = checkpoint_root(run.output_dir)
    tmp = _fresh_temp(run.output_dir, step) if accelerator.is_main_process else root / f".tmp-step-{step:08d}"
    accelerator.wait_for_everyone()
    prepared_models, prepared_optimizers = _prepared_names(accelerator, modules, optimizers)

    def write_prepared_models(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        if weights:  # no engine: write them in our layout (plain keys, named), and let accelerate skip its model.safetensors
            if accelerator.is_main_process:
                for name, model in zip(prepared_models, models):
                    save_file(_plain_state_dict(model), Path(output_dir) / f"{name}.safetensors")
            weights.clear()

    handle = accelerator.register_save_state_pre_hook(write_prepared_models)
    try:
        accelerator.save_state(str(tmp))
    finally:
        handle.remove()
    save_file(rng_state(generators), tmp / f"rng-{accelerator.process_index}.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        own_modules = {k: m for k, m in modules.items() if k not in prepared_models}
        own_optimizers = {k: _unwrap_optimizer(o) for k, o in optimizers.items() if k not in prepared_optimizers}
        full_state = {**state, "num_processes": accelerator.num_processes,
                      "accelerate": {"engine": engine_of(accelerator), "models": prepared_models, "optimizers": prepared_optimizers}}
        _publish(run.output_dir, step, tmp, own_modules, own_optimizers, full_state, run.keep_checkpoints)
    accelerator.wait_for_everyone()


def find_checkpoint(output_dir: str | Path, resume: str, report: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint folder `resume` names; None only for "auto" with no valid checkpoint (start fresh).

    "latest" and "auto" try the one OUTPUT/checkpoints/latest names, then the other step-* folders newest first,
    and take the first valid one (`checkpoint_problem`); the corrupt ones skipped are named in one warning line
    given to `report` (default: stderr). "latest" with none valid is a CheckpointError, "auto" a fresh start,
    reported too. Any other value is a folder, which must be a valid checkpoint (CheckpointError naming the file).
    """
    report = report or _to_stderr
    if resume not in ("latest", "auto"):
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise CheckpointError(f"{path}: not a facereward checkpoint (no state.json)")
        if problem := checkpoint_problem(path):
            raise CheckpointError(f"{path}: {problem}")
        return path
    root = checkpoint_root(output_dir)
    skipped = []
    for path in _resume_candidates(root):
        if not (problem := checkpoint_problem(path)):
            if skipped:
                report(f"warning: {'; '.join(skipped)}; using {path.name}")
            elif resume == "auto":
                report(f"run.resume auto: resuming from {path}")
            return path
        skipped.append(f"{path}: {problem}")
    if resume == "latest":
        raise CheckpointError(f"{root}: no {'valid ' if skipped else ''}checkpoint to resume from" +
                              (f" ({'; '.join(skipped)})" if skipped else ""))
    report(f"warning: {'; '.join(skipped)}; starting fresh" if skipped
           else f"run.resume auto: no checkpoint in {root}; starting fresh")
    return None


def _resume_candidates(root: Path) -> list[Path]:
    """The step-* folders of `root`: the one `root/latest` names first, then the others newest first."""
    folders = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    pointer = root / "latest"
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    return ([named] if named in folders else []) + [p for p in folders if p != named]


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from ("truncated model.safetensors"), or None when it is valid.

    Valid: state.json parses to an object with a step, every *.safetensors opens with safetensors (its header
    and length, no tensor read) and every *.optim.pt and accelerate optimizer*.bin loads with torch.load(weights_only=True) memory-mapped.
    """
    try:
        state = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        return "no state.json"
    except (OSError, ValueError):
        return "unreadable state.json"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "state.json has no step"
    for file in sorted(path.glob("*.safetensors")):
        if problem := _weights_problem(file):
            return problem
    for file in sorted([*path.glob("*.optim.pt"), *path.glob("optimizer*.bin")]):
        if problem := _optimizer_problem(file):
            return problem
    if not (path / "rng.safetensors").is_file():  # (one file for all before per-process RNG states)
        missing = [i for i in range(int(state.get("num_processes", 1))) if not (path / f"rng-{i}.safetensors").is_file()]
        if missing:
            return f"no rng-{missing[0]}.safetensors"
    return None


def _weights_problem(file: Path) -> str | None:
    """None if `file` opens as safetensors (which checks the data the header describes is all there)."""
    try:
        with safe_open(str(file), framework="pt"):
            return None
    except (SafetensorError, OSError) as err:
        return f"truncated {file.name}" if _shorter_than_its_header(file) else f"corrupt {file.name} ({_first_line(err)})"


def _shorter_than_its_header(file: Path) -> bool:
    """Whether a safetensors file ends before the header and data its first bytes announce (a write cut short)."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            return True
        header_len = int.from_bytes(prefix, "little")
        if size < 8 + header_len:
            return True
        try:
            header = json.loads(fh.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return False
    return size < 8 + header_len + end


def _optimizer_problem(file: Path) -> str | None:
    """None if `file` loads with torch.load(weights_only=True); mmap keeps the check from reading the tensors."""
    try:
        torch.load(file, weights_only=True, mmap=True, map_location="cpu")
        return None
    except Exception as err:  # torch.load raises RuntimeError, OSError, EOFError or UnpicklingError for a bad file
        return f"corrupt {file.name} ({_first_line(err)})"


def _first_line(err: BaseException) -> str:
    """An error's message cut to its first line and sentence (torch's zip errors run on for lines)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.split(". ")[0].rstrip(".")


def remove_orphaned_temps(output_dir: str | Path) -> list[Path]:
    """Delete the `.tmp-step-*` folders and `.latest.tmp` a save killed midway leaves; returns what it removed."""
    root = checkpoint_root(output_dir)
    orphans = [p for p in (*root.glob(".tmp-step-*"), root / ".latest.tmp") if p.exists()]
    for orphan in orphans:
        shutil.rmtree(orphan, ignore_errors=True) if orphan.is_dir() else orphan.unlink(missing_ok=True)
    return orphans


def resume_run(accelerator: Accelerator, run: RunConfig) -> dict[str, Any] | None:
    """Start or resume a trainer's run: the first of the two calls every trainer makes (`restore_run` is the second).

    Removes orphaned temporary checkpoint files (main process), then, if `run.resume` asks, returns the state.json
    of the checkpoint `find_checkpoint` picks, plus {"checkpoint": its folder}; None means start from step 0.
    Nothing is loaded yet. A checkpoint written by a different number of processes is a CheckpointError.
    """
    if accelerator.is_main_process:
        remove_orphaned_temps(run.output_dir)
    if not run.resume:
        return None
    report = _to_stderr if accelerator.is_main_process else (lambda line: None)
    path = find_checkpoint(run.output_dir, run.resume, report)
    if path is None:
        return None
    state = _read_state(path)
    check_num_processes(state, accelerator.num_processes, path)
    return {**state, "checkpoint": str(path)}


def restore_run(
    accelerator: Accelerator,
    state: dict[str, Any] | None,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator] | None = None,
) -> None:
    """Load the checkpoint `resume_run` found into `modules`, `optimizers` and the RNGs; nothing for a fresh run.

    Call it after `accelerator.prepare` and every other setup that draws random numbers, just before the first
    step, so the resumed run draws what the uninterrupted one drew. Without an engine everything is read by name
    (`load_checkpoint`), so what is prepared may differ from the saving run (train-base prepares one stage at a
    time); under FSDP or DeepSpeed `accelerator.load_state` restores the prepared state, which must be the same
    models and optimizers the checkpoint holds.
    """
    if not state or "checkpoint" not in state:
        return
    path = Path(state["checkpoint"])
    saved = state.get("accelerate") or {"engine": None, "models": [], "optimizers": []}
    engine = engine_of(accelerator)
    if engine or saved["engine"]:
        if saved["engine"] != engine:
            raise CheckpointError(f"run.resume: {path} was saved under {saved['engine'] or 'no engine'}, this run uses "
                                  f"{engine or 'none'} (resume with the same accelerate config)")
        now = _prepared_names(accelerator, modules, optimizers)
        if [saved["models"], saved["optimizers"]] != list(now):
            raise CheckpointError(f"run.resume: {path} holds the prepared {saved['models']} / {saved['optimizers']}, "
                                  f"this run prepared {now[0]} / {now[1]}")
        accelerator.load_state(str(path))
        modules = {k: m for k, m in modules.items() if k not in saved["models"]}
        optimizers = {k: o for k, o in optimizers.items() if k not in saved["optimizers"]}
    load_checkpoint(path, modules, optimizers)
    restore_rng(state, generators, accelerator.process_index)


def check_num_processes(state: dict[str, Any], num_processes: int, path: Path) -> None:
    """Raise a CheckpointError when checkpoint `path` (its `state`) ran on a different number of processes."""
    saved = state.get("num_processes", num_processes)
    if saved != num_processes:
        raise CheckpointError(f"run.resume: {path} ran on {saved} processes, this run on {num_processes} "
                              "(resume with the same number of processes)")


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a facereward checkpoint (no state.json)") from None
    except (OSError, ValueError):
        raise CheckpointError(f"{path}: unreadable state.json") from None


def load_checkpoint(
    path: Path,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
) -> dict[str, Any]:
    """Restore modules and optimizers from `path` by name; returns its state.json plus {"checkpoint": path}.

    A module is read from `NAME.safetensors`; an optimizer from `NAME.optim.pt`, or from the `optimizer*.bin`
    accelerate wrote for it when it was prepared. The RNG states are put back separately (`restore_rng`).
    A missing, corrupt or unfitting file is a one-line CheckpointError naming it.
    """
    state = _read_state(path)
    prepared = (state.get("accelerate") or {}).get("optimizers", [])
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{path}: no weights for {name!r} ({file.name} missing)")
        try:
            _unwrap_model(module).load_state_dict(_read_weights(file))
        except RuntimeError as err:
            raise CheckpointError(f"{file}: does not fit the model ({str(err).splitlines()[0]})") from None
    for name, optimizer in optimizers.items():
        file = path / f"{name}.optim.pt"
        if not file.is_file() and name in prepared:
            i = prepared.index(name)
            file = path / ("optimizer.bin" if i == 0 else f"optimizer_{i}.bin")
        if not file.is_file():
            raise CheckpointError(f"{path}: no optimizer state for {name!r} ({file.name} missing)")
        try:
            saved = torch.load(file, weights_only=True, map_location="cpu")
        except Exception:  # see _optimizer_problem
            raise CheckpointError(f"{path}: {_optimizer_problem(file) or f'corrupt {file.name}'}") from None
        try:
            _unwrap_optimizer(optimizer).load_state_dict(saved)
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{file}: does not fit the optimizer ({_first_line(err)})") from None
    return {**state, "checkpoint": str(path)}


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors to save: torch's CPU and every CUDA device's, numpy's and Python's
    global generators, and each named generator's."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    out["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    out["numpy/extra"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    out["numpy/gauss"] = torch.tensor([gauss], dtype=torch.float64)
    version, internal, _ = random.getstate()
    out["python"] = torch.tensor([version, *internal], dtype=torch.int64)
    for name, generator in (generators or {}).items():
        out[f"generator/{name}"] = generator.get_state()
    return out


def restore_rng(state: dict[str, Any] | None, generators: dict[str, torch.Generator] | None = None, rank: int = 0) -> None:
    """Put back process `rank`'s RNG states from the checkpoint `state` came from; nothing for a fresh run.

    `restore_run` calls it last; a checkpoint from before per-process RNG files falls back to its one `rng.safetensors`.
    """
    if not state or "checkpoint" not in state:
        return
    folder = Path(state["checkpoint"])
    file = folder / f"rng-{rank}.safetensors"
    if not file.is_file() and rank == 0:
        file = folder / "rng.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{folder}: no random state for process {rank} ({file.name} missing)")
    saved = _read_weights(file)
    torch.set_rng_state(saved["torch"])
    cuda = [saved[k] for k in sorted((k for k in saved if k.startswith("cuda/")), key=lambda k: int(k.split("/")[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    elif "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])
    if "numpy" in saved:
        pos, has_gauss = saved["numpy/extra"].tolist()
        np.random.set_state(("MT19937", saved["numpy"].numpy().astype(np.uint32), pos, has_gauss, float(saved["numpy/gauss"][0])))
    if "python" in saved:
        values = saved["python"].tolist()
        random.setstate((values[0], tuple(values[1:]), None))
    for name, generator in (generators or {}).items():
        if f"generator/{name}" not in saved:
            raise CheckpointError(f"{file}: no state for the random generator {name!r} (a checkpoint of another trainer?)")
        generator.set_state(saved[f"generator/{name}"].to(generator.get_state().device))


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """load_file, with a corrupt file a one-line CheckpointError naming it."""
    try:
        return load_file(file)
    except (SafetensorError, OSError):
        raise CheckpointError(f"{file.parent}: {_weights_problem(file) or f'corrupt {file.name}'}") from None


def data_position(state: dict[str, Any] | None) -> dict[str, int] | None:
    """Where a resumed run's data continues ({"epoch", "batch"}); checkpoints from before positions were saved
    restart at the epoch after the saved one."""
    if not state:
        return None
    return state.get("data") or {"epoch": int(state.get("epoch", -1)) + 1, "batch": 0}


def resumable_loader(dataset, batch_size: int, seed: int, shuffle: bool = True, **kwargs) -> torch.utils.data.DataLoader:
    """A DataLoader whose order is a function of (seed, epoch) and which never draws from the global RNG.

    (A plain DataLoader draws a base seed from the global RNG each time an epoch starts, so where a
    resumed run starts its epochs would change the model's random draws.)
    """
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), seed, shuffle),
                                       generator=torch.Generator().manual_seed(seed), **kwargs)


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle that is a function of (seed, epoch) alone, so a resumed run sees the same order (no global RNG)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        return iter(np.random.default_rng([self.seed, self.epoch, 0x5EED]).permutation(self.n).tolist())


class BatchStream:
    """(epoch, batch) forever from a prepared loader, knowing where it is: `position()` -> {"epoch", "batch"}.

    Built from a saved position, it continues inside the interrupted epoch at the next batch (the skipped
    batches are not loaded: accelerate's `skip_first_batches` skips them in the sampler).
    """

    def __init__(self, loader: torch.utils.data.DataLoader, accelerator: Accelerator, position: dict[str, int] | None = None):
        self.loader, self.accelerator = loader, accelerator
        self.epoch = int(position["epoch"]) if position else 0
        self.batch = int(position["batch"]) if position else 0
        self._iter: Iterator | None = None

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def _start_epoch(self) -> None:
        if self.batch and self.batch >= len(self.loader):  # saved at an epoch's last batch: the next one starts
            self.epoch, self.batch = self.epoch + 1, 0
        _set_epoch(self.loader, self.epoch)
        skip = self.batch
        source = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        self._iter = iter(source)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, dict[str, Any]]:
        if self._iter is None:
            self._start_epoch()
        while True:
            try:
                item = next(self._iter)
            except StopIteration:
                self.epoch, self.batch = self.epoch + 1, 0
                self._start_epoch()
                continue
            self.batch += 1
            return self.epoch, item


def _set_epoch(loader: torch.utils.data.DataLoader, epoch: int) -> None:
    """Tell the dataset, the sampler and accelerate's wrapper which epoch starts."""
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    if hasattr(loader, "set_epoch"):  # accelerate's DataLoaderShard forwards it to its sampler
        loader.set_epoch(epoch)
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(getattr(batch_sampler, "batch_sampler", batch_sampler), "sampler", None)
    if hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)


class ProgressLog:
    """A progress bar plus scalar logging to TensorBoard every `log_every` steps (main process only)."""

    def __init__(self, accelerator: Accelerator, total: int, initial: int, desc: str, log_every: int, enabled: bool = True,
                 history: list[dict[str, float]] | None = None):
        self.accelerator = accelerator
        self.log_every = max(1, log_every)
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and accelerator.is_main_process), dynamic_ncols=True)
        self.plain = not enabled and accelerator.is_main_process  # no bar: print a line per log step instead
        self.desc, self.total = desc, total
        self.history: list[dict[str, float]] = list(history or [])  # a resumed run continues the saved log

    def step(self, step: int, scalars: dict[str, torch.Tensor | float]) -> None:
        """Advance one step; every `log_every` steps sync the scalars to the host and log them."""
        self.bar.update(1)
        if step % self.log_every == 0 or step == self.total:
            values = {k: float(v.detach().float().mean()) if torch.is_tensor(v) else float(v) for k, v in scalars.items()}
            self.accelerator.log(values, step=step)
            self.history.append({"step": step, **values})
            shown = {k: f"{v:.4g}" for k, v in values.items() if "/" not in k or k.endswith("loss")}
            self.bar.set_postfix(shown)
            if self.plain:
                print(f"{self.desc} step {step}/{self.total} " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

    def close(self) -> None:
        self.bar.close()
