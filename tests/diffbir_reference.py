"""Plain-torch reference of DiffBIR v1-face's original modules, for parity tests of the diffusers import.

Written from XPixelGroup/DiffBIR (``diffbir/model/{unet,controlnet,attention,util,vae,distributions,clip}.py``,
``diffbir/model/open_clip/{model,transformer,tokenizer}.py``, ``diffbir/sampler/spaced_sampler.py``,
``diffbir/utils/common.py``) and the ldm code they were taken from. Only the code paths DiffBIR v1's
``configs/inference/cldm.yaml`` uses are kept: float32, no checkpointing, no dropout (an ``nn.Identity`` sits where
the original has ``nn.Dropout`` so the ``Sequential`` indices, hence the key names, stay), vanilla attention.

Module and parameter NAMES are the original ones, so ``state_dict()`` keys (and counts) match the real files:

* ``ReferenceUNet``          = ``ControlledUnetModel``   -> ``model.diffusion_model.*`` of the SD 2.1 ldm checkpoint
* ``ReferenceAutoencoderKL`` = ldm ``AutoencoderKL``     -> ``first_stage_model.*``
* ``ReferenceOpenCLIPText``  = OpenCLIP ``CLIP`` without ``visual`` -> ``cond_stage_model.model.*``
* ``ReferenceControlNet``    = DiffBIR's ``ControlNet``  -> ``v1_face.pth`` (a bare state dict)

``TINY`` keeps every structural choice (and so the key counts) of ``REAL`` with tiny widths. The fabricators write
seeded random weights in the original file layouts; ``reference_from_files`` loads them back strictly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetConfig:
    """cldm.yaml ``unet_cfg`` / ``controlnet_cfg`` (use_spatial_transformer, use_linear_in_transformer, legacy False,
    conv_resample, no scale-shift norm, no resblock up/down; ``hint_channels`` is used by the ControlNet only)."""

    model_channels: int
    num_head_channels: int
    context_dim: int
    in_channels: int = 4
    out_channels: int = 4
    hint_channels: int = 4
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    transformer_depth: int = 1


@dataclass(frozen=True)
class VAEConfig:
    """cldm.yaml ``vae_cfg`` (ddconfig; attn_resolutions [] so the only attention is ``mid.attn_1``)."""

    ch: int
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4
    embed_dim: int = 4


@dataclass(frozen=True)
class TextConfig:
    """cldm.yaml ``clip_cfg`` (text_cfg + embed_dim); layer "penultimate"."""

    width: int
    heads: int
    layers: int
    embed_dim: int
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class DiffBIRConfig:
    unet: UNetConfig
    controlnet: UNetConfig
    vae: VAEConfig
    text: TextConfig
    latent_scale_factor: float = 0.18215


_TINY_UNET = UNetConfig(model_channels=32, num_head_channels=8, context_dim=32)
TINY = DiffBIRConfig(
    unet=_TINY_UNET,
    controlnet=_TINY_UNET,
    vae=VAEConfig(ch=32),
    text=TextConfig(width=32, heads=4, layers=24, embed_dim=32),
)
"""Real structure and key counts, tiny widths: 8x8 latents / 64x64 images run in well under a second."""

_REAL_UNET = UNetConfig(model_channels=320, num_head_channels=64, context_dim=1024)
REAL = DiffBIRConfig(
    unet=_REAL_UNET,
    controlnet=_REAL_UNET,
    vae=VAEConfig(ch=128),
    text=TextConfig(width=1024, heads=16, layers=24, embed_dim=1024),
)
"""configs/inference/cldm.yaml at full size (build it on ``torch.device("meta")`` to count keys cheaply)."""

# key counts of the original classes at the real config (== TINY, which keeps the structure)
UNET_KEYS = 686
CONTROLNET_KEYS = 324  # lllyasviel's ControlNet has 340: DiffBIR drops the 16 keys of input_hint_block
VAE_KEYS = 248
TEXT_KEYS = 294  # 24 resblocks x 12 + token_embedding, positional_embedding, ln_final (2), text_projection, logit_scale

SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
"""The persistent buffers ldm's ``DDPM.register_schedule`` adds to the LatentDiffusion state dict (float32)."""

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."

