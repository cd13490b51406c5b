"""Speed options for a run: bf16 autocast and channels_last where they are faster for this network on this machine
(`run.speed: auto`, measured once and cached), and torch.compile as an explicit option (`run.compile`).

Whether bf16 autocast or channels_last pays depends on the network and the device: on a 2-core AVX-512 CPU bf16
made the pixel toy model's LRPO epoch 0.81x but training its UNet 40x slower, so nothing is assumed. The
trained network's own calls are timed at the run's batch in each of the four layouts, weighted by how many no-grad
and grad calls the trainer makes per step (`Workload`), and the cheapest is taken. Explicit settings
(`run.mixed_precision`, the launcher's mixed precision, `run.channels_last`) always win; engines that own the
precision (DeepSpeed, FSDP) are left alone. A run records its choice in OUTPUT/speed.json and a resumed run reuses
it, so resuming never switches precision.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn

from facereward import smoke
from facereward.models.restorer import Restorer
from facereward.train.accelerator import RunConfig, engine_of

Probe = Callable[[bool], torch.Tensor]  # one call of the trained network at the run's shapes; True: with grad


@dataclass(frozen=True)
class Workload:
    """A trainer step's calls of the trained network, at `batch` rows each: `no_grad` forwards and `grad` forward +
    backwards (means; e.g. LRPO per sample: T rollout forwards and one fwd+bwd per trained step)."""

    batch: int
    no_grad: float
    grad: float


@dataclass
class SpeedChoice:
    """What a run uses and why: `source` is explicit, measured, cached, resumed, engine or off."""

    mixed_precision: str  # "no" or "bf16" as accelerate names it
    channels_last: bool
    source: str
    timings: dict[str, list[float]] = field(default_factory=dict)  # layout -> [no-grad s, grad s] per call

    def describe(self) -> str:
        what = f"bf16 autocast {'on' if self.mixed_precision == 'bf16' else 'off'}, channels_last {'on' if self.channels_last else 'off'}"
        if not self.timings:
            return f"{what} ({self.source})"
        costs = {k: v for k, v in self.timings.items() if all(math.isfinite(x) for x in v)}
        return f"{what} ({self.source}; per call no-grad/grad: " + ", ".join(
            f"{k} {v[0] * 1e3:.1f}/{v[1] * 1e3:.1f} ms" for k, v in costs.items()) + ")"


LAYOUTS = {"fp32": ("no", False), "fp32+channels_last": ("no", True), "bf16": ("bf16", False),
           "bf16+channels_last": ("bf16", True)}


def cache_path() -> Path:
    """Where measurements are kept across runs: $FACEREWARD_CACHE_DIR/speed.json (default ~/.cache/facereward)."""
    root = os.environ.get("FACEREWARD_CACHE_DIR") or Path.home() / ".cache" / "facereward"
    return Path(root) / "speed.json"


def machine_key(device: torch.device) -> dict[str, Any]:
    """What makes timings comparable: the processor or GPU, torch's version and its CPU threads."""
    key: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device.type}
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
    else:
        model = platform.processor()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        key.update(cpu=model, cores=os.cpu_count())
    return key


def network_key(module: nn.Module, model_config: Any, batch: int, role: str) -> dict[str, Any]:
    """What makes timings of one network comparable: its model config, what trains in it, and the batch."""
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    config = asdict(model_config) if hasattr(model_config, "__dataclass_fields__") else model_config
    return {"role": role, "model": config, "network": type(module).__name__, "trained_params": trained, "batch": batch,
            "checkpointing": bool(getattr(module, "is_gradient_checkpointing", False))}


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


@contextlib.contextmanager
def _layout(module: nn.Module, device: torch.device, mixed_precision: str, channels_last: bool) -> Iterator[None]:
    module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
        yield


