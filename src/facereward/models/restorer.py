"""The DiffBIR-shaped restorer (docs/methods.md 0): stage-1 cleaner + conditional diffusion.

Modes:
- `pixel`: a UNet2DModel on [x_t, 2 C(lq) - 1] (concatenated channels) predicts eps in pixel space.
- `latent`: AutoencoderKL + frozen UNet2DConditionModel + trainable ControlNet that takes `cat(x_t, c)`, c the VAE
  latent of C(lq), in its first conv (DiffBIR's IRControlNet); the text condition is a stored embedding.

Sampling defaults travel with the model: the scheduler's config holds the timestep spacing and final alpha-bar,
`RestorerConfig` the default eta and whether the wavelet colour fix is applied (as DiffBIR does).

A saved restorer is one folder: `facereward.json`, `cleaner/`, `scheduler/`, and `unet/` (+ `vae/`,
`controlnet/`, `prompt_embeds.safetensors` in latent mode), each a diffusers folder or safetensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from facereward.atomic import staging_folder, swap_in_folder
from facereward.models.cleaner import build_cleaner
from facereward.models.colour_fix import wavelet_colour_fix
from facereward.models.controlnet import ConcatControlNetModel
from facereward.models.ddim import (
    PREDICTION_TYPES,
    DDIMSchedule,
    Eta,
    FinalAlphaBar,
    PredictionType,
    Spacing,
    make_scheduler,
    output_to_eps,
    rollout,
    scheduler_defaults,
)

FORMAT_VERSION = 2  # 2: the latent ControlNet takes cat(x_t, c) in its first conv (format 1: diffusers' embedding)


class ModelFolderError(ValueError):
    """A restorer folder that is missing, incomplete or of the wrong kind; one line naming it."""


@dataclass
class PixelUNetConfig:
    """UNet2DModel shape for pixel mode (small defaults for 64 px toy faces)."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 96])
    layers_per_block: int = 1
    attention_levels: list[bool] = field(default_factory=lambda: [False, False, True])
    norm_num_groups: int = 16


@dataclass
class LatentConfig:
    """Tiny-by-default latent-mode parts; real users build from a Stable Diffusion folder instead."""

    vae_block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    latent_channels: int = 4
    unet_block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    cross_attention_dim: int = 32
    attention_head_dim: int = 8
    prompt_length: int = 4
    norm_num_groups: int = 16


@dataclass
class RestorerConfig:
    mode: Literal["pixel", "latent"] = "pixel"
    size: int = 64
    cleaner: str = "residual_cnn"
    cleaner_kwargs: dict[str, Any] = field(default_factory=lambda: {"channels": 32, "num_blocks": 4, "downscale": 2})
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    pixel: PixelUNetConfig = field(default_factory=PixelUNetConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    eta: float = 0.0  # the default DDIM eta of `restore` (1.0 for DiffBIR: its spaced sampler is DDPM's)
    colour_fix: bool = False  # DiffBIR's wavelet colour fix on the output by default (on for imported DiffBIR)
    clamp_clean: bool = True  # stage-1 output clamped to [0, 1] before conditioning; False for imported DiffBIR, which does not
    prediction_type: PredictionType = "epsilon"  # what stage 2 outputs: epsilon, v_prediction or sample (x0)


def _pixel_unet(cfg: RestorerConfig) -> UNet2DModel:
    p = cfg.pixel
    if len(p.attention_levels) != len(p.block_out_channels):
        raise ValueError("pixel.attention_levels needs one entry per pixel.block_out_channels entry")
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in p.attention_levels]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(p.attention_levels)]
    return UNet2DModel(
        sample_size=cfg.size,
        in_channels=6,
        out_channels=3,
        block_out_channels=tuple(p.block_out_channels),
        layers_per_block=p.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=p.norm_num_groups,
    )


