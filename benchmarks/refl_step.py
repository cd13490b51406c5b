"""ReFL step time over its bare compute, and graph memory against the number of sampling steps (docs/architecture.md).

    python benchmarks/refl_step.py [--device cuda] [--batch-size 4] [--steps 10] [--repeats 5]
    python benchmarks/refl_step.py --model latent-real --device cuda --precision bf16 [--compile] --batch-size 1 \
        --repeats 3    # SD 2.1 + DiffBIR shapes, random weights (the FRM stays the 64 px toy: images are resized to it)

Bare compute of one step: the k no-grad network calls down to the grad step, the grad-step call, the decode,
the FRM forward and the backward (plus the reference network's call when the regulariser is on), timed as one
tight loop with none of the trainer's glue. The ratio is `ReFLStep` + backward over that, per interleaved pair
(step, bare, step, bare, ...), as min/median/max. Memory: the bytes
autograd saves for backward (the graph), for T = 10 and T = 50 (`--memory-steps`); on CUDA also the peak allocated
memory, and each side's peak in the timed part.

`--model`: toy is the shipped 64 px toy restorer (the default); the other names are speed_options.build's
(latent-real: SD 2.1 base UNet + DiffBIR's ControlNet, 512 px faces, 64x64x4 latents). `--precision bf16`: the
step runs through an Accelerator with mixed_precision "bf16" (its network prepared, `accelerator.autocast()` and
`accelerator.backward`, as `train_refl`), the bare side in `torch.autocast(device, bfloat16)`; fp32 calls the
step as before. `--compile`: `nn.Module.compile()` on the trained network and, in latent mode, the frozen UNet (as
`run.compile`; the frozen reference copy stays eager, as in train_refl), shared by both sides; the warm-up calls
(printed) include the compile.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from facereward.models.ddim import DDIMSchedule, ddim_step_with_logprob, predict_x0
from facereward.models.frm import FaceRewardModel
from facereward.models.restorer import Restorer
from facereward.train.accelerator import RunConfig, make_accelerator
from facereward.train.refl import ReFLConfig, ReFLStep
from facereward.train.trainable import LoraSettings, frozen_copy, prepare_trainable
from facereward.weights import WEIGHTS_DIR, default_restorer_path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(a, b, repeats: int, device: torch.device, warm: list[float] | None = None,
                peaks: list[int] | None = None) -> tuple[list[float], list[float]]:
    """Seconds of `a` and of `b`, alternating a, b, a, b, ... after one warm-up call each (so drift lands on both).

    `warm` (if given) receives the warm-up calls' seconds; `peaks` (on CUDA) each side's peak allocated bytes."""
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(-1, repeats):
        for i, fn in enumerate((a, b)):
            sync(device)
            if peaks is not None and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            fn()
            sync(device)
            elapsed = time.perf_counter() - start
            if peaks is not None and device.type == "cuda":
                peaks[i] = max(peaks[i], torch.cuda.max_memory_allocated(device))
            if r >= 0:
                times[i].append(elapsed)
            elif warm is not None:
                warm.append(elapsed)
    return times


MODELS = ["toy", "pixel-toy", "latent-tiny", "latent-real"]


def _restorer(model: str, device: torch.device) -> Restorer:
    if model == "toy":
        return Restorer.from_pretrained(default_restorer_path())
    from speed_options import build

    return build(model, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy", choices=MODELS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="nn.Module.compile() the trained network (+ the UNet in latent mode)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--memory-steps", type=int, nargs="*", default=[10, 50], help="T of the graph-memory part (none: skip)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, bf16 = torch.device(args.device), args.precision == "bf16"
    accelerator = None
    if bf16:  # as train_refl: the trained network through accelerate, its autocast and backward
        accelerator = make_accelerator(RunConfig(output_dir=tempfile.mkdtemp(), progress=False, cpu=device.type == "cpu",
                                                 mixed_precision="bf16"), "bench")
        device = accelerator.device
    restorer = _restorer(args.model, device).to(device)
    frm = FaceRewardModel.from_pretrained(WEIGHTS_DIR / "toy-frm").to(device)
    trainable = prepare_trainable(restorer, LoraSettings())
    reference = frozen_copy(trainable)
    if args.compile:  # as run.compile (train/speed.py compile_networks), shared by both sides
        trainable.compile()
        if restorer.mode == "latent":
            restorer.unet.compile()
    net = accelerator.prepare(trainable) if accelerator is not None else None
    size = restorer.config.size
    print(f"{args.model}: {device}, {args.precision}{' + compile' if args.compile else ''}, {size} px, "
          f"{sum(p.numel() for p in trainable.parameters() if p.requires_grad) / 1e6:.1f}M trained parameters, "
          f"batch {args.batch_size}, T={args.steps}", flush=True)
    g = torch.Generator().manual_seed(0)
    hq = torch.rand(args.batch_size, 3, size, size, generator=g).to(device)
    batch = {"lq": hq, "hq": hq, "caption": [""] * args.batch_size}

    def autocast():  # the trainer's side: the accelerator's (bf16) or none; the bare side: torch's
        return accelerator.autocast() if accelerator is not None else torch.autocast(device.type, enabled=False)

    def backward(loss: torch.Tensor) -> None:
        accelerator.backward(loss) if accelerator is not None else loss.backward()

    for reg in (0.0, 1e-4):
        cfg = ReFLConfig(sample_steps=args.steps, grad_window=1, eta=1.0, reg_weight=reg)
        step = ReFLStep(cfg, restorer, frm, reference, net=net)
        gen = torch.Generator(device=device).manual_seed(0)

        def refl() -> None:
            with autocast():
                out = step(batch, gen)
            backward(out.loss)
            trainable.zero_grad(set_to_none=True)

        schedule = DDIMSchedule.from_scheduler(restorer.scheduler, args.steps, device=device)

        def bare() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                with torch.no_grad():
                    cond = restorer.condition(restorer.clean(batch["lq"]))
                    x = torch.randn(restorer.latent_shape(args.batch_size, size, size), device=device).to(cond.dtype)
                    for t in schedule.timesteps[:-1]:
                        t_b = t.expand(args.batch_size)
                        x = ddim_step_with_logprob(restorer.predict_eps(x, t_b, cond), t_b, x, schedule, 1.0).prev_sample
                t_b = schedule.timesteps[-1].expand(args.batch_size)
                eps, residuals = restorer.predict_eps(x, t_b, cond, return_residuals=True)
                loss = frm(restorer.decode(predict_x0(x, eps, schedule.alpha_bars(t_b)[0].view(-1, 1, 1, 1)))).mean()
                if reg:
                    with torch.no_grad():
                        restorer.predict_eps(x, t_b, cond, net=reference)
            loss.backward()
            trainable.zero_grad(set_to_none=True)

        warm: list[float] = []
        peaks = [0, 0]
        t_refl, t_bare = interleaved(refl, bare, args.repeats, device, warm, peaks)
        ratios = [r / b for r, b in zip(t_refl, t_bare)]
        if device.type == "cuda" or args.compile:
            peak = f", peak allocated {peaks[0] / 2**30:.2f} / {peaks[1] / 2**30:.2f} GiB" if device.type == "cuda" else ""
            print(f"reg_weight={reg:g}: warm-up ReFL step {warm[0]:.2f} s, bare {warm[1]:.2f} s{peak}", flush=True)
        print(f"reg_weight={reg:g}: ReFL step {statistics.median(t_refl) * 1000:.1f} ms, bare compute "
              f"{statistics.median(t_bare) * 1000:.1f} ms (medians); ratio per pair min {min(ratios):.3f} "
              f"median {statistics.median(ratios):.3f} max {max(ratios):.3f}", flush=True)

    for steps in args.memory_steps:
        step = ReFLStep(ReFLConfig(sampling_steps=steps, grad_window=1, eta=1.0), restorer, frm, reference, net=net)
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
            out = step(batch, torch.Generator(device=device).manual_seed(0))
        backward(out.loss)
        trainable.zero_grad(set_to_none=True)
        peak = f", peak allocated {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB" if device.type == "cuda" else ""
        print(f"T={steps}: autograd graph {saved / 2**20:.1f} MiB{peak}", flush=True)


if __name__ == "__main__":
    main()
