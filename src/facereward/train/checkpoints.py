"""Atomic checkpoints and resume: `checkpoint_run` writes OUTPUT/checkpoints/step-XXXXXXXX/ so that a crash never
leaves a torn one; `resume_run` picks the newest valid one and `restore_run` loads it (weights, optimizers, RNGs)."""

# A checkpoint folder holds `NAME.safetensors` per module, `NAME.optim.pt` per optimizer that was not prepared and
# accelerate's `optimizer*.bin` for the prepared ones (plain tensors and numbers, read back with weights_only=True),
# `rng-RANK.safetensors` per process and `state.json`; under FSDP or DeepSpeed the prepared model and optimizer are
# the engine's own files from `accelerator.save_state`. It is written under a temporary name and renamed into place,
# and `OUTPUT/checkpoints/latest` names the newest complete one. Resuming still checks each file (a disk can fill or
# a copy stop short) and falls back to the previous valid checkpoint. The trainers make two calls: `resume_run`
# (which checkpoint, its state) before setup and `restore_run` (load it all) after `prepare`, just before the first step.

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from facereward.config import save_config
from facereward.train.accelerator import RunConfig, _unwrap_model, engine_of


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not match the run; one line naming it."""


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


def _unwrap_optimizer(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer holds the torch one


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