def _tiny_latent_parts(cfg: RestorerConfig) -> tuple[AutoencoderKL, UNet2DConditionModel, ConcatControlNetModel, torch.Tensor]:
    lc = cfg.latent
    n = len(lc.vae_block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(lc.vae_block_out_channels),
        latent_channels=lc.latent_channels,
        norm_num_groups=lc.norm_num_groups,
        layers_per_block=1,
        sample_size=cfg.size,
    )
    m = len(lc.unet_block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.size // 2 ** (n - 1),
        in_channels=lc.latent_channels,
        out_channels=lc.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (m - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (m - 1),
        block_out_channels=tuple(lc.unet_block_out_channels),
        layers_per_block=1,
        cross_attention_dim=lc.cross_attention_dim,
        attention_head_dim=lc.attention_head_dim,
        norm_num_groups=lc.norm_num_groups,
    )
    controlnet = ConcatControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(0)
    prompt_embeds = torch.randn(1, lc.prompt_length, lc.cross_attention_dim, generator=generator)
    return vae, unet, controlnet, prompt_embeds


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def empty_prompt_embedding(sd_folder: Path, prompt: str = "") -> torch.Tensor:
    """The text embedding of `prompt` from a local SD folder's tokenizer/ and text_encoder/ (computed once, stored)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(sd_folder / "tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(sd_folder / "text_encoder", local_files_only=True).eval()
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0].float()


@dataclass
class SamplerOptions:
    """Per-call overrides of a restorer's sampling defaults (docs/methods.md 0, "Sampling"); None keeps the model's."""

    spacing: Spacing | None = None  # leading, linspace (DiffBIR's spaced sampler) or trailing
    final_alpha_bar: FinalAlphaBar | None = None  # one, or first (alpha-bar_0: ldm's DDIM, both papers)
    colour_fix: bool | None = None  # DiffBIR's wavelet colour fix towards C(lq)

    def resolved(self, restorer: "Restorer") -> dict[str, Any]:
        """The settings a restore with these overrides uses (for outputs' metadata)."""
        if getattr(restorer, "family", "multi-step") != "multi-step":
            return restorer.sampling_settings(self)
        spacing, final = scheduler_defaults(restorer.scheduler)
        return {"spacing": self.spacing or spacing, "final_alpha_bar": self.final_alpha_bar or final,
                "colour_fix": restorer.config.colour_fix if self.colour_fix is None else self.colour_fix}


class Restorer(nn.Module):
    """Stage-1 cleaner + stage-2 conditional diffusion; `restore(lq)` runs both (the multi-step family; the one-step
    family is `facereward.models.onestep`, both behind `facereward.models.families.load_restorer`)."""

    family = "multi-step"

    def __init__(
        self,
        config: RestorerConfig,
        cleaner: nn.Module,
        scheduler: DDIMScheduler,
        unet: UNet2DModel | UNet2DConditionModel,
        vae: AutoencoderKL | None = None,
        controlnet: ConcatControlNetModel | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ):
        super().__init__()
        self.config = config
        self.cleaner = cleaner
        self.scheduler = scheduler
        self.unet = unet
        self.vae = vae
        self.controlnet = controlnet
        if config.mode == "latent":
            if vae is None or controlnet is None or prompt_embeds is None:
                raise ValueError("latent mode needs a vae, a controlnet and prompt_embeds")
            self.register_buffer("prompt_embeds", prompt_embeds.detach().clone(), persistent=False)
            self.vae.requires_grad_(False)
            self.unet.requires_grad_(False)
        else:
            self.prompt_embeds = None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, config: RestorerConfig) -> "Restorer":
        """A randomly initialised restorer of the configured shape, in eval mode (like a loaded one)."""
        if config.size % 8:
            raise ValueError(f"size must be a multiple of 8, got {config.size}")
        cleaner = build_cleaner(config.cleaner, config.cleaner_kwargs)
        scheduler = make_scheduler(config.beta_schedule, config.beta_start, config.beta_end,
                                   prediction_type=config.prediction_type)
        if config.mode == "pixel":
            return cls(config, cleaner, scheduler, _pixel_unet(config)).eval()
        if config.mode == "latent":
            vae, unet, controlnet, prompt_embeds = _tiny_latent_parts(config)
            return cls(config, cleaner, scheduler, unet, vae, controlnet, prompt_embeds).eval()
        raise ValueError(f"mode must be 'pixel' or 'latent', got {config.mode!r}")

    @classmethod
    def from_stable_diffusion(cls, sd_folder: str | Path, size: int = 512, config: RestorerConfig | None = None,
                              prompt: str = "") -> "Restorer":
        """A latent-mode restorer from a local diffusers Stable Diffusion folder (e.g. SD 2.1 base), as DiffBIR builds it.

        The VAE and UNet are taken as they are (frozen); the ControlNet is the UNet's encoder with 4 zero input
        channels added to its first conv for the condition latent, zero convs at 0; the prompt embedding is computed
        once. The cleaner is new (train it with `train-base`), and the noise schedule is read from scheduler/.
        """
        folder = Path(sd_folder)
        needed = ["vae", "unet", "text_encoder", "tokenizer", "scheduler"]
        if not folder.is_dir():
            raise ModelFolderError(f"{folder}: no such Stable Diffusion folder (it loads from a local path only)")
        missing = [n for n in needed if not (folder / n).is_dir()]
        if missing:
            raise ModelFolderError(f"{folder}: not a diffusers Stable Diffusion folder, missing {', '.join(missing)}")
        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
        sd_sched = DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
        if sd_sched.config.prediction_type not in PREDICTION_TYPES:
            raise ModelFolderError(f"{folder}: scheduler predicts {sd_sched.config.prediction_type!r}; facereward supports "
                                   f"{', '.join(PREDICTION_TYPES)}")
        config = config or RestorerConfig()
        config.mode, config.size, config.prediction_type = "latent", size, sd_sched.config.prediction_type
        config.beta_schedule, config.beta_start, config.beta_end = sd_sched.config.beta_schedule, sd_sched.config.beta_start, sd_sched.config.beta_end
        controlnet = ConcatControlNetModel.from_unet(unet, vae.config.latent_channels)
        scheduler = make_scheduler(config.beta_schedule, config.beta_start, config.beta_end, sd_sched.config.num_train_timesteps,
                                   prediction_type=config.prediction_type)
        cleaner = build_cleaner(config.cleaner, config.cleaner_kwargs)
        return cls(config, cleaner, scheduler, unet, vae, controlnet, empty_prompt_embedding(folder, prompt)).eval()

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def stage2_trainable(self) -> nn.Module:
        """The stage-2 network that training updates: the ControlNet (latent) or the UNet (pixel)."""
        return self.controlnet if self.mode == "latent" else self.unet

    # ---- spaces --------------------------------------------------------------------------
    def encode(self, image: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """[0, 1] images -> the diffusion space (pixels in [-1, 1], or scaled VAE latents: the posterior mean, or a sample)."""
        x = image * 2 - 1
        if self.mode == "pixel":
            return x
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        latent = dist.sample(generator) if sample else dist.mean
        return latent * self.vae.config.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion space -> [0, 1] images (not clamped, so gradients pass everywhere)."""
        if self.mode == "latent":
            z = self.vae.decode((z / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        return (z.float() + 1) / 2

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        if self.mode == "pixel":
            return (batch, 3, height, width)
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (batch, self.vae.config.latent_channels, height // f, width // f)

    # ---- the two stages -----------------------------------------------------------------
    def clean(self, lq: torch.Tensor) -> torch.Tensor:
        """Stage 1: C(lq), the image stage 2 is conditioned on: clamped to [0, 1] when `config.clamp_clean` (the toy
        bases), as it is for imported DiffBIR, which conditions on SwinIR's raw output (stage-1 training uses `cleaner`)."""
        clean = self.cleaner(lq)
        return clean.clamp(0, 1) if self.config.clamp_clean else clean

    def condition(self, clean: torch.Tensor) -> torch.Tensor:
        """Stage-2 condition from the cleaned image: pixels in [-1, 1] or the VAE latent of C(lq)."""
        return self.encode(clean)

    @property
    def prediction_type(self) -> PredictionType:
        """What the stage-2 network outputs (the scheduler config's `prediction_type`, so it travels with the model)."""
        return self.scheduler.config.prediction_type

    def predict_output(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, return_residuals: bool = False,
        net: nn.Module | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The stage-2 network's own output (eps, v or x0, `prediction_type`); with `return_residuals`, also the trained
        net's outputs (the ControlNet residuals, or [output] in pixel mode).

        `net` replaces the restorer's own stage-2 network for this call (a trainer's DDP/FSDP/DeepSpeed-wrapped
        copy, a frozen reference), as diffusers' ControlNet training passes its ControlNet to the UNet.
        """
        # An engine may hold the trained network in bf16 with no autocast around it (DeepSpeed): feed it its own dtype.
        if self.mode == "pixel":
            unet = self.unet if net is None else net
            dtype = _dtype_of(unet)
            out = unet(torch.cat([x_t, cond.to(x_t.dtype)], dim=1).to(dtype), t).sample
            out = out.to(x_t.dtype) if dtype != x_t.dtype else out
            return (out, [out]) if return_residuals else out
        text = self.prompt_embeds.to(x_t.dtype).expand(x_t.shape[0], -1, -1)
        control = self.controlnet if net is None else net
        dtype = _dtype_of(control)
        down, mid = control(x_t.to(dtype), t, encoder_hidden_states=text.to(dtype), controlnet_cond=cond.to(dtype),
                            return_dict=False)
        out = self.unet(x_t, t, encoder_hidden_states=text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        return (out, [*down, mid]) if return_residuals else out

    def predict_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, return_residuals: bool = False,
        net: nn.Module | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Noise prediction, whatever the network predicts (`output_to_eps`); residuals and `net` as `predict_output`."""
        out = self.predict_output(x_t, t, cond, return_residuals=return_residuals, net=net)
        out, residuals = out if return_residuals else (out, None)
        if self.prediction_type != "epsilon":
            out = output_to_eps(out, x_t, self.scheduler.alphas_cumprod.to(x_t.device)[t], self.prediction_type)
        return (out, residuals) if return_residuals else out

    def eps_fn(self, cond: torch.Tensor, net: nn.Module | None = None):
        """The denoiser with `cond` (and `net`, see `predict_eps`) bound, as the sampler takes it."""
        return lambda x_t, t: self.predict_eps(x_t, t, cond, net=net)

    def schedule(self, steps: int, spacing: Spacing | None = None, final_alpha_bar: FinalAlphaBar | None = None,
                 device: torch.device | str | None = None) -> DDIMSchedule:
        """The `steps`-step sampling schedule; spacing and final alpha-bar default to the model's (its scheduler config)."""
        return DDIMSchedule.from_scheduler(self.scheduler, steps, device=device or self.device, spacing=spacing,
                                           final_alpha_bar=final_alpha_bar)

    @torch.no_grad()
    def restore(
        self,
        lq: torch.Tensor,
        steps: int = 50,
        eta: Eta | None = None,
        generator: torch.Generator | None = None,
        x_T: torch.Tensor | None = None,
        net: nn.Module | None = None,
        sampler: SamplerOptions | None = None,
    ) -> dict[str, torch.Tensor]:
        """Both stages on a [0, 1] batch: {"clean": C(lq), "restored": the diffusion output}, both in [0, 1].

        `x_T` (the initial noise) is drawn from `generator` unless given; step noise always is. `net`: see `predict_eps`.
        `eta` and `sampler`'s settings default to the model's.
        """
        sampler = sampler or SamplerOptions()
        clean = self.clean(lq)
        cond = self.condition(clean)
        schedule = self.schedule(steps, sampler.spacing, sampler.final_alpha_bar, device=lq.device)
        if x_T is None:
            b, _, h, w = lq.shape
            x_T = torch.randn(self.latent_shape(b, h, w), generator=generator, device=lq.device, dtype=cond.dtype)
        eta = self.config.eta if eta is None else eta
        z0 = rollout(self.eps_fn(cond, net), x_T.to(self.unet.dtype), schedule, eta=eta, generator=generator, record=False)
        restored = self.decode(z0)
        if self.config.colour_fix if sampler.colour_fix is None else sampler.colour_fix:
            restored = wavelet_colour_fix(restored, clean)
        return {"clean": clean.clamp(0, 1), "restored": restored.clamp(0, 1)}

    # ---- save / load ---------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, stage2: nn.Module | None = None, source: dict | None = None) -> None:
        """Write the restorer as one folder; written beside and moved in place, so a crash leaves no half folder.

        `stage2` is saved in place of the restorer's own stage-2 network (a trainer's plain, LoRA-merged copy);
        `source` (where the weights came from) is recorded in facereward.json.
        """
        folder = Path(folder)
        tmp = staging_folder(folder)
        (tmp / "cleaner").mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in self.cleaner.state_dict().items()}, tmp / "cleaner" / "model.safetensors")
        self.scheduler.save_pretrained(tmp / "scheduler")
        # safetensors serialises a shard in memory: 1 GB shards keep an SD-size save near one copy of the weights
        shard = {"max_shard_size": "1GB"}
        (stage2 if stage2 is not None and self.mode == "pixel" else self.unet).save_pretrained(tmp / "unet", **shard)
        if self.mode == "latent":
            self.vae.save_pretrained(tmp / "vae", **shard)
            (stage2 if stage2 is not None else self.controlnet).save_pretrained(tmp / "controlnet", **shard)
            save_file({"prompt_embeds": self.prompt_embeds.detach().contiguous().cpu()}, tmp / "prompt_embeds.safetensors")
        meta = {"format_version": FORMAT_VERSION, "config": asdict(self.config), **({"source": source} if source else {})}
        (tmp / "facereward.json").write_text(json.dumps(meta, indent=2))
        swap_in_folder(tmp, folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype | None = None) -> "Restorer":
        """Load a folder written by `save_pretrained`, from a local path only; returned in eval mode."""
        from facereward.config import ConfigError, config_from_dict

        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFolderError(f"{folder}: no such model folder (restorers load from a local path only)")
        meta_path = folder / "facereward.json"
        if not meta_path.is_file():
            raise ModelFolderError(f"{folder}: not a facereward restorer folder (no facereward.json)")
        try:
            meta = json.loads(meta_path.read_text())
            version = int(meta.get("format_version", 0))
            if version > FORMAT_VERSION:
                raise ModelFolderError(f"{meta_path}: format version {version} is newer than this facereward supports")
            if version < 2:
                if meta["config"].get("mode") == "latent":
                    raise ModelFolderError(
                        f"{folder}: a format-{version} latent restorer (its ControlNet adds a learned condition embedding); "
                        "this facereward feeds the condition as DiffBIR does: rebuild it with `facereward build-restorer` "
                        "(or `facereward import-diffbir`) and retrain")
                meta["config"].get("latent", {}).pop("condition_embedding_channels", None)  # unused by pixel models
            config = config_from_dict(RestorerConfig, meta["config"], f"{meta_path}: config")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, ConfigError) as err:
            if isinstance(err, ModelFolderError):
                raise
            raise ModelFolderError(f"{meta_path}: unreadable restorer config ({err})") from None
        needed = ["cleaner/model.safetensors", "scheduler", "unet"]
        if config.mode == "latent":
            needed += ["vae", "controlnet", "prompt_embeds.safetensors"]
        missing = [n for n in needed if not (folder / n).exists()]
        if missing:
            raise ModelFolderError(f"{folder}: incomplete restorer folder, missing {', '.join(missing)}")
        kw: dict[str, Any] = {"local_files_only": True}
        if torch_dtype is not None:
            kw["torch_dtype"] = torch_dtype
        try:
            cleaner = build_cleaner(config.cleaner, config.cleaner_kwargs)
            cleaner.load_state_dict(load_file(folder / "cleaner" / "model.safetensors"))
            scheduler = DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
            if config.mode == "pixel":
                return cls(config, cleaner, scheduler, UNet2DModel.from_pretrained(folder / "unet", **kw)).eval()
            vae = AutoencoderKL.from_pretrained(folder / "vae", **kw)
            unet = UNet2DConditionModel.from_pretrained(folder / "unet", **kw)
            controlnet = ConcatControlNetModel.from_pretrained(folder / "controlnet", **kw)
            prompt_embeds = load_file(folder / "prompt_embeds.safetensors")["prompt_embeds"]
        except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
            raise ModelFolderError(f"{folder}: could not load restorer weights ({first})") from None
        return cls(config, cleaner, scheduler, unet, vae, controlnet, prompt_embeds).eval()
