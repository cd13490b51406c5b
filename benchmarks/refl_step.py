"""ReFL step time over its bare compute, and graph memory against the number of sampling steps (DESIGN.md "fast").

    python benchmarks/refl_step.py [--device cuda] [--batch-size 4] [--steps 10] [--repeats 5]

Bare compute of one step: the k no-grad network calls down to the grad step, the grad-step call, the decode,
the FRM forward and the backward (plus the reference network's call when the regulariser is on), timed as one
tight loop with none of the trainer's glue. The ratio is `ReFLStep` + backward over that, per interleaved pair
(step, bare, step, bare, ...), as min/median/max. Memory: the bytes
autograd saves for backward (the graph), for T = 10 and T = 50; on CUDA also the peak allocated memory.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from facereward.models.ddim import DDIMSchedule, ddim_step_with_logprob, predict_x0
from facereward.models.frm import FaceRewardModel
from facereward.models.restorer import Restorer
from facereward.train.refl import ReFLConfig, ReFLStep
from facereward.train.trainable import LoraSettings, frozen_copy, prepare_trainable
from facereward.weights import WEIGHTS_DIR, default_restorer_path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(a, b, repeats: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Seconds of `a` and of `b`, alternating a, b, a, b, ... after one warm-up call each (so drift lands on both)."""
    a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((a, times[0]), (b, times[1])):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    restorer = Restorer.from_pretrained(default_restorer_path()).to(device)
    frm = FaceRewardModel.from_pretrained(WEIGHTS_DIR / "toy-frm").to(device)
    trainable = prepare_trainable(restorer, LoraSettings())
    reference = frozen_copy(trainable)
    size = restorer.config.size
    g = torch.Generator().manual_seed(0)
    hq = torch.rand(args.batch_size, 3, size, size, generator=g).to(device)
    batch = {"lq": hq, "hq": hq, "caption": [""] * args.batch_size}

    for reg in (0.0, 1e-4):
        cfg = ReFLConfig(sampling_steps=args.steps, grad_window=1, eta=1.0, reg_weight=reg)
        step = ReFLStep(cfg, restorer, frm, reference)
        gen = torch.Generator(device=device).manual_seed(0)

        def refl() -> None:
            step(batch, gen).loss.backward()
            trainable.zero_grad(set_to_none=True)

        schedule = DDIMSchedule.from_scheduler(restorer.scheduler, args.steps, device=device)

        def bare() -> None:
            with torch.no_grad():
                cond = restorer.condition(restorer.clean(batch["lq"]))
                x = torch.randn(restorer.latent_shape(args.batch_size, size, size), device=device)
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

        t_refl, t_bare = interleaved(refl, bare, args.repeats, device)
        ratios = [r / b for r, b in zip(t_refl, t_bare)]
        print(f"reg_weight={reg:g}: ReFL step {statistics.median(t_refl) * 1000:.1f} ms, bare compute "
              f"{statistics.median(t_bare) * 1000:.1f} ms (medians); ratio per pair min {min(ratios):.3f} "
              f"median {statistics.median(ratios):.3f} max {max(ratios):.3f}")

    for steps in (10, 50):
        step = ReFLStep(ReFLConfig(sampling_steps=steps, grad_window=1, eta=1.0), restorer, frm, reference)
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = step(batch, torch.Generator(device=device).manual_seed(0))
        out.loss.backward()
        trainable.zero_grad(set_to_none=True)
        peak = f", peak allocated {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB" if device.type == "cuda" else ""
        print(f"T={steps}: autograd graph {saved / 2**20:.1f} MiB{peak}")


if __name__ == "__main__":
    main()
