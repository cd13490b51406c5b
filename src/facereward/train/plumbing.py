"""What every trainer shares: accelerate setup, TensorBoard logging, progress, atomic checkpoints, resume.

A checkpoint is a folder `OUTPUT/checkpoints/step-XXXXXXXX/` holding `NAME.safetensors` per module,
`NAME.optim.pt` per optimizer (plain tensors and numbers, read back with weights_only=True),
`rng.safetensors` and `state.json`. It is written under a temporary name and renamed into place,
and `OUTPUT/checkpoints/latest` names the newest complete one, so a crash never leaves a torn
checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from facereward.config import save_config


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not match the run; one line naming it."""


@dataclass
class RunConfig:
    """Fields every trainer has (embedded as `run` in each trainer's config)."""

    output_dir: str = "runs/train"
    seed: int = 0
    mixed_precision: str = "no"  # "no", "bf16" or "fp16", through accelerate
    gradient_accumulation_steps: int = 1
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None  # None, "latest", or a checkpoint folder
    cpu: bool = False  # force CPU even where a GPU exists (and enable gloo for multi-process CPU runs)
    progress: bool = True


def make_accelerator(run: RunConfig, project_name: str) -> Accelerator:
    """An Accelerator logging to TensorBoard under OUTPUT/logs, seeded per process."""
    if run.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"run.mixed_precision must be 'no', 'bf16' or 'fp16', got {run.mixed_precision!r}")
    if run.gradient_accumulation_steps < 1:
        raise ValueError("run.gradient_accumulation_steps must be >= 1")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # Without cpu=True, several CPU processes each start as a lone process and silently train apart.
    cpu = run.cpu or (world_size > 1 and not torch.cuda.is_available())
    accelerator = Accelerator(
        mixed_precision=run.mixed_precision,
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
) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep`; returns its folder."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, module in modules.items():
        tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(tensors, tmp / f"{name}.safetensors")
    for name, optimizer in optimizers.items():
        torch.save(optimizer.state_dict(), tmp / f"{name}.optim.pt")
    save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / "latest")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_run(
    accelerator: Accelerator,
    run: RunConfig,
    step: int,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    state: dict[str, Any],
) -> None:
    """Save a checkpoint from the main process (unwrapped modules), with every process waiting for it."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = {k: accelerator.unwrap_model(m) for k, m in modules.items()}
        full_state = {**state, "num_processes": accelerator.num_processes}
        save_checkpoint(run.output_dir, step, unwrapped, optimizers, full_state, keep=run.keep_checkpoints)
    accelerator.wait_for_everyone()


def find_checkpoint(output_dir: str | Path, resume: str) -> Path:
    """The folder `resume` names: "latest" (the newest complete one in OUTPUT) or an explicit path."""
    if resume != "latest":
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise CheckpointError(f"{path}: not a facereward checkpoint (no state.json)")
        return path
    root = checkpoint_root(output_dir)
    latest = root / "latest"
    if latest.is_file() and (root / latest.read_text().strip() / "state.json").is_file():
        return root / latest.read_text().strip()
    candidates = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    if not candidates:
        raise CheckpointError(f"{root}: no checkpoint to resume from")
    return candidates[-1]


def load_checkpoint(
    path: Path,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
) -> dict[str, Any]:
    """Restore modules, optimizers and the RNG from `path`; returns its state.json."""
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{path}: no weights for {name!r} ({file.name} missing)")
        try:
            module.load_state_dict(load_file(file))
        except RuntimeError as err:
            raise CheckpointError(f"{file}: does not fit the model ({str(err).splitlines()[0]})") from None
    for name, optimizer in optimizers.items():
        file = path / f"{name}.optim.pt"
        if not file.is_file():
            raise CheckpointError(f"{path}: no optimizer state for {name!r} ({file.name} missing)")
        optimizer.load_state_dict(torch.load(file, weights_only=True, map_location="cpu"))
    rng = path / "rng.safetensors"
    if rng.is_file():
        torch.set_rng_state(load_file(rng)["torch"])
    return json.loads((path / "state.json").read_text())


def infinite_batches(loader: torch.utils.data.DataLoader, start_epoch: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """(epoch, batch) forever, calling the dataset's `set_epoch` (if any) at each epoch start."""
    epoch = start_epoch
    while True:
        dataset = loader.dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for batch in loader:
            yield epoch, batch
        epoch += 1


class ProgressLog:
    """A progress bar plus scalar logging to TensorBoard every `log_every` steps (main process only)."""

    def __init__(self, accelerator: Accelerator, total: int, initial: int, desc: str, log_every: int, enabled: bool = True):
        self.accelerator = accelerator
        self.log_every = max(1, log_every)
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and accelerator.is_main_process), dynamic_ncols=True)
        self.plain = not enabled and accelerator.is_main_process  # no bar: print a line per log step instead
        self.desc, self.total = desc, total
        self.history: list[dict[str, float]] = []

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