SOT_TOKEN = 49406  # "<start_of_text>": 256 byte tokens + 256 "</w>" tokens + 48894 merges come first
EOT_TOKEN = 49407  # "<end_of_text>"

# --------------------------------------------------------------------------------------------------------------------
# ldm building blocks (diffbir/model/util.py, unet.py, attention.py)
# --------------------------------------------------------------------------------------------------------------------


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """ldm's sinusoidal embedding: [cos(t f), sin(t f)], f_i = exp(-ln(max_period) i / half), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """util.normalization: GroupNorm(32, C), eps 1e-5, computed in float32."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class TimestepEmbedSequential(nn.Sequential):
    """Passes ``emb`` to ResBlocks and ``context`` to SpatialTransformers."""

    def forward(self, x, emb, context=None):  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(nn.Module):
    """unet.ResBlock without scale-shift norm or up/down: GN-SiLU-conv, + emb, GN-SiLU-(dropout)-conv, + skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Identity(), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class CrossAttention(nn.Module):
    """attention.CrossAttention: to_q/to_k/to_v without bias, to_out.0 with bias; softmax(q k^T / sqrt(d)) v."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.scale = dim_head**-0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attn = (q.float() @ k.float().transpose(-1, -2) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """attention.FeedForward with glu=True (gated_ff): net.0 = GEGLU(dim, 4 dim), net.2 = Linear(4 dim, dim)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention, GEGLU feed-forward; LayerNorm eps 1e-5."""

    def __init__(self, dim: int, n_heads: int, d_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """use_linear=True: GroupNorm(32, eps 1e-6) -> flatten -> proj_in Linear -> blocks -> proj_out Linear -> + x."""

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int, context_dim: int):
        super().__init__()
        inner = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, context_dim) for _ in range(depth)]
        )
        # the original writes nn.Linear(in_channels, inner_dim) here; in == inner for every SD layer
        self.proj_out = nn.Linear(in_channels, inner)

    def forward(self, x, context):
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x).reshape(b, c, h * w).transpose(1, 2)
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        x = self.proj_out(x)
        return x.transpose(1, 2).reshape(b, c, h, w) + x_in


def _attention(cfg: UNetConfig, ch: int) -> SpatialTransformer:
    heads = ch // cfg.num_head_channels  # num_head_channels given, legacy False
    return SpatialTransformer(ch, heads, cfg.num_head_channels, cfg.transformer_depth, cfg.context_dim)


def _build_encoder_half(module: nn.Module, cfg: UNetConfig, first_in: int) -> list[int]:
    """time_embed, input_blocks and middle_block as UNetModel/ControlNet build them; returns the skip channels."""
    mc = cfg.model_channels
    ted = mc * 4
    module.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
    module.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(first_in, mc, 3, padding=1))])
    chans = [mc]
    ch, ds = mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, ted, mult * mc)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                layers.append(_attention(cfg, ch))
            module.input_blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            module.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
            chans.append(ch)
            ds *= 2
    module.middle_block = TimestepEmbedSequential(ResBlock(ch, ted), _attention(cfg, ch), ResBlock(ch, ted))
    module._ds = ds
    module._ch = ch
    return chans


# --------------------------------------------------------------------------------------------------------------------
# UNet / ControlNet (diffbir/model/unet.py + controlnet.py)
# --------------------------------------------------------------------------------------------------------------------


class ReferenceUNet(nn.Module):
    """ldm UNetModel as DiffBIR's ControlledUnetModel; ``forward(x, timesteps, context, control=None)``."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, ted = cfg.model_channels, cfg.model_channels * 4
        chans = _build_encoder_half(self, cfg, cfg.in_channels)
        ch, ds = self._ch, self._ds
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + chans.pop(), ted, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(_attention(cfg, ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x, timesteps, context, control: Sequence[torch.Tensor] | None = None):
        """``control``: the ControlNet's 13 residuals (input-block order, middle last); not mutated."""
        emb = self.time_embed(timestep_embedding(_as_timesteps(timesteps, x), self.cfg.model_channels))
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        control = None if control is None else list(control)
        if control is not None:
            h = h + control.pop()
        for module in self.output_blocks:
            skip = hs.pop()
            if control is not None:
                skip = skip + control.pop()
            h = module(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h)


class ReferenceControlNet(nn.Module):
    """DiffBIR's ControlNet: the first conv takes ``cat(x, hint)``; one 1x1 zero conv per input block plus
    ``middle_block_out``; no ``input_hint_block``. ``forward(x, hint, timesteps, context)`` -> 13 residuals."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        chans = _build_encoder_half(self, cfg, cfg.in_channels + cfg.hint_channels)
        middle = self.middle_block
        del self.middle_block  # re-registered below, so the state-dict order is the original's
        # one per input block (built interleaved with them in the original): same channels, same order
        self.zero_convs = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(c, c, 1)) for c in chans])
        self.middle_block = middle
        self.middle_block_out = TimestepEmbedSequential(nn.Conv2d(self._ch, self._ch, 1))

    def forward(self, x, hint, timesteps, context) -> list[torch.Tensor]:
        emb = self.time_embed(timestep_embedding(_as_timesteps(timesteps, x), self.cfg.model_channels))
        h = torch.cat((x, hint), dim=1)
        outs = []
        for module, zero_conv in zip(self.input_blocks, self.zero_convs):
            h = module(h, emb, context)
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs


def _as_timesteps(t, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(t):
        t = torch.tensor(t)
    t = t.to(device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t


# --------------------------------------------------------------------------------------------------------------------
# VAE (diffbir/model/vae.py + distributions.py)
# --------------------------------------------------------------------------------------------------------------------


def _vae_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


def _swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """vae.ResnetBlock with temb_channels=0 (no temb_proj) and no conv_shortcut: 1x1 nin_shortcut when C changes."""

    def __init__(self, in_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = _vae_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _vae_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """vae.AttnBlock ("vanilla"): single head, 1x1 conv q/k/v/proj_out, scale C^-0.5."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _vae_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)  # b, hw, c
        w = torch.softmax(torch.bmm(q, k.reshape(b, c, hh * ww)) * (int(c) ** -0.5), dim=2)  # b, hw_q, hw_k
        out = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class VAEDownsample(nn.Module):
    """Asymmetric (0, 1, 0, 1) zero pad, then 3x3 stride-2 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_ch_mult = (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i_level in range(self.num_resolutions):
            block_in = cfg.ch * in_ch_mult[i_level]
            block_out = cfg.ch * cfg.ch_mult[i_level]
            down = nn.Module()
            down.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            down.attn = nn.ModuleList()  # attn_resolutions is empty
            if i_level != self.num_resolutions - 1:
                down.downsample = VAEDownsample(block_in)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in)
        self.norm_out = _vae_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)  # double_z

    def forward(self, x):
        h = self.conv_in(x)
        for i_level in range(self.num_resolutions):
            for i_block in range(self.num_res_blocks):
                h = self.down[i_level].block[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = self.down[i_level].downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in)
        ups: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = cfg.ch * cfg.ch_mult[i_level]
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            up.attn = nn.ModuleList()
            if i_level != 0:
                up.upsample = Upsample(block_in)
            ups.insert(0, up)  # up.0 is the full-resolution level, as in the original
        self.up = nn.ModuleList(ups)
        self.norm_out = _vae_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            for i_block in range(self.num_res_blocks + 1):
                h = self.up[i_level].block[i_block](h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class DiagonalGaussian:
    """distributions.DiagonalGaussianDistribution, the parts used: mean, clamped logvar, mode()."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        return self.mean + self.std * noise


class ReferenceAutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


# --------------------------------------------------------------------------------------------------------------------
# OpenCLIP text tower (diffbir/model/clip.py + open_clip/{model,transformer}.py)
# --------------------------------------------------------------------------------------------------------------------


class ResidualAttentionBlock(nn.Module):
    """open_clip ResidualAttentionBlock (no layer scale): x + attn(ln_1 x); x + mlp(ln_2 x); exact-erf GELU."""

    def __init__(self, d_model: int, n_head: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_2 = nn.LayerNorm(d_model)
        width = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(d_model, width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(width, d_model))

    def forward(self, x, attn_mask):  # x: (L, N, D), sequence first as in open_clip
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask.to(x.dtype))[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers)]
        )


