"""The one-step restorer family (OSEDiff, Wu et al. 2024; docs/methods.md 0.1): the LQ itself, encoded, is x_t at one
fixed timestep, and one network call gives x0.

    z = E(2 lq - 1) [x VAE scaling]   ->   out = UNet(z, t*, prompt)   ->   z0 = x0(out, z, abar_t*)   ->   D(z0)

`latent` mode is OSEDiff's: Stable Diffusion's VAE (its encoder trained, by LoRA in OSEDiff) and UNet with a fixed
text embedding, t* = 999, epsilon prediction, and a sample of the encoder's posterior (`latent_sample`; its noise is
the per-image seeded x_T the multi-step family would start from, so results do not depend on batching). `pixel` mode is the toy world's: a
UNet2DModel on [-1, 1] pixels (no VAE). There is no stage 1: what `restore` calls "clean" is the LQ itself.

The trained part is `OneStepNet` (the UNet, and in latent mode the VAE encoder with its quant conv), so a trainer
treats it as it treats a multi-step restorer's stage-2 network. A folder is `facereward.json` (family "one-step"),
`scheduler/`, `unet/` (+ `vae/`, `prompt_embeds.safetensors`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from facereward.atomic import staging_folder, swap_in_folder
from facereward.models.colour_fix import wavelet_colour_fix
from facereward.models.ddim import PredictionType, make_scheduler, output_to_x0
from facereward.models.restorer import LatentConfig, ModelFolderError, PixelUNetConfig, SamplerOptions, _tiny_latent_parts

FAMILY = "one-step"
FORMAT_VERSION = 1


@dataclass
class OneStepConfig:
    """A one-step restorer's shape and its fixed timestep (OSEDiff: t* = 999, epsilon prediction)."""

    mode: Literal["pixel", "latent"] = "pixel"
    size: int = 64
    timestep: int = 999  # t*: the LQ latent is taken as x_t at this timestep
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: PredictionType = "epsilon"
    pixel: PixelUNetConfig = field(default_factory=PixelUNetConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    colour_fix: bool = False  # the wavelet colour fix towards the LQ on the output (OSEDiff's optional `--align_method wavelet`)
    latent_sample: bool = True  # latent mode: z a sample of the encoder's posterior (OSEDiff); False: its mean
    eta: float = 0.0  # unused (one deterministic step); kept so every restorer config answers `eta`


class OneStepNet(nn.Module):
    """What training updates: the UNet, and (latent mode) the VAE encoder and its quant conv, as one module."""

    def __init__(self, unet: UNet2DModel | UNet2DConditionModel, vae: AutoencoderKL | None = None):
        super().__init__()
        self.unet = unet
        self.encoder = vae.encoder if vae is not None else None
        self.quant_conv = getattr(vae, "quant_conv", None) if vae is not None else None
        self.vae_config = dict(vae.config) if vae is not None else None

    def plain_copy(self) -> OneStepNet:
        """A fresh net of the same shapes with no LoRA adapters (its weights to be loaded), for saving a trained one."""
        vae = AutoencoderKL.from_config(self.vae_config) if self.vae_config is not None else None
        return OneStepNet(type(self.unet).from_config(self.unet.config), vae)

    def encode(self, x: Tensor, scaling_factor: float, noise: Tensor | None = None) -> Tensor:
        """[-1, 1] images -> the scaled latent: the posterior mean + std * `noise` (a sample; the mean without noise),
        as diffusers' DiagonalGaussianDistribution (log-variance clamped to [-30, 20]); pixels pass through."""
        if self.encoder is None:
            return x
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        if noise is not None:
            mean = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise.to(mean)
        return mean * scaling_factor

    def forward(self, z: Tensor, t: Tensor, prompt_embeds: Tensor | None = None) -> Tensor:
        if prompt_embeds is None:
            return self.unet(z, t).sample
        return self.unet(z, t, encoder_hidden_states=prompt_embeds).sample


def _pixel_unet(cfg: OneStepConfig) -> UNet2DModel:
    p = cfg.pixel
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in p.attention_levels]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(p.attention_levels)]
    return UNet2DModel(sample_size=cfg.size, in_channels=3, out_channels=3, block_out_channels=tuple(p.block_out_channels),
                       layers_per_block=p.layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
                       norm_num_groups=p.norm_num_groups)


