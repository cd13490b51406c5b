"""DiffBIR v1-face from its own files as a facereward restorer folder (docs/methods.md 0).

Inputs: Stable Diffusion 2.1 (an ldm `.ckpt`/`.safetensors` such as `v2-1_512-ema-pruned.ckpt`, or a diffusers
folder), DiffBIR's IRControlNet state dict (`v1_face.pth`, or a fine-tuned one of the same layout: DiffusionReward's,
LRPO's), and the face SwinIR (`face_swinir_v1.ckpt`). Keys are mapped by diffusers' single-file converters with
configs read from the tensors' shapes (no hub look-up); what they cannot do (reading the configs, DiffBIR's
concatenated first conv, the OpenCLIP text tower's penultimate layer, strictness) is done here.

Loading is strict: every tensor of a file is used or known to be unused (the schedule buffers, the text tower's last
layer and projection, which SD 2's penultimate-layer conditioning never reads), and every weight of the target
modules is filled with the right shape. Modules are built on the meta device and take the (memory-mapped) tensors
by assignment, so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from torch import nn

from facereward.models.checkpoint_io import CheckpointError, read_state_dict
from facereward.models.controlnet import ConcatControlNetModel
from facereward.models.ddim import make_scheduler
from facereward.models.restorer import ModelFolderError, Restorer, RestorerConfig, empty_prompt_embedding
from facereward.models.swinir import SwinIR, swinir_config_from_state_dict, swinir_from_state_dict

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."
LATENT_SCALE = 0.18215  # DiffBIR's latent_scale_factor (SD's)
EMPTY_PROMPT_START, EMPTY_PROMPT_END = 49406, 49407  # OpenCLIP's start/end-of-text ids; "" is [start, end, 0, 0, ...]
# Buffers of ldm's LatentDiffusion that are not weights (the noise schedule and training state).
_LDM_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar",
    "model_ema.decay", "model_ema.num_updates", "scale_factor",
}
_TEXT_KEY = re.compile(r"^(token_embedding\.weight|positional_embedding|ln_final\.(weight|bias)|text_projection|logit_scale|"
                       r"attn_mask|transformer\.resblocks\.\d+\.(ln_1|ln_2|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)|"
                       r"transformer\.resblocks\.\d+\.attn\.in_proj_(weight|bias))$")


def _names(keys: list[str], limit: int = 3) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _indices(sd: dict[str, torch.Tensor], prefix: str) -> list[int]:
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return sorted(found)


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ---- configs from shapes ---------------------------------------------------------------------------------------
def ldm_unet_structure(sd: dict[str, torch.Tensor], path: Path, what: str) -> dict:
    """Channels, levels, res blocks per level, attention levels, context width, projection kind of an ldm UNet encoder."""
    try:
        first = sd["input_blocks.0.0.weight"]
        blocks = _indices(sd, "input_blocks.")
        downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in sd]
        levels = len(downs) + 1
        if (len(blocks) - 1 - len(downs)) % levels:
            raise KeyError("input_blocks")
        per_level = (len(blocks) - 1 - len(downs)) // levels
        mults, attention, context, linear, depth = [], [], None, None, 1
        i = 1
        for level in range(levels):
            mults.append(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // first.shape[0])
            has_attn = f"input_blocks.{i}.1.proj_in.weight" in sd
            attention.append(has_attn)
            if has_attn and context is None:
                context = sd[f"input_blocks.{i}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
                linear = sd[f"input_blocks.{i}.1.proj_in.weight"].ndim == 2
                depth = len(_indices(sd, f"input_blocks.{i}.1.transformer_blocks."))
            i += per_level + (1 if level < levels - 1 else 0)
    except KeyError as err:
        raise CheckpointError(f"{path}: not an ldm {what} (no {err.args[0]} where the layout needs it)") from None
    return {"model_channels": first.shape[0], "in_channels": first.shape[1], "mults": mults, "per_level": per_level,
            "attention": attention, "context": context, "linear": linear, "depth": depth}


def check_sd21_structure(s: dict, path: Path, what: str = "UNet") -> None:
    """DiffBIR v1 stands on SD 2.1: 4 levels, 2 res blocks, attention on the first 3, linear projections, 1024-wide text."""
    if s["context"] == 768 or s["linear"] is False:
        raise CheckpointError(f"{path}: a Stable Diffusion 1.x {what} (context width {s['context']}, convolutional projections); "
                              "DiffBIR v1 needs SD 2.1 (v2-1_512-ema-pruned.ckpt)")
    if len(s["mults"]) != 4 or s["per_level"] != 2 or s["attention"] != [True, True, True, False] or not s["linear"]:
        raise CheckpointError(f"{path}: not the SD 2.1 {what} layout (levels {s['mults']}, {s['per_level']} res blocks, "
                              f"attention {s['attention']})")


def unet_config(s: dict, size: int, head_channels: int, in_channels: int | None = None) -> dict:
    """A diffusers UNet2DConditionModel config for an ldm UNet of structure `s` (diffusers' "attention_head_dim" holds heads)."""
    channels = [s["model_channels"] * m for m in s["mults"]]
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in s["attention"]]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(s["attention"])]
    return {
        "sample_size": size // 8, "in_channels": in_channels or s["in_channels"], "out_channels": 4,
        "down_block_types": down, "up_block_types": up, "block_out_channels": channels,
        "layers_per_block": s["per_level"], "cross_attention_dim": s["context"],
        "attention_head_dim": [max(1, c // head_channels) for c in channels], "use_linear_projection": bool(s["linear"]),
        "transformer_layers_per_block": s["depth"], "norm_num_groups": 32,
    }


def vae_config(sd: dict[str, torch.Tensor], size: int, path: Path) -> dict:
    """A diffusers AutoencoderKL config for an ldm first-stage state dict (keys without the prefix)."""
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = _indices(sd, "encoder.down.")
        mults = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels]
        per_level = len(_indices(sd, "encoder.down.0.block."))
        z = sd["decoder.conv_in.weight"].shape[1]
    except KeyError as err:
        raise CheckpointError(f"{path}: not an ldm VAE (no {VAE_PREFIX}{err.args[0]})") from None
    if any(k.startswith("encoder.down.") and ".attn." in k for k in sd):
        raise CheckpointError(f"{path}: a VAE with attention in its down blocks; SD's has none")
    return {
        "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * len(mults),
        "up_block_types": ["UpDecoderBlock2D"] * len(mults), "block_out_channels": [ch * m for m in mults],
        "layers_per_block": per_level, "latent_channels": z, "norm_num_groups": 32, "sample_size": size,
        "scaling_factor": LATENT_SCALE,
    }


# ---- strict loading ---------------------------------------------------------------------------------------------
def _storage_ids(tensors) -> set[tuple[int, int]]:
    return {(t.untyped_storage().data_ptr(), t.storage_offset()) for t in tensors if isinstance(t, torch.Tensor)}


def unconsumed(source: dict[str, torch.Tensor], converted: dict[str, torch.Tensor | None]) -> list[str]:
    """Source keys whose tensor (or a view of it) is not among the converted ones (the converters rename, not copy)."""
    used = _storage_ids(converted.values())
    return [k for k, v in source.items() if (v.untyped_storage().data_ptr(), v.storage_offset()) not in used]


def load_strict(module: nn.Module, converted: dict[str, torch.Tensor | None], path: Path, what: str,
                source: dict[str, torch.Tensor] | None = None, prefix: str = "") -> nn.Module:
    """Fill `module` (built on the meta device) with exactly `converted`: missing, unexpected or mis-shaped is one line.

    With `source` (the file's tensors before renaming), unexpected and mis-shaped keys are named as the file has them."""
    expected = module.state_dict()
    origin = {(v.untyped_storage().data_ptr(), v.storage_offset()): prefix + k for k, v in (source or {}).items()}

    def name(k: str) -> str:
        v = converted[k]
        found = origin.get((v.untyped_storage().data_ptr(), v.storage_offset())) if v is not None else None
        return f"{found} (-> {k})" if found else k

    missing = [k for k in expected if converted.get(k) is None]
    unexpected = [name(k) for k in converted if k not in expected]
    wrong = [f"{name(k)} {tuple(converted[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
             if converted.get(k) is not None and tuple(converted[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        problem = (f"missing {_names(missing)} (as diffusers names them)" if missing else
                   f"unexpected {_names(unexpected)}" if unexpected else f"mis-shaped {_names(wrong)}")
        raise CheckpointError(f"{path}: does not fit the {what} ({problem})")
    module.load_state_dict({k: v.float().contiguous() for k, v in converted.items()}, strict=True, assign=True)
    return module.eval()


def _strict_source(source: dict[str, torch.Tensor], converted: dict, path: Path, prefix: str, what: str) -> None:
    left = unconsumed(source, converted)
    if left:
        raise CheckpointError(f"{path}: {what} tensors the layout does not use: {_names([prefix + k for k in left])}")


def _build(cls: Callable[..., nn.Module], config: dict) -> nn.Module:
    with init_empty_weights():
        return cls(**config)


# ---- the three files --------------------------------------------------------------------------------------------
def _split_sd(sd: dict[str, torch.Tensor], path: Path) -> tuple[dict, dict, dict]:
    if any(k.startswith("conditioner.") for k in sd):
        raise CheckpointError(f"{path}: an SDXL-style checkpoint (conditioner.* keys); DiffBIR v1 needs SD 2.1")
    if any(k.startswith("cond_stage_model.transformer.") for k in sd):
        raise CheckpointError(f"{path}: a Stable Diffusion 1.x checkpoint (CLIP ViT-L text encoder); DiffBIR v1 needs SD 2.1")
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        hint = " (it looks like a ControlNet: pass it as --controlnet)" if "zero_convs.0.0.weight" in sd else ""
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint, no {UNET_PREFIX}* keys{hint}")
    parts = (_sub(sd, UNET_PREFIX), _sub(sd, VAE_PREFIX), _sub(sd, TEXT_PREFIX))
    for name, part in zip(("VAE", "text encoder"), parts[1:]):
        if not part:
            raise CheckpointError(f"{path}: a Stable Diffusion checkpoint without its {name} "
                                  f"({VAE_PREFIX if name == 'VAE' else TEXT_PREFIX}* keys)")
    known = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)
    other = [k for k in sd if not k.startswith(known) and k not in _LDM_BUFFERS]
    if other:
        raise CheckpointError(f"{path}: tensors a Stable Diffusion 2.1 checkpoint does not have: {_names(other)}")
    if "alphas_cumprod" in sd:
        ours = make_scheduler().alphas_cumprod
        theirs = sd["alphas_cumprod"].double()
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours.double(), atol=1e-5):
            raise CheckpointError(f"{path}: its noise schedule (alphas_cumprod) is not SD 2.1's scaled-linear 0.00085-0.012")
    return parts


def _prompt_from_openclip(text: dict[str, torch.Tensor], path: Path, head_channels: int) -> torch.Tensor:
    """The empty prompt through the OpenCLIP text tower's penultimate layer and final norm, as SD 2 and DiffBIR condition."""
    from transformers import CLIPTextConfig, CLIPTextModel

    bad = [TEXT_PREFIX + k for k in text if not _TEXT_KEY.match(k)]
    if bad:
        raise CheckpointError(f"{path}: text-encoder tensors an OpenCLIP text tower does not have: {_names(bad)}")
    try:
        vocab, width = text["token_embedding.weight"].shape
        layers = len(_indices(text, "transformer.resblocks."))
        config = CLIPTextConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=text["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=layers - 1, num_attention_heads=max(1, width // head_channels),
            max_position_embeddings=text["positional_embedding"].shape[0], hidden_act="gelu", layer_norm_eps=1e-5,
            projection_dim=width)
    except KeyError as err:
        raise CheckpointError(f"{path}: not an OpenCLIP text tower (no {TEXT_PREFIX}{err.args[0]})") from None
    # The last resblock, the projection and the logit scale are never read by penultimate-layer conditioning.
    unused = re.compile(rf"^(transformer\.resblocks\.{layers - 1}\..*|text_projection|logit_scale|attn_mask)$")
    used = {TEXT_PREFIX + k: v for k, v in text.items() if not unused.match(k)}
    model = _build(CLIPTextModel, {"config": config})
    converted = sfu.convert_open_clip_checkpoint(model, used, prefix=TEXT_PREFIX)
    # transformers 5 keeps CLIPTextModel's layers at the top level; diffusers' converter writes the older text_model.*
    flat = not any(k.startswith("text_model.") for k in model.state_dict())
    converted = {(k.removeprefix("text_model.") if flat else k): v for k, v in converted.items()
                 if not k.endswith("embeddings.position_ids")}
    load_strict(model, converted, path, "OpenCLIP text tower", text, TEXT_PREFIX)
    ids = torch.zeros(1, config.max_position_embeddings, dtype=torch.long)
    ids[0, 0], ids[0, 1] = EMPTY_PROMPT_START, EMPTY_PROMPT_END
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state.float()


def load_sd21(path: Path, size: int, head_channels: int = 64) -> tuple[UNet2DConditionModel, AutoencoderKL, torch.Tensor, dict]:
    """(UNet, VAE, empty-prompt embedding, UNet structure) of SD 2.1 from an ldm file or a diffusers folder."""
    if path.is_dir():
        missing = [n for n in ("unet", "vae", "text_encoder", "tokenizer") if not (path / n).is_dir()]
        if missing:
            raise ModelFolderError(f"{path}: not a diffusers Stable Diffusion folder, missing {', '.join(missing)}")
        unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True).eval()
        vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True).eval()
        if unet.config.cross_attention_dim == 768 or not unet.config.use_linear_projection:
            raise ModelFolderError(f"{path}: a Stable Diffusion 1.x folder (cross-attention width {unet.config.cross_attention_dim}, "
                                   "convolutional projections); DiffBIR v1 needs SD 2.1")
        structure = {"model_channels": unet.config.block_out_channels[0], "in_channels": unet.config.in_channels}
        return unet, vae, empty_prompt_embedding(path), structure
    sd = read_state_dict(path, what="Stable Diffusion checkpoint")
    unet_sd, vae_sd, text_sd = _split_sd(sd, path)
    structure = ldm_unet_structure(unet_sd, path, "UNet")
    check_sd21_structure(structure, path)
    if structure["in_channels"] != 4:
        raise CheckpointError(f"{path}: a UNet with {structure['in_channels']} input channels (an inpainting or depth model?); "
                              "DiffBIR v1 needs SD 2.1 base")
    config = unet_config(structure, size, head_channels)
    unet_in = {UNET_PREFIX + k: v for k, v in unet_sd.items()}
    converted = sfu.convert_ldm_unet_checkpoint(unet_in, config)
    _strict_source(unet_sd, converted, path, UNET_PREFIX, "UNet")
    unet = load_strict(_build(UNet2DConditionModel, config), converted, path, "SD 2.1 UNet", unet_sd, UNET_PREFIX)
    vcfg = vae_config(vae_sd, size, path)
    converted = sfu.convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in vae_sd.items()}, vcfg)
    _strict_source(vae_sd, converted, path, VAE_PREFIX, "VAE")
    vae = load_strict(_build(AutoencoderKL, vcfg), converted, path, "SD 2.1 VAE", vae_sd, VAE_PREFIX)
    prompt = _prompt_from_openclip(text_sd, path, head_channels)
    return unet, vae, prompt, structure