class ReferenceOpenCLIPText(nn.Module):
    """FrozenOpenCLIPEmbedder's ``model`` (OpenCLIP CLIP, ``visual`` deleted), state-dict keys without the
    ``cond_stage_model.model.`` prefix. ``attn_mask`` is a non-persistent buffer, as in open_clip."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = _Transformer(cfg)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        mask = torch.empty(cfg.context_length, cfg.context_length).fill_(float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def encode(self, tokens: torch.Tensor, layer: str = "penultimate") -> torch.Tensor:
        """FrozenOpenCLIPEmbedder.encode_with_transformer: all resblocks but the last ("penultimate"), then
        ln_final over every token -> (B, 77, width). text_projection and logit_scale are not used."""
        skip = {"penultimate": 1, "last": 0}[layer]
        x = self.token_embedding(tokens) + self.positional_embedding
        x = x.permute(1, 0, 2)  # NLD -> LND
        for r in self.transformer.resblocks[: len(self.transformer.resblocks) - skip]:
            x = r(x, self.attn_mask)
        x = x.permute(1, 0, 2)
        return self.ln_final(x)


def empty_prompt_tokens(context_length: int = 77) -> torch.Tensor:
    """open_clip.tokenize(""): [<start_of_text>, <end_of_text>, 0, 0, ...] as int64, shape (1, 77)."""
    tokens = torch.zeros(1, context_length, dtype=torch.long)
    tokens[0, 0], tokens[0, 1] = SOT_TOKEN, EOT_TOKEN
    return tokens


# --------------------------------------------------------------------------------------------------------------------
# sampler and colour fix (diffbir/sampler/spaced_sampler.py, diffbir/utils/common.py)
# --------------------------------------------------------------------------------------------------------------------


def sd21_betas(num_timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> np.ndarray:
    """make_beta_schedule("linear", ...) as configs/inference/diffusion.yaml sets it: float64."""
    return np.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=np.float64) ** 2


def sd21_alphas_cumprod() -> np.ndarray:
    """float64 cumprod(1 - betas), what DiffBIR's Sampler keeps as ``training_alphas_cumprod``."""
    return np.cumprod(1.0 - sd21_betas(), axis=0)


