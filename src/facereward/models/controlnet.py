"""DiffBIR's IRControlNet as a diffusers ControlNet: the condition latent enters through the first conv (docs/methods.md 0).

DiffBIR feeds `cat(x_t, c)` (4 + 4 channels) to the ControlNet's first convolution, with no hint network; a stock
`ControlNetModel` instead adds a learned embedding of the condition after an x_t-only `conv_in`. The subclass here
keeps everything else of diffusers' model (blocks, zero convs, saving, loading, LoRA targets) and replaces the
embedding with a parameterless module that adds nothing, so its `conv_in` is DiffBIR's `input_blocks.0.0`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn


class NoConditioningEmbedding(nn.Module):
    """Stands where ControlNetModel's condition embedding was: no parameters, adds zero."""

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return cond.new_zeros(())


class ConcatControlNetModel(ControlNetModel):
    """A ControlNet whose `conv_in` takes `cat(x_t, controlnet_cond)`; `in_channels` counts both (8 for SD latents)."""

    @functools.wraps(ControlNetModel.__init__)  # diffusers reads the config keys from this signature
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.controlnet_cond_embedding = NoConditioningEmbedding()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, **kwargs: Any):
        """ControlNetModel.forward with x_t and the condition latent concatenated on channels first."""
        return super().forward(torch.cat([sample, controlnet_cond.to(sample.dtype)], dim=1), timestep,
                               encoder_hidden_states, controlnet_cond, **kwargs)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, condition_channels: int | None = None) -> "ConcatControlNetModel":
        """DiffBIR's initialisation: the UNet's encoder copied, `condition_channels` zero input channels appended to the
        first conv (so it starts as the UNet's), zero convs at 0 (diffusers' default)."""
        cfg = unet.config
        extra = cfg.in_channels if condition_channels is None else condition_channels
        controlnet = cls(
            in_channels=cfg.in_channels + extra,
            conditioning_channels=extra,
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
            down_block_types=cfg.down_block_types,
            only_cross_attention=cfg.only_cross_attention,
            block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.layers_per_block,
            downsample_padding=cfg.downsample_padding,
            mid_block_scale_factor=cfg.mid_block_scale_factor,
            act_fn=cfg.act_fn,
            norm_num_groups=cfg.norm_num_groups,
            norm_eps=cfg.norm_eps,
            cross_attention_dim=cfg.cross_attention_dim,
            transformer_layers_per_block=cfg.transformer_layers_per_block,
            attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads,
            use_linear_projection=cfg.use_linear_projection,
            upcast_attention=cfg.upcast_attention,
            resnet_time_scale_shift=cfg.resnet_time_scale_shift,
            mid_block_type=cfg.mid_block_type,
            conditioning_embedding_out_channels=(16,),
        )
        with torch.no_grad():
            weight = unet.conv_in.weight
            controlnet.conv_in.weight.copy_(torch.cat([weight, weight.new_zeros(weight.shape[0], extra, *weight.shape[2:])], 1))
            controlnet.conv_in.bias.copy_(unet.conv_in.bias)
        for name in ("time_proj", "time_embedding", "down_blocks", "mid_block"):
            getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
        return controlnet
