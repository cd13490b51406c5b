"""What every trainer shares: accelerate setup, TensorBoard logging, progress, atomic checkpoints, resume.

A checkpoint is a folder `OUTPUT/checkpoints/step-XXXXXXXX/` holding `NAME.safetensors` per module,
`NAME.optim.pt` per optimizer (plain tensors and numbers, read back with weights_only=True),
`rng.safetensors` and `state.json`. It is written under a temporary name and renamed into place,
and `OUTPUT/checkpoints/latest` names the newest complete one, so a crash never leaves a torn
checkpoint behind. Resuming still checks each file (a disk can fill or a copy stop short) and falls back
to the previous valid checkpoint; `resume_run` is the one call the trainers make for all of it.
"""

from __future__ import annotations

import json
import os
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
    resume: str | None = None  # None, "latest", "auto" (latest, or a fresh start if none) or a checkpoint folder
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
    generators: dict[str, torch.Generator] | None = None,
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
    save_file(rng_state(generators), tmp / "rng.safetensors")
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
    # Only folders up to this step: newer ones (a corrupt one a fresh start skipped) must not crowd this one out.
    older = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name <= final.name)
    for old in older[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_run(
    accelerator: Accelerator,
    run: RunConfig,
    step: int,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    state: dict[str, Any],
    generators: dict[str, torch.Generator] | None = None,
) -> None:
    """Save a checkpoint from the main process (unwrapped modules), with every process waiting for it."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = {k: accelerator.unwrap_model(m) for k, m in modules.items()}
        full_state = {**state, "num_processes": accelerator.num_processes}
        save_checkpoint(run.output_dir, step, unwrapped, optimizers, full_state, keep=run.keep_checkpoints, generators=generators)
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
    and length, no tensor read) and every *.optim.pt loads with torch.load(weights_only=True) memory-mapped.
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
    for file in sorted(path.glob("*.optim.pt")):
        if problem := _optimizer_problem(file):
            return problem
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


def resume_run(
    accelerator: Accelerator,
    run: RunConfig,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
) -> dict[str, Any] | None:
    """Start or resume a trainer's run: the one call every trainer makes before its first step.

    Removes orphaned temporary checkpoint files (main process), then, if `run.resume` asks, restores the
    checkpoint `find_checkpoint` picks into `modules` and `optimizers` and returns its state.json; None means
    start from step 0. A checkpoint written by a different number of processes is a CheckpointError.
    """
    if accelerator.is_main_process:
        remove_orphaned_temps(run.output_dir)
    if not run.resume:
        return None
    report = _to_stderr if accelerator.is_main_process else (lambda line: None)
    path = find_checkpoint(run.output_dir, run.resume, report)
    if path is None:
        return None
    state = load_checkpoint(path, modules, optimizers)
    check_num_processes(state, accelerator.num_processes, path)
    return state


def check_num_processes(state: dict[str, Any], num_processes: int, path: Path) -> None:
    """Raise a CheckpointError when checkpoint `path` (its `state`) ran on a different number of processes."""
    saved = state.get("num_processes", num_processes)
    if saved != num_processes:
        raise CheckpointError(f"run.resume: {path} ran on {saved} processes, this run on {num_processes} "
                              "(resume with the same number of processes)")


def load_checkpoint(
    path: Path,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
) -> dict[str, Any]:
    """Restore modules and optimizers from `path`; returns its state.json plus {"checkpoint": path}.

    The RNG states are put back separately, by `restore_rng`, once the trainer's setup is done. A missing,
    corrupt or unfitting file is a one-line CheckpointError naming it.
    """
    try:
        state = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a facereward checkpoint (no state.json)") from None
    except (OSError, ValueError):
        raise CheckpointError(f"{path}: unreadable state.json") from None
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{path}: no weights for {name!r} ({file.name} missing)")
        try:
            module.load_state_dict(_read_weights(file))
        except RuntimeError as err:
            raise CheckpointError(f"{file}: does not fit the model ({str(err).splitlines()[0]})") from None
    for name, optimizer in optimizers.items():
        file = path / f"{name}.optim.pt"
        if not file.is_file():
            raise CheckpointError(f"{path}: no optimizer state for {name!r} ({file.name} missing)")
        try:
            saved = torch.load(file, weights_only=True, map_location="cpu")
        except Exception:  # see _optimizer_problem
            raise CheckpointError(f"{path}: {_optimizer_problem(file) or f'corrupt {file.name}'}") from None
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{file}: does not fit the optimizer ({_first_line(err)})") from None
    return {**state, "checkpoint": str(path)}


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, torch.Tensor]:
    """The global CPU (and current CUDA device) RNG states plus each named generator's, as tensors to save."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    for name, generator in (generators or {}).items():
        out[f"generator/{name}"] = generator.get_state()
    return out


def restore_rng(state: dict[str, Any] | None, generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back the RNG states of the checkpoint `state` came from (`resume_run`'s result); nothing for a fresh run.

    Call it just before the first step, after every setup that draws random numbers, so the resumed run
    draws what the uninterrupted one drew.
    """
    if not state or "checkpoint" not in state:
        return
    file = Path(state["checkpoint"]) / "rng.safetensors"
    if not file.is_file():
        return
    saved = _read_weights(file)
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])
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