def time_call(probe: Probe, grad: bool, module: nn.Module, device: torch.device) -> float:
    """Seconds of one no-grad call or one forward + backward of `probe`; clears `module`'s gradients after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    if grad:
        probe(True).float().square().mean().backward()
    else:
        with torch.no_grad():
            probe(False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    for p in module.parameters():
        p.grad = None
    return elapsed


HOPELESS = 4.0  # a layout whose warmed-up no-grad call takes this many times the best's is not timed further


def measure(probe: Probe, module: nn.Module, device: torch.device, layouts: list[str], budget_s: float = 30.0,
            rounds: int = 5, drop: bool = True) -> dict[str, list[float]]:
    """Median seconds per [no-grad, grad] call of `probe` in each layout; layouts interleave round by round so drift
    lands on all. A layout is dropped (inf) when its second no-grad call (the first pays for allocation and kernel
    choice) takes over `HOPELESS` times the best's: it gets no more calls (on this CPU bf16 autocast made the toy
    UNet 44x slower, 6 s a call); or when its first timed calls both take over twice the best's: it cannot win.
    `drop=False` times every layout in full (benchmarks/speed_options.py --no-drop).

    Leaves `module` contiguous with its gradients cleared and the global RNG state as it was.
    """
    samples: dict[str, list[list[float]]] = {name: [] for name in layouts}
    devices = [device] if device.type == "cuda" else []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=devices):
        first: dict[str, float] = {}
        for name in layouts:  # warm-up: first calls allocate and pick kernels, so the layout's second call is judged
            with _layout(module, device, *LAYOUTS[name]):
                time_call(probe, False, module, device)
                first[name] = time_call(probe, False, module, device)
                if not drop or first[name] <= HOPELESS * min(first.values()):
                    time_call(probe, True, module, device)
        live = [n for n in layouts if not drop or first[n] <= HOPELESS * min(first.values())]
        for r in range(rounds):
            for name in live:
                with _layout(module, device, *LAYOUTS[name]):
                    samples[name].append([time_call(probe, False, module, device), time_call(probe, True, module, device)])
            if drop and r == 0 and len(live) > 1:
                best = [min(samples[n][0][i] for n in live) for i in (0, 1)]
                live = [n for n in live if any(samples[n][0][i] <= 2 * best[i] for i in (0, 1))]
            if time.perf_counter() - start > budget_s:
                break
    module.to(memory_format=torch.contiguous_format)
    out = {}
    for name in layouts:
        runs = samples[name] if name in live else []
        out[name] = [_median([s[i] for s in runs]) for i in (0, 1)] if runs else [math.inf, math.inf]
    return out


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def pick(timings: dict[str, list[float]], workload: Workload) -> str:
    """The layout with the least time per step: no_grad x its forward + grad x its forward and backward."""
    return min(timings, key=lambda n: workload.no_grad * timings[n][0] + workload.grad * timings[n][1])


def set_mixed_precision(accelerator: Accelerator, mixed_precision: str) -> None:
    """Switch a (not yet prepared) accelerator between "no" and "bf16" autocast.

    accelerate fixes the precision at construction and has no public setter; it keeps it in the shared state
    (read by `prepare`'s forward wrapper and by `accelerator.autocast()`) and in `native_amp`. The change is checked
    by reading it back; tests check that autocast then really runs.
    """
    if mixed_precision not in ("no", "bf16"):
        raise ValueError(f"speed: cannot switch to mixed precision {mixed_precision!r}")
    accelerator.state._mixed_precision = mixed_precision
    accelerator.native_amp = mixed_precision == "bf16"
    if accelerator.mixed_precision != mixed_precision:
        raise RuntimeError(f"speed: this accelerate ({accelerator.mixed_precision!r}) did not take mixed precision "
                           f"{mixed_precision!r}; set run.speed: off")


def choose_speed(run: RunConfig, accelerator: Accelerator, module: nn.Module, probe: Probe, workload: Workload,
                 model_config: Any, role: str, budget_s: float = 30.0) -> SpeedChoice:
    """Pick and apply the run's layout for `module` before it is prepared; call on every process.

    The main process measures (unless the cache or the run's own speed.json already holds it) and every process
    takes its choice: channels_last is applied to `module`, bf16 to `accelerator`. Prints the choice on the main
    process and records it in OUTPUT/speed.json under `role`.
    """
    explicit_mp = run.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    current = accelerator.mixed_precision
    if engine_of(accelerator):
        choice = SpeedChoice(current, bool(run.channels_last), f"{engine_of(accelerator)} sets the precision")
    elif run.speed == "off" or (explicit_mp and run.channels_last is not None):
        choice = SpeedChoice(current, bool(run.channels_last), "off" if run.speed == "off" else "explicit")
    else:
        choice = _auto(run, accelerator, module, probe, workload, model_config, role, budget_s, explicit_mp)
    if choice.mixed_precision != current:
        set_mixed_precision(accelerator, choice.mixed_precision)
    if choice.channels_last:
        module.to(memory_format=torch.channels_last)
    if accelerator.is_main_process:
        if run.speed == "auto" or choice.channels_last:
            print(f"speed ({role}): {choice.describe()}", file=sys.stderr)
        record = Path(run.output_dir) / "speed.json"
        data = _read_json(record)
        data[role] = {"mixed_precision": choice.mixed_precision, "channels_last": choice.channels_last,
                      "source": choice.source, "timings": choice.timings}
        _write_json(record, data)
    return choice


def _auto(run: RunConfig, accelerator: Accelerator, module: nn.Module, probe: Probe, workload: Workload,
          model_config: Any, role: str, budget_s: float, explicit_mp: str | None) -> SpeedChoice:
    device = accelerator.device
    precisions = [explicit_mp] if explicit_mp else ["no", "bf16"]
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        precisions = [p for p in precisions if p != "bf16"] or ["no"]
    layouts = [n for n, (mp, cl) in LAYOUTS.items()
               if mp in precisions and (run.channels_last is None or cl == run.channels_last)]
    if len(layouts) == 1:
        mp, cl = LAYOUTS[layouts[0]]
        return SpeedChoice(mp, cl, "explicit")
    payload: list[Any] = [None]
    if accelerator.is_main_process:
        payload[0] = _measured_or_cached(run, module, probe, workload, model_config, role, budget_s, device, layouts)
    if accelerator.num_processes > 1:
        broadcast_object_list(payload, from_process=0)
    timings, source = payload[0]
    mp, cl = LAYOUTS[pick({n: timings[n] for n in layouts}, workload)]
    return SpeedChoice(mp, cl, source, timings)


def _measured_or_cached(run: RunConfig, module: nn.Module, probe: Probe, workload: Workload, model_config: Any,
                        role: str, budget_s: float, device: torch.device, layouts: list[str]) -> tuple[dict, str]:
    recorded = _read_json(Path(run.output_dir) / "speed.json").get(role) if run.resume else None
    if recorded and set(layouts) <= set(recorded.get("timings", {})):
        return recorded["timings"], "resumed"
    key = {"machine": machine_key(device), "network": network_key(module, model_config, workload.batch, role)}
    if smoke.active():  # a smoke run times one round (scaled down like the rest of it): never served to a real run
        key["smoke"] = True
    digest, path = _digest(key), cache_path()
    cached = _read_json(path).get(digest)
    if cached and set(layouts) <= set(cached.get("timings", {})):
        return cached["timings"], f"cached in {path}"
    timings = measure(probe, module, device, layouts, budget_s, rounds=1 if smoke.active() else 5)
    with contextlib.suppress(OSError):  # a read-only home only costs a re-measurement next time
        data = _read_json(path)
        data[digest] = {"key": key, "timings": timings, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_json(path, data)
    return timings, "measured"


def compile_networks(run: RunConfig, *modules: nn.Module | None) -> None:
    """`run.compile`: compile each module's forward in place (`nn.Module.compile`: state-dict keys unchanged)."""
    if run.compile:
        for m in modules:
            if m is not None:
                m.compile()


def restorer_probe(restorer: Restorer, module: nn.Module, batch: int) -> Probe:
    """One noise prediction through `module` (the restorer's trained stage-2 network) on `batch` random inputs."""
    g = torch.Generator().manual_seed(0)
    size, device = restorer.config.size, restorer.device
    if restorer.family == "one-step":  # its one call from the LQ
        lq = torch.rand(batch, 3, size, size, generator=g).to(device)
        return lambda grad: restorer.forward_with_residuals(lq, net=module)[0]
    with torch.no_grad():
        cond = restorer.condition(restorer.clean(torch.rand(batch, 3, size, size, generator=g).to(device)))
        x_t = torch.randn(restorer.latent_shape(batch, size, size), generator=g).to(device)
    t = torch.full((batch,), restorer.scheduler.config.num_train_timesteps // 2, dtype=torch.long, device=device)
    return lambda grad: restorer.predict_eps(x_t, t, cond, net=module)


def speed_up_stage2(run: RunConfig, accelerator: Accelerator, restorer: Restorer, module: nn.Module,
                    workload: Workload, role: str) -> SpeedChoice:
    """`choose_speed` for the restorer's trained network, then `run.compile` on it (and on the frozen UNet its
    residuals feed in latent mode); call after `prepare_trainable`, before `accelerator.prepare`."""
    choice = choose_speed(run, accelerator, module, restorer_probe(restorer, module, workload.batch), workload,
                          restorer.config, role)
    compile_networks(run, module, restorer.unet if restorer.family == "multi-step" and restorer.mode == "latent" else None)
    return choice


def speed_up_cleaner(run: RunConfig, accelerator: Accelerator, restorer: Restorer, batch: int, role: str) -> SpeedChoice:
    """`choose_speed` (and `run.compile`) for training the stage-1 cleaner: a forward + backward per step."""
    size, cleaner = restorer.config.size, restorer.cleaner
    lq = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(restorer.device)
    choice = choose_speed(run, accelerator, cleaner, lambda grad: cleaner(lq), Workload(batch, 0, 1), restorer.config, role)
    compile_networks(run, cleaner)
    return choice
