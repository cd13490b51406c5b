"""The trainable part of a restorer for reward fine-tuning (ReFL, LRPO, NFT, DPO): full or LoRA, its frozen reference, saving.

Only the stage-2 network is trained (docs/methods.md 1.2, 2: the ControlNet in latent mode, the UNet in pixel
mode); the cleaner, VAE and frozen UNet never are. With LoRA (peft) the reference network is the same
module with its adapters switched off, so no second copy is held in memory.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from facereward.models.restorer import Restorer

DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"]


@dataclass
class LoraSettings:
    """rank 0 trains every weight of the stage-2 network; rank > 0 trains LoRA adapters on `target_modules`."""

    rank: int = 0
    alpha: float | None = None  # None: equal to rank (scale 1)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


def _tuner_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(module: nn.Module) -> bool:
    return bool(_tuner_layers(_unwrap(module)))


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module


def prepare_trainable(restorer: Restorer, lora: LoraSettings, gradient_checkpointing: bool = False) -> nn.Module:
    """Freeze the whole restorer except its stage-2 network (or LoRA adapters injected into it); returns that network.

    `gradient_checkpointing` turns on the network's own (diffusers) activation checkpointing.
    """
    if lora.rank < 0:
        raise ValueError(f"lora.rank must be >= 0, got {lora.rank}")
    restorer.requires_grad_(False)
    module = restorer.stage2_trainable()
    if gradient_checkpointing:
        if not getattr(module, "_supports_gradient_checkpointing", False):
            raise ValueError(f"run.gradient_checkpointing: the {type(module).__name__} does not support it")
        module.enable_gradient_checkpointing()
    if lora.rank == 0:
        module.requires_grad_(True)
        return module
    from peft import LoraConfig, inject_adapter_in_model

    names = {n.rsplit(".", 1)[-1] for n, _ in module.named_modules()} | {n for n, _ in module.named_modules()}
    unknown = [t for t in lora.target_modules if t not in names and not any(n.endswith("." + t) for n in names)]
    if unknown or not lora.target_modules:
        raise ValueError(f"lora.target_modules: no module named {unknown or '(empty list)'} in the {type(module).__name__}")
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
                        lora_dropout=lora.dropout, target_modules=list(lora.target_modules))
    module = inject_adapter_in_model(config, module)  # in place: the restorer's own network now carries the adapters
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    return module


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: the stage-2 network has no trainable parameters")
    return params


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` (unwrapped), frozen and in eval mode: the reference network of full training."""
    ref = copy.deepcopy(_unwrap(module))
    ref.requires_grad_(False)
    return ref.eval()


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block `module` computes its base (pre-LoRA) function; an error if it has no LoRA adapters."""
    layers = _tuner_layers(_unwrap(module))
    if not layers:
        raise ValueError("adapters_disabled needs a LoRA-trained module (lora.rank > 0)")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `module` with LoRA adapters merged into the base weights, in the plain (pre-LoRA) key layout."""
    module = _unwrap(module)
    layers = _tuner_layers(module)
    if not layers:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    for layer in layers:
        layer.merge()
    try:
        out = {}
        for key, value in module.state_dict().items():
            if "lora_" in key:
                continue
            out[key.replace(".base_layer.", ".")] = value.detach().clone()
        return out
    finally:
        for layer in layers:
            layer.unmerge()


def save_restorer(restorer: Restorer, folder: str | Path, net: nn.Module | None = None) -> None:
    """Save the restorer as a plain folder (LoRA merged, wrappers removed); loadable with `Restorer.from_pretrained`.

    `net` is the trained stage-2 network when it is not the restorer's own (a gathered copy, see `full_network`).
    """
    trained = _unwrap(net if net is not None else restorer.stage2_trainable())
    if hasattr(trained, "plain_copy"):  # a one-step net: its UNet and VAE encoder, rebuilt without adapters
        plain = trained.plain_copy()
    else:
        plain = type(trained).from_config(trained.config) if hasattr(trained, "config") else copy.deepcopy(trained)
    plain.load_state_dict(merged_state_dict(trained))
    ref = next(trained.parameters())
    plain.to(ref.device)
    if ref.dtype != torch.float32:
        plain.to(ref.dtype)
    restorer.save_pretrained(folder, stage2=plain)


class Reference:
    """The reference policy of a KL term: the LoRA-free base (no second copy in memory), or a frozen copy."""

    def __init__(self, restorer: Restorer, module: nn.Module, kind: str):
        self.restorer, self.module = restorer, module
        lora = has_lora(module)
        if kind == "auto":
            kind = "base" if lora else "copy"
        if kind == "base" and not lora:
            raise ValueError("kl_reference 'base' needs LoRA training (lora.rank > 0); use 'copy'")
        self.kind = kind
        self.copy = frozen_copy(module) if kind == "copy" else None

    @torch.no_grad()
    def eps(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The reference's noise prediction."""
        if self.copy is None:  # the restorer's own (unwrapped) network with its adapters off: no collectives, no grad
            with adapters_disabled(self.module):
                return self.restorer.predict_eps(x_t, t, cond, net=self.module)
        return self.restorer.predict_eps(x_t, t, cond, net=self.copy)

    @torch.no_grad()
    def output(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The reference's own output (eps, v or x0: the model's prediction type)."""
        if self.copy is None:
            with adapters_disabled(self.module):
                return self.restorer.predict_output(x_t, t, cond, net=self.module)
        return self.restorer.predict_output(x_t, t, cond, net=self.copy)