def ldm_schedule_buffers(betas: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """The 12 persistent buffers of ldm DDPM.register_schedule (v_posterior 0), float64 maths, stored float32."""
    betas = sd21_betas() if betas is None else np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }
    assert tuple(values) == SCHEDULE_BUFFERS
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


def space_timesteps(num_timesteps: int, section_counts: str) -> set[int]:
    """guided-diffusion's respace.space_timesteps for comma-separated counts (DiffBIR passes str(num_steps))."""
    counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))  # accumulated float, rounded half-to-even, as in the original
            cur += stride
        start += size
    return set(steps)


def reference_spaced_sample(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    alphas_cumprod,
    num_steps: int,
    noises: Sequence[torch.Tensor],
    dtype: torch.dtype = torch.float64,
    model_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[int]]:
    """DiffBIR's SpacedSampler.sample, eps-parameterisation, no CFG, noise supplied per step.

    ``eps_fn(x, model_t)`` gets x as float32 and ``model_t`` as an int64 tensor of shape (B,) holding the ORIGINAL
    timestep (999, 979, ...); ``alphas_cumprod`` is the 1000-step training schedule (float64 preferred, as DiffBIR
    computes it from float64 betas). ``noises[i]`` is added at step i; the last step adds none, so ``noises`` may
    have ``num_steps`` or ``num_steps - 1`` entries. ``dtype`` is the arithmetic of the update: float64 (default)
    or float32, which reproduces DiffBIR's float32 buffers and float32 maths. ``model_dtype`` is what ``eps_fn`` gets and
    x_0 is returned in (float32 as DiffBIR; float64 for an exact comparison). Returns (x_0, timesteps descending).
    """
    if len(noises) not in (num_steps, num_steps - 1):
        raise ValueError(f"need {num_steps} (or {num_steps - 1}) noises, got {len(noises)}")
    ac_train = np.asarray(torch.as_tensor(alphas_cumprod).double().cpu().numpy(), dtype=np.float64)
    used = space_timesteps(len(ac_train), str(num_steps))
    betas, last = [], 1.0
    for i, ac in enumerate(ac_train):
        if i in used:
            betas.append(1 - ac / last)
            last = ac
    timesteps = sorted(used)
    betas = np.array(betas, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])

    def buf(v):
        return torch.tensor(v, dtype=dtype, device=x_T.device)

    sqrt_recip = buf(np.sqrt(1.0 / ac))
    sqrt_recipm1 = buf(np.sqrt(1.0 / ac - 1))
    post_var = buf(betas * (1.0 - ac_prev) / (1.0 - ac))
    coef1 = buf(betas * np.sqrt(ac_prev) / (1.0 - ac))
    coef2 = buf((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac))

    x = x_T.to(dtype)
    bs = x.shape[0]
    total = len(timesteps)
    descending = timesteps[::-1]
    for i, step in enumerate(descending):
        idx = total - i - 1
        model_t = torch.full((bs,), step, dtype=torch.long, device=x.device)
        eps = eps_fn(x.to(model_dtype), model_t).to(dtype)
        pred_x0 = sqrt_recip[idx] * x - sqrt_recipm1[idx] * eps
        mean = coef1[idx] * pred_x0 + coef2[idx] * x
        if idx != 0:
            x = mean + torch.sqrt(post_var[idx]) * noises[i].to(dtype)
        else:
            x = mean
    return x.to(model_dtype), [int(t) for t in descending]


def wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    """3x3 [1 2 1]^T[1 2 1]/16 blur, dilation ``radius``, replicate padding, per channel."""
    k = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]], dtype=image.dtype)
    c = image.shape[1]
    kernel = k.to(image.device)[None, None].repeat(c, 1, 1, 1)
    image = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(image, kernel, groups=c, dilation=radius)


def wavelet_decomposition(image: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the 5 band-pass levels, the residual low-pass), radii 1, 2, 4, 8, 16."""
    high = torch.zeros_like(image)
    low = image
    for i in range(levels):
        low = wavelet_blur(image, 2**i)
        high = high + (image - low)
        image = low
    return high, low


def reference_wavelet_reconstruction(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """DiffBIR's wavelet_reconstruction: content's high frequencies + style's low frequencies."""
    content_high, _ = wavelet_decomposition(content)
    _, style_low = wavelet_decomposition(style)
    return content_high + style_low


# --------------------------------------------------------------------------------------------------------------------
# fabricated checkpoints in the original layouts
# --------------------------------------------------------------------------------------------------------------------


def randomize_(module: nn.Module, generator: torch.Generator, gain: float = 1.0) -> nn.Module:
    """Overwrite EVERY parameter with seeded random values (zero convs and zero-initialised projections included):
    conv/linear weights N(0, gain^2 / fan_in), biases N(0, 0.05^2), norm weights 1 + N(0, 0.1^2), norm biases
    N(0, 0.05^2), embeddings N(0, 0.02^2) (positional N(0, 0.01^2)), text_projection N(0, 1 / width),
    logit_scale log(1/0.07) + N(0, 0.01^2). Deterministic for a given generator state and module structure."""

    def normal_(p: torch.Tensor, std: float, mean: float = 0.0):
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std + mean)

    done: set[int] = set()
    for _, m in module.named_modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            normal_(m.weight, 0.1, 1.0)
            normal_(m.bias, 0.05)
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            normal_(m.weight, gain / math.sqrt(m.weight[0].numel()))
            if m.bias is not None:
                normal_(m.bias, 0.05)
        elif isinstance(m, nn.MultiheadAttention):
            normal_(m.in_proj_weight, gain / math.sqrt(m.in_proj_weight.shape[1]))
            normal_(m.in_proj_bias, 0.05)
            done.update((id(m.in_proj_weight), id(m.in_proj_bias)))
            continue  # out_proj is an nn.Linear, reached on its own
        elif isinstance(m, nn.Embedding):
            normal_(m.weight, 0.02)
        else:
            continue
        done.update(id(p) for p in m.parameters(recurse=False))
    if isinstance(module, ReferenceOpenCLIPText):
        normal_(module.positional_embedding, 0.01)
        normal_(module.text_projection, module.cfg.width**-0.5)
        normal_(module.logit_scale, 0.01, float(np.log(1 / 0.07)))
        done.update(id(p) for p in (module.positional_embedding, module.text_projection, module.logit_scale))
    missed = [n for n, p in module.named_parameters() if id(p) not in done]
    assert not missed, f"parameters left unrandomized: {missed}"
    return module