def load_irc_controlnet(path: Path, unet: UNet2DConditionModel, size: int, head_channels: int = 64) -> ConcatControlNetModel:
    """DiffBIR's IRControlNet (`v1_face.pth` layout, or a fine-tuned one) as a ConcatControlNetModel beside `unet`."""
    sd = read_state_dict(path, what="ControlNet checkpoint")
    for prefix in ("control_model.", "controlnet."):
        if any(k.startswith(prefix) for k in sd) and not any(k.startswith(UNET_PREFIX) for k in sd):
            sd = _sub(sd, prefix)
    if any(k.startswith(UNET_PREFIX) or k.startswith("output_blocks.") for k in sd):
        raise CheckpointError(f"{path}: a UNet or full Stable Diffusion checkpoint, not a ControlNet (pass it as --sd)")
    if any(k.startswith("input_hint_block.") for k in sd):
        raise CheckpointError(f"{path}: an image-hint ControlNet (input_hint_block), not DiffBIR's IRControlNet")
    if "zero_convs.0.0.weight" not in sd or "middle_block_out.0.weight" not in sd:
        raise CheckpointError(f"{path}: not a DiffBIR ControlNet (no zero_convs / middle_block_out)")
    structure = ldm_unet_structure(sd, path, "ControlNet")
    latent = unet.config.in_channels
    if structure["in_channels"] != 2 * latent:
        raise CheckpointError(f"{path}: the ControlNet's first conv takes {structure['in_channels']} channels, "
                              f"not {2 * latent} (x_t and the condition latent concatenated)")
    config = unet_config(structure, size, head_channels, in_channels=2 * latent)
    ucfg = unet.config
    if list(config["block_out_channels"]) != list(ucfg.block_out_channels) or config["cross_attention_dim"] != ucfg.cross_attention_dim:
        raise CheckpointError(f"{path}: a ControlNet for another UNet (channels {config['block_out_channels']}, "
                              f"context {config['cross_attention_dim']}; the UNet has {list(ucfg.block_out_channels)}, "
                              f"{ucfg.cross_attention_dim})")
    converted = sfu.convert_controlnet_checkpoint(sd, {"layers_per_block": structure["per_level"]})
    _strict_source(sd, converted, path, "", "ControlNet")
    cn_config = {k: v for k, v in config.items() if k not in ("sample_size", "out_channels", "up_block_types")}
    cn_config.update(conditioning_channels=latent, conditioning_embedding_out_channels=[16])
    return load_strict(_build(ConcatControlNetModel, cn_config), converted, path, "IRControlNet", sd)