class OneStepRestorer(nn.Module):
    """A one-step restorer: `restore(lq)` is one network call (docs/methods.md 0.1)."""

    family = FAMILY

    def __init__(self, config: OneStepConfig, scheduler: DDIMScheduler, net: OneStepNet, vae: AutoencoderKL | None = None,
                 prompt_embeds: Tensor | None = None):
        super().__init__()
        if not 0 <= config.timestep < scheduler.config.num_train_timesteps:
            raise ValueError(f"timestep must be in [0, {scheduler.config.num_train_timesteps}), got {config.timestep}")
        if config.mode == "latent" and (vae is None or prompt_embeds is None):
            raise ValueError("a latent one-step restorer needs a vae and prompt_embeds")
        self.config, self.scheduler, self.net, self.vae = config, scheduler, net, vae
        if prompt_embeds is not None:
            self.register_buffer("prompt_embeds", prompt_embeds.detach().clone(), persistent=False)
        else:
            self.prompt_embeds = None
        if vae is not None:
            vae.requires_grad_(False)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, config: OneStepConfig) -> OneStepRestorer:
        """A randomly initialised one-step restorer of the configured shape (tiny latent parts in latent mode), in eval mode."""
        scheduler = make_scheduler(config.beta_schedule, config.beta_start, config.beta_end, prediction_type=config.prediction_type)
        if config.mode == "pixel":
            return cls(config, scheduler, OneStepNet(_pixel_unet(config))).eval()
        if config.mode == "latent":
            from facereward.models.restorer import RestorerConfig

            vae, unet, _, prompt_embeds = _tiny_latent_parts(RestorerConfig(mode="latent", size=config.size, latent=config.latent))
            return cls(config, scheduler, OneStepNet(unet, vae), vae, prompt_embeds).eval()
        raise ValueError(f"mode must be 'pixel' or 'latent', got {config.mode!r}")

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def stage2_trainable(self) -> OneStepNet:
        """The network training updates (the UNet and, in latent mode, the VAE encoder)."""
        return self.net

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """The shape of x_t (the LQ's latent); one-step sampling draws no noise, but seeded callers ask."""
        if self.vae is None:
            return (batch, 3, height, width)
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (batch, self.vae.config.latent_channels, height // f, width // f)

    # ---- the one step -------------------------------------------------------------------
    def decode(self, z: Tensor) -> Tensor:
        """Latent (or [-1, 1] pixels) -> [0, 1] images, not clamped."""
        if self.vae is not None:
            z = self.vae.decode((z / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        return (z.float() + 1) / 2

    def forward_with_residuals(self, lq: Tensor, net: nn.Module | None = None,
                               noise: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """The differentiable restoration of a [0, 1] batch (not clamped) and the trained net's outputs [latent, UNet
        output] (ReFL's regulariser compares them with the initial network's). `net` replaces `self.net` (a trainer's
        wrapped copy, a frozen reference); `noise` (`latent_shape`) draws the posterior sample in latent mode (None:
        its mean)."""
        net = self.net if net is None else net
        scaling = self.vae.config.scaling_factor if self.vae is not None else 1.0
        inner = net.module if hasattr(net, "module") and isinstance(net.module, OneStepNet) else net
        dtype = next(inner.parameters()).dtype
        noise = noise if self.config.latent_sample else None
        z = inner.encode((lq * 2 - 1).to(dtype), scaling, noise)
        t = torch.full((lq.shape[0],), self.config.timestep, device=lq.device, dtype=torch.long)
        text = None if self.prompt_embeds is None else self.prompt_embeds.to(dtype).expand(lq.shape[0], -1, -1)
        out = net(z, t, text)
        abar = self.scheduler.alphas_cumprod.to(lq.device)[t].to(torch.float32)
        z0 = output_to_x0(out.float(), z.float(), abar, self.config.prediction_type)
        return self.decode(z0), [z, out]

    @torch.no_grad()
    def restore(self, lq: Tensor, steps: int = 1, eta: Any = None, generator: torch.Generator | None = None,
                x_T: Tensor | None = None, net: nn.Module | None = None, sampler: SamplerOptions | None = None) -> dict[str, Tensor]:
        """One step on a [0, 1] batch: {"clean": the LQ (there is no stage 1), "restored"}, both in [0, 1].

        `x_T` (else drawn from `generator`) is the posterior sample's noise in latent mode; the multi-step family's other
        arguments (steps, eta, spacing) do not apply. The colour fix defaults to the model's."""
        sampler = sampler or SamplerOptions()
        if self.vae is not None and self.config.latent_sample and x_T is None:
            b, _, h, w = lq.shape
            x_T = torch.randn(self.latent_shape(b, h, w), generator=generator, device=lq.device)
        restored, _ = self.forward_with_residuals(lq, net, noise=x_T if self.vae is not None else None)
        if self.config.colour_fix if sampler.colour_fix is None else sampler.colour_fix:
            restored = wavelet_colour_fix(restored, lq)
        return {"clean": lq.clamp(0, 1), "restored": restored.clamp(0, 1)}

    def sampling_settings(self, sampler: SamplerOptions | None = None) -> dict[str, Any]:
        """What a restore uses (for outputs' metadata): one step at t*, and the colour fix."""
        sampler = sampler or SamplerOptions()
        return {"one_step_timestep": self.config.timestep,
                "colour_fix": self.config.colour_fix if sampler.colour_fix is None else sampler.colour_fix}

    # ---- save / load ---------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, stage2: nn.Module | None = None, source: dict | None = None) -> None:
        """Write the restorer as one folder, staged beside it and moved in place. `stage2`: a trainer's plain copy of
        the trained net saved in place of `self.net`; `source` is recorded in facereward.json."""
        folder = Path(folder)
        net = stage2 if stage2 is not None else self.net
        tmp = staging_folder(folder)
        self.scheduler.save_pretrained(tmp / "scheduler")
        shard = {"max_shard_size": "1GB"}
        net.unet.save_pretrained(tmp / "unet", **shard)
        if self.vae is not None:
            vae = self.vae
            if net is not self.net:  # a plain VAE: the trained encoder (and quant conv), the decoder unchanged
                vae = AutoencoderKL.from_config(self.vae.config)
                state = {k: v for k, v in self.vae.state_dict().items() if not k.startswith(("encoder.", "quant_conv."))}
                state.update({f"encoder.{k}": v for k, v in net.encoder.state_dict().items()})
                if net.quant_conv is not None:
                    state.update({f"quant_conv.{k}": v for k, v in net.quant_conv.state_dict().items()})
                vae.load_state_dict(state)
            vae.save_pretrained(tmp / "vae", **shard)
            save_file({"prompt_embeds": self.prompt_embeds.detach().contiguous().cpu()}, tmp / "prompt_embeds.safetensors")
        meta = {"family": FAMILY, "format_version": FORMAT_VERSION, "config": asdict(self.config),
                **({"source": source} if source else {})}
        (tmp / "facereward.json").write_text(json.dumps(meta, indent=2))
        swap_in_folder(tmp, folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype | None = None) -> OneStepRestorer:
        """Load a folder written by `save_pretrained`, from a local path only; in eval mode."""
        from facereward.config import ConfigError, config_from_dict

        folder = Path(folder)
        meta_path = folder / "facereward.json"
        if not meta_path.is_file():
            raise ModelFolderError(f"{folder}: not a facereward restorer folder (no facereward.json)")
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("family") != FAMILY:
                raise ModelFolderError(f"{folder}: not a one-step restorer (family {meta.get('family', 'multi-step')!r})")
            if int(meta.get("format_version", 0)) > FORMAT_VERSION:
                raise ModelFolderError(f"{meta_path}: format version {meta['format_version']} is newer than this facereward supports")
            config = config_from_dict(OneStepConfig, meta["config"], f"{meta_path}: config")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, ConfigError) as err:
            if isinstance(err, ModelFolderError):
                raise
            raise ModelFolderError(f"{meta_path}: unreadable restorer config ({err})") from None
        needed = ["scheduler", "unet"] + (["vae", "prompt_embeds.safetensors"] if config.mode == "latent" else [])
        missing = [n for n in needed if not (folder / n).exists()]
        if missing:
            raise ModelFolderError(f"{folder}: incomplete one-step restorer folder, missing {', '.join(missing)}")
        kw: dict[str, Any] = {"local_files_only": True, **({"torch_dtype": torch_dtype} if torch_dtype is not None else {})}
        try:
            scheduler = DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
            if config.mode == "pixel":
                return cls(config, scheduler, OneStepNet(UNet2DModel.from_pretrained(folder / "unet", **kw))).eval()
            vae = AutoencoderKL.from_pretrained(folder / "vae", **kw)
            unet = UNet2DConditionModel.from_pretrained(folder / "unet", **kw)
            prompt_embeds = load_file(folder / "prompt_embeds.safetensors")["prompt_embeds"]
        except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
            raise ModelFolderError(f"{folder}: could not load restorer weights ({first})") from None
        return cls(config, scheduler, OneStepNet(unet, vae), vae, prompt_embeds).eval()


__all__ = ["FAMILY", "OneStepConfig", "OneStepNet", "OneStepRestorer"]