def build_sd21_modules(config: DiffBIRConfig = TINY, seed: int = 0):
    """(unet, vae, text) with random weights from ``seed`` (the modules fabricate_sd21 writes)."""
    g = torch.Generator().manual_seed(seed)
    unet = randomize_(ReferenceUNet(config.unet), g)
    vae = randomize_(ReferenceAutoencoderKL(config.vae), g)
    text = randomize_(ReferenceOpenCLIPText(config.text), g)
    return unet.eval(), vae.eval(), text.eval()


def fabricate_sd21(
    path,
    seed: int = 0,
    fmt: str = "ckpt",
    config: DiffBIRConfig = TINY,
    schedule_buffers: bool = True,
    ema_counters: bool = True,
    global_step: int = 220000,
) -> dict[str, torch.Tensor]:
    """Write an SD 2.1 ldm checkpoint (v2-1_512-ema-pruned layout) with random weights; return its state dict.

    Keys: ``model.diffusion_model.*`` (686), ``first_stage_model.*`` (248), ``cond_stage_model.model.*`` (294, text
    tower only, no ``attn_mask``: it is non-persistent in open_clip), plus, by default, the 12 ldm schedule buffers
    (float32, from float64 maths) and the two scalar LitEma buffers ``model_ema.decay`` / ``model_ema.num_updates``
    that a LatentDiffusion state dict still holds once the EMA shadow weights are pruned. ``fmt="ckpt"`` saves
    ``{"state_dict": sd, "global_step": int}`` with torch.save (weights_only-loadable); ``"safetensors"`` saves the
    flat state dict."""
    unet, vae, text = build_sd21_modules(config, seed)
    sd: dict[str, torch.Tensor] = {}
    if schedule_buffers:
        sd.update(ldm_schedule_buffers())
    if ema_counters:
        sd["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
        sd["model_ema.num_updates"] = torch.tensor(global_step, dtype=torch.int32)
    for prefix, module in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), (TEXT_PREFIX, text)):
        sd.update({prefix + k: v.detach().clone().contiguous() for k, v in module.state_dict().items()})
    _save(sd, path, fmt, extra={"global_step": int(global_step)})
    return sd


def build_controlnet(config: DiffBIRConfig = TINY, seed: int = 1) -> ReferenceControlNet:
    g = torch.Generator().manual_seed(seed)
    return randomize_(ReferenceControlNet(config.controlnet), g).eval()


def fabricate_v1_face(path, seed: int = 1, config: DiffBIRConfig = TINY) -> dict[str, torch.Tensor]:
    """Write DiffBIR's ControlNet as v1_face.pth is: a bare state dict (324 keys) saved with torch.save."""
    sd = {k: v.detach().clone().contiguous() for k, v in build_controlnet(config, seed).state_dict().items()}
    _save(sd, path, "pth")
    return sd