def load_face_swinir(path: Path) -> tuple[SwinIR, dict]:
    """The stage-1 SwinIR from its checkpoint, its config read from the tensors' shapes."""
    sd = read_state_dict(path, what="SwinIR checkpoint")
    if any(k.startswith(UNET_PREFIX) for k in sd) or "zero_convs.0.0.weight" in sd:
        raise CheckpointError(f"{path}: a diffusion checkpoint, not a SwinIR (pass it as --sd or --controlnet)")
    config = swinir_config_from_state_dict(sd, path)
    return swinir_from_state_dict(sd, path, **config), config


def import_diffbir(out: str | Path, sd: str | Path, controlnet: str | Path, swinir: str | Path, size: int = 512,
                   head_channels: int = 64, progress: bool = True) -> Restorer:
    """Convert the three files and write the restorer folder `out` (only once everything has loaded)."""
    from tqdm.auto import tqdm

    if size % 64:
        raise ValueError(f"--size must be a multiple of 64 (SwinIR's pixel-unshuffle and windows), got {size}")
    sd, controlnet, swinir = Path(sd), Path(controlnet), Path(swinir)
    for option, path in (("--sd", sd), ("--controlnet", controlnet), ("--swinir", swinir)):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file ({option}; weights load from a local path only)")
    bar = tqdm(total=4, desc="import-diffbir", disable=not progress, unit="part")
    try:
        bar.set_postfix_str("Stable Diffusion 2.1")
        unet, vae, prompt, _ = load_sd21(sd, size, head_channels)
        bar.update()
        bar.set_postfix_str("IRControlNet")
        control = load_irc_controlnet(controlnet, unet, size, head_channels)
        bar.update()
        bar.set_postfix_str("SwinIR")
        cleaner, cleaner_config = load_face_swinir(swinir)
        bar.update()
        config = RestorerConfig(mode="latent", size=size, cleaner="swinir", cleaner_kwargs=cleaner_config,
                                beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, eta=1.0, colour_fix=True,
                                clamp_clean=False)  # DiffBIR conditions on the raw SwinIR output
        scheduler = make_scheduler(config.beta_schedule, config.beta_start, config.beta_end, spacing="linspace",
                                   final_alpha_bar="one")
        restorer = Restorer(config, cleaner, scheduler, unet, vae, control, prompt).eval()
        bar.set_postfix_str(f"writing {out}")
        restorer.save_pretrained(out, source={"imported": "DiffBIR v1-face", "sd": sd.name, "controlnet": controlnet.name,
                                              "swinir": swinir.name})
        bar.update()
    finally:
        bar.close()
    return restorer
