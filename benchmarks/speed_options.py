"""What `run.speed: auto` sees and picks, and what torch.compile buys (docs/architecture.md).

    python benchmarks/speed_options.py [--models pixel-toy latent-tiny] [--batch 4] [--threads 2] [--no-drop] [--compile]
    python benchmarks/speed_options.py --models latent-real --device cuda --batch 2 --compile   # SD 2.1 + DiffBIR shapes

For each model, the trained network's no-grad and grad (forward + backward) call at the batch, in the four layouts
`facereward.train.speed.measure` times (fp32 / bf16 autocast x contiguous / channels_last), the layout each
trainer's workload picks (LRPO's toy recipe and original, ReFL's, train-base's), and with `--compile` the same calls
after `nn.Module.compile()` (the first call's compile time apart). Random weights: only the shapes matter here.
"""

from __future__ import annotations

import argparse
import time

import torch

from facereward.models.restorer import LatentConfig, Restorer, RestorerConfig
from facereward.train.speed import LAYOUTS, Workload, measure, pick, restorer_probe, time_call
from facereward.train.trainable import LoraSettings, prepare_trainable

WORKLOADS = {  # per trainer step, at the measured batch (train/lrpo.py lrpo_workload, train/refl.py refl_workload)
    "lrpo toy (T=8, 7 trained)": Workload(0, 8, 7),
    "lrpo original (T=50, 49 trained)": Workload(0, 50, 49),
    "refl (T=50, grad window 2)": Workload(0, 48.5 + 1, 1),
    "train-base stage 2": Workload(0, 0, 1),
}


def build(name: str, device: torch.device | str | None = None) -> Restorer:
    """The named model with random weights (seeded), on the CPU; `device` only builds latent-real's big networks
    there directly (random init of 1.3B parameters on the CPU takes seconds), the caller moves the rest."""
    torch.manual_seed(0)
    if name == "pixel-toy":  # the shipped toy restorer's shape (64 px, UNet 32/64/96)
        return Restorer.build(RestorerConfig(mode="pixel", size=64))
    if name == "latent-tiny":  # the tests' and lrpo_epoch.py's tiny latent model
        return Restorer.build(RestorerConfig(mode="latent", size=32, cleaner_kwargs={"channels": 8, "num_blocks": 1, "downscale": 2}))
    if name == "latent-real":  # SD 2.1 base UNet + DiffBIR's ControlNet at 512 px (a small cleaner: not timed)
        return _sd21_restorer(device=device)
    raise ValueError(name)


def _sd21_restorer(size: int = 512, device: torch.device | str | None = None) -> Restorer:
    """Random weights in SD 2.1 base's own shapes, built as `import-diffbir` builds them: the UNet config of
    diffbir_import.unet_config (2 res blocks a level, heads of 64 channels, linear projections: 866M parameters),
    SD's VAE (84M) and the ControlNet DiffBIR makes of that UNet (363M). (`Restorer.build`'s latent parts have one
    res block a level and `attention_head_dim` heads, i.e. 64 heads of 5-20 channels: not SD 2.1's shapes.)"""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from facereward.models.cleaner import build_cleaner
    from facereward.models.controlnet import ConcatControlNetModel
    from facereward.models.ddim import make_scheduler
    from facereward.models.diffbir_import import LATENT_SCALE, unet_config

    config = RestorerConfig(mode="latent", size=size, cleaner_kwargs={"channels": 8, "num_blocks": 1, "downscale": 2},
                            latent=LatentConfig(vae_block_out_channels=[128, 256, 512, 512],
                                                unet_block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=1024,
                                                attention_head_dim=64, prompt_length=77, norm_num_groups=32))
    sd21 = {"model_channels": 320, "in_channels": 4, "mults": [1, 2, 4, 4], "per_level": 2,
            "attention": [True, True, True, False], "context": 1024, "linear": True, "depth": 1}
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel(**unet_config(sd21, size, head_channels=64))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                            layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=size,
                            scaling_factor=LATENT_SCALE)
        controlnet = ConcatControlNetModel.from_unet(unet, vae.config.latent_channels)
    scheduler = make_scheduler(config.beta_schedule, config.beta_start, config.beta_end, prediction_type=config.prediction_type)
    prompt = torch.randn(1, 77, 1024, generator=torch.Generator().manual_seed(0), device="cpu")
    return Restorer(config, build_cleaner(config.cleaner, config.cleaner_kwargs), scheduler, unet, vae, controlnet, prompt).eval()


def _per_call(probe, grad: bool, module, device: torch.device, repeats: int) -> float:
    return sorted(time_call(probe, grad, module, device) for _ in range(repeats))[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["pixel-toy", "latent-tiny"], choices=["pixel-toy", "latent-tiny", "latent-real"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-drop", action="store_true",
                        help="time every layout in full (run.speed: auto drops hopeless ones: inf in the table)")
    parser.add_argument("--compile", action="store_true", help="also time nn.Module.compile() (minutes to compile on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for name in args.models:
        restorer = build(name).to(device)
        module = prepare_trainable(restorer, LoraSettings())
        probe = restorer_probe(restorer, module, args.batch)
        timings = measure(probe, module, device, list(LAYOUTS), budget_s=600, rounds=args.rounds, drop=not args.no_drop)
        print(f"\n{name}, batch {args.batch}, {device} ({torch.get_num_threads()} threads): ms per call, no-grad / grad")
        base = timings["fp32"]
        for layout, (ng, g) in timings.items():
            print(f"  {layout:20s} {ng * 1e3:9.1f} / {g * 1e3:9.1f}   ({ng / base[0]:.2f}x / {g / base[1]:.2f}x of fp32)")
        for what, w in WORKLOADS.items():
            print(f"  picks for {what:34s} {pick(timings, w)}")
        if args.compile:
            module.compile()
            if restorer.mode == "latent":
                restorer.unet.compile()
            for precision in ("fp32", "bf16"):
                for grad in (False, True):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                        start = time.perf_counter()
                        _per_call(probe, grad, module, device, 1)
                        first = time.perf_counter() - start
                        call = _per_call(probe, grad, module, device, args.rounds)
                    kind = "grad" if grad else "no-grad"
                    print(f"  compiled {precision} {kind:8s} first call {first:7.1f} s, then {call * 1e3:9.1f} ms "
                          f"({call / base[int(grad)]:.2f}x of eager fp32)", flush=True)
            for p in module.parameters():
                p.grad = None


if __name__ == "__main__":
    main()