def _save(sd: dict[str, torch.Tensor], path, fmt: str, extra: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    elif fmt == "ckpt":
        torch.save({"state_dict": sd, **(extra or {})}, path)
    elif fmt == "pth":
        torch.save(sd, path)
    else:
        raise ValueError(f"unknown fmt {fmt!r}")


def load_checkpoint(path) -> dict[str, torch.Tensor]:
    """Flat state dict of a .safetensors file or a torch file (unwrapping ``state_dict`` as DiffBIR does)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in sd:
        sd = sd["state_dict"]
    return sd


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------------------------------
# the assembled reference
# --------------------------------------------------------------------------------------------------------------------


class ReferenceDiffBIR:
    """ControlLDM's inference path: ``eps = unet(x_t, t, context, control=controlnet(x_t, c, t, context))``."""

    def __init__(self, unet, controlnet, vae, text, config: DiffBIRConfig = TINY, extras=None):
        self.unet, self.controlnet, self.vae, self.text = unet, controlnet, vae, text
        self.config = config
        self.scale_factor = config.latent_scale_factor
        self.extras: dict[str, torch.Tensor] = dict(extras or {})  # the checkpoint's non-module keys

    @torch.no_grad()
    def residuals(self, x_t, c, t, context) -> list[torch.Tensor]:
        return self.controlnet(x_t, c, t, context)

    @torch.no_grad()
    def eps(self, x_t, c, t, context) -> torch.Tensor:
        control = [r * 1.0 for r in self.residuals(x_t, c, t, context)]  # control_scales = [1.0] * 13
        return self.unet(x_t, t, context, control=control)

    @torch.no_grad()
    def condition(self, image01: torch.Tensor) -> torch.Tensor:
        """prepare_condition's c_img: 0.18215 * vae.encode(2 * image - 1).mode()."""
        return self.vae.encode(image01 * 2 - 1).mode() * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """vae_decode(z) = decode(z / 0.18215), mapped to [0, 1] by (x + 1) / 2 (not clamped)."""
        return (self.vae.decode(z / self.scale_factor) + 1) / 2

    @torch.no_grad()
    def prompt_embedding(self) -> torch.Tensor:
        return self.text.encode(empty_prompt_tokens(self.config.text.context_length))

    @torch.no_grad()
    def restore(self, image01, x_T, noises, num_steps: int, alphas_cumprod=None) -> torch.Tensor:
        """Pipeline.apply_cldm + run for one pre-cleaned image: condition, spaced sampling with the empty prompt
        (cfg 1, strength 1, start from ``x_T``), decode, wavelet colour fix against ``image01``. Not clamped."""
        c = self.condition(image01)
        ctx = self.prompt_embedding().expand(image01.shape[0], -1, -1)
        ac = sd21_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        z, _ = reference_spaced_sample(lambda x, t: self.eps(x, c, t, ctx), x_T, ac, num_steps, noises)
        return reference_wavelet_reconstruction(self.decode(z), image01)


def reference_from_files(sd_path, controlnet_path, config: DiffBIRConfig = TINY) -> ReferenceDiffBIR:
    """Load the SD 2.1 ldm checkpoint (.ckpt or .safetensors) and the ControlNet .pth strictly into the reference."""
    sd = load_checkpoint(sd_path)
    unet = ReferenceUNet(config.unet)
    vae = ReferenceAutoencoderKL(config.vae)
    text = ReferenceOpenCLIPText(config.text)
    unet.load_state_dict(_strip(sd, UNET_PREFIX), strict=True)
    vae.load_state_dict(_strip(sd, VAE_PREFIX), strict=True)
    text.load_state_dict(_strip(sd, TEXT_PREFIX), strict=True)
    controlnet = ReferenceControlNet(config.controlnet)
    controlnet.load_state_dict(load_checkpoint(controlnet_path), strict=True)
    extras = {k: v for k, v in sd.items() if not k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX))}
    modules = [m.eval() for m in (unet, controlnet, vae, text)]
    return ReferenceDiffBIR(*modules, config=config, extras=extras)


def count_keys(config: DiffBIRConfig = REAL) -> dict[str, int]:
    """State-dict key counts of the four modules, built on the meta device (no memory)."""
    with torch.device("meta"):
        modules = {
            "unet": ReferenceUNet(config.unet),
            "controlnet": ReferenceControlNet(config.controlnet),
            "vae": ReferenceAutoencoderKL(config.vae),
            "text": ReferenceOpenCLIPText(config.text),
        }
    return {k: len(m.state_dict()) for k, m in modules.items()}


__all__ = [
    "CONTROLNET_KEYS",
    "DiffBIRConfig",
    "REAL",
    "ReferenceAutoencoderKL",
    "ReferenceControlNet",
    "ReferenceDiffBIR",
    "ReferenceOpenCLIPText",
    "ReferenceUNet",
    "SCHEDULE_BUFFERS",
    "TEXT_KEYS",
    "TINY",
    "TextConfig",
    "UNET_KEYS",
    "UNetConfig",
    "VAEConfig",
    "VAE_KEYS",
    "build_controlnet",
    "build_sd21_modules",
    "count_keys",
    "empty_prompt_tokens",
    "fabricate_sd21",
    "fabricate_v1_face",
    "ldm_schedule_buffers",
    "load_checkpoint",
    "randomize_",
    "reference_from_files",
    "reference_spaced_sample",
    "reference_wavelet_reconstruction",
    "sd21_alphas_cumprod",
    "sd21_betas",
    "space_timesteps",
    "timestep_embedding",
]
