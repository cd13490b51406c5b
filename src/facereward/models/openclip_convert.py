"""Load the original DiffusionReward FRM (an OpenCLIP ViT-H/14 state_dict, HPSv2-style) into facereward (docs/methods.md 1.1).

OpenCLIP keys (`visual.conv1.weight`, `visual.transformer.resblocks.{i}.attn.in_proj_weight`, `token_embedding.weight`,
`text_projection`, `logit_scale`, ...) are renamed into the transformers `CLIPModel` layout; fused q/k/v projections are
split and the (D x E) projection matrices transposed. No open_clip import is needed (it pulls torchvision).

Text pooling: OpenCLIP takes the features at `argmax(token_ids)`, the end-of-text token because it has the highest id
of its vocabulary (49407 of 49408). transformers' CLIP text model takes the first position of `eos_token_id`, so the
converted config sets `eos_token_id` to the tokenizer's end-of-text id (default: vocab_size - 1, OpenCLIP's); for any
tokenizer whose end-of-text id is the largest, both pick the same position.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from facereward.models.checkpoint_io import CheckpointError, read_state_dict
from facereward.models.restorer import ModelFolderError

# OpenCLIP vision towers whose attention heads are not 64 wide: width -> heads (ViT-H/14: 1280 = 16 x 80; ViT-g/14: 16 x 88;
# ViT-bigG/14: 16 x 104). Text towers use 64-wide heads throughout.
_VISION_HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16}

_BLOCK_RENAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_BLOCK_KEYS = sorted([*_BLOCK_RENAMES, "attn.in_proj_weight", "attn.in_proj_bias"])

_TOP_RENAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TOP_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_IGNORED = {"attn_mask"}  # the text causal mask, a buffer some OpenCLIP versions saved
_TOWERS = {"visual.transformer.resblocks.": "vision_model.encoder.layers.", "transformer.resblocks.": "text_model.encoder.layers."}
_BLOCK_RE = re.compile(r"^(visual\.transformer\.resblocks\.|transformer\.resblocks\.)(\d+)\.(.+)$")


class OpenCLIPCheckpointError(ModelFolderError):
    """An OpenCLIP checkpoint that is missing, unreadable or not in the expected layout; one line naming it."""


def _names(keys: list[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _num_layers(sd: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(m.group(2)) for k in sd if (m := _BLOCK_RE.match(k)) and m.group(1) == prefix}
    return max(indices) + 1 if indices else 0


def _check_layout(sd: dict[str, torch.Tensor]) -> None:
    """Every key an OpenCLIP ViT CLIP needs is there and no other; errors name the keys."""
    needed = [*_TOP_RENAMES, *_TOP_TRANSPOSED]
    for prefix in _TOWERS:
        n = _num_layers(sd, prefix)
        if n == 0:
            needed.append(f"{prefix}0.{_BLOCK_KEYS[0]}")
        needed += [f"{prefix}{i}.{suffix}" for i in range(n) for suffix in _BLOCK_KEYS]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise OpenCLIPCheckpointError(f"not an OpenCLIP ViT CLIP state_dict: missing {_names(missing)}")
    known = set(needed) | _IGNORED
    unexpected = [k for k in sd if k not in known]
    if unexpected:
        raise OpenCLIPCheckpointError(f"unexpected keys for an OpenCLIP ViT CLIP state_dict: {_names(unexpected)}")


def default_heads(width: int, tower: str) -> int:
    """OpenCLIP's head count for a tower width: 64-wide heads, except the large vision towers (ViT-H/14: 1280 -> 16)."""
    if tower == "vision" and width in _VISION_HEADS_BY_WIDTH:
        return _VISION_HEADS_BY_WIDTH[width]
    return max(1, width // 64)


def clip_config_from_openclip_state_dict(
    sd: dict[str, torch.Tensor],
    vision_heads: int | None = None,
    text_heads: int | None = None,
    eos_token_id: int | None = None,
) -> Any:
    """The `transformers.CLIPConfig` of an OpenCLIP ViT CLIP state_dict (shapes read from the tensors, heads inferred).

    `eos_token_id` defaults to vocab_size - 1 (OpenCLIP's end-of-text id), so pooling matches OpenCLIP's argmax.
    Activation: exact GELU (OpenCLIP's nn.GELU, not quick_gelu); LayerNorm eps 1e-5.
    """
    from transformers import CLIPConfig

    _check_layout(sd)
    conv = sd["visual.conv1.weight"]  # (width, 3, patch, patch)
    v_width, patch = int(conv.shape[0]), int(conv.shape[-1])
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    if grid * grid + 1 != sd["visual.positional_embedding"].shape[0]:
        raise OpenCLIPCheckpointError(f"visual.positional_embedding has {sd['visual.positional_embedding'].shape[0]} rows, not a square grid + 1")
    vocab, t_width = (int(n) for n in sd["token_embedding.weight"].shape)
    context = int(sd["positional_embedding"].shape[0])
    embed_dim = int(sd["visual.proj"].shape[1])
    if int(sd["text_projection"].shape[1]) != embed_dim:
        raise OpenCLIPCheckpointError(f"visual.proj projects to {embed_dim} but text_projection to {sd['text_projection'].shape[1]}")
    v_heads = vision_heads or default_heads(v_width, "vision")
    t_heads = text_heads or default_heads(t_width, "text")
    eos = vocab - 1 if eos_token_id is None else int(eos_token_id)
    vision = {
        "hidden_size": v_width,
        "intermediate_size": int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "num_hidden_layers": _num_layers(sd, "visual.transformer.resblocks."),
        "num_attention_heads": v_heads,
        "image_size": grid * patch,
        "patch_size": patch,
        "projection_dim": embed_dim,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    }
    text = {
        "vocab_size": vocab,
        "hidden_size": t_width,
        "intermediate_size": int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "num_hidden_layers": _num_layers(sd, "transformer.resblocks."),
        "num_attention_heads": t_heads,
        "max_position_embeddings": context,
        "projection_dim": embed_dim,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": max(eos - 1, 0),
        "eos_token_id": eos,
        "pad_token_id": 0,  # OpenCLIP pads with 0; padding sits after the end-of-text token, so causal attention ignores it
    }
    try:
        return CLIPConfig(vision_config=vision, text_config=text, projection_dim=embed_dim,
                          logit_scale_init_value=float(sd["logit_scale"].float().reshape(-1)[0]))
    except (ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else err.__class__.__name__
        raise OpenCLIPCheckpointError(f"cannot build a CLIP config from this state_dict ({first.strip()}); pass vision_heads/text_heads") from None


def convert_openclip_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP ViT CLIP keys -> transformers `CLIPModel` keys (q/k/v split from in_proj, projections transposed)."""
    _check_layout(sd)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in _IGNORED:
            continue
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value.reshape(()) if key == "logit_scale" else value
            continue
        if key in _TOP_TRANSPOSED:
            out[_TOP_TRANSPOSED[key]] = value.t().contiguous()
            continue
        m = _BLOCK_RE.match(key)
        tower, index, suffix = _TOWERS[m.group(1)], m.group(2), m.group(3)
        base = f"{tower}{index}."
        if suffix in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if suffix.endswith("weight") else "bias"
            if value.shape[0] % 3:
                raise OpenCLIPCheckpointError(f"{key}: first dimension {value.shape[0]} is not 3 x width")
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{base}self_attn.{name}_proj.{kind}"] = part.contiguous()
        else:
            out[base + _BLOCK_RENAMES[suffix]] = value
    return out


def read_openclip_state_dict(checkpoint_path: str | Path) -> dict[str, torch.Tensor]:
    """An OpenCLIP state_dict from .pt/.pth/.bin (raw, or under "state_dict"; "module." stripped) or .safetensors."""
    try:
        return read_state_dict(checkpoint_path, what="OpenCLIP checkpoint")
    except CheckpointError as err:
        raise OpenCLIPCheckpointError(str(err)) from None


def load_openclip_towers(
    checkpoint_path: str | Path,
    tokenizer_path: str | Path | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    tokenizer_hint: str = "pass tokenizer_path: a local folder with the CLIP tokenizer files",
):
    """(CLIPTowers with both towers, its tokenizer, the checkpoint's logit_scale) of an OpenCLIP ViT CLIP checkpoint.

    `tokenizer_path`: a local folder with the CLIP tokenizer files; without it the checkpoint's own folder is tried
    (the text side needs it: the end-of-text id sets the pooling); `tokenizer_hint` ends that error without it.
    """
    from transformers import AutoTokenizer

    from facereward.models.frm import build_clip_towers, check_state_dict_fits, has_tokenizer_files

    path = Path(checkpoint_path)
    sd = read_openclip_state_dict(path)
    tok_folder = Path(tokenizer_path) if tokenizer_path is not None else path.parent
    if not tok_folder.is_dir():
        raise ModelFolderError(f"{tok_folder}: no such tokenizer folder")
    try:
        if not has_tokenizer_files(tok_folder):
            raise OSError("no tokenizer.json or vocab.json")
        tokenizer = AutoTokenizer.from_pretrained(tok_folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        hint = "" if tokenizer_path is not None else f" ({tokenizer_hint})"
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise ModelFolderError(f"{tok_folder}: no usable CLIP tokenizer ({first}){hint}") from None
    clip_config = clip_config_from_openclip_state_dict(sd, vision_heads, text_heads, eos_token_id=tokenizer.eos_token_id)
    converted = convert_openclip_state_dict(sd)
    logit_scale = float(converted.pop("logit_scale").float())
    towers = build_clip_towers(clip_config, use_text=True)
    problem = check_state_dict_fits(towers.state_dict(), converted)
    if problem:
        raise OpenCLIPCheckpointError(f"{path}: converted weights do not fit the CLIP model ({problem})")
    towers.load_state_dict(converted)
    return towers, tokenizer, logit_scale


def load_openclip_frm(
    checkpoint_path: str | Path,
    tokenizer_path: str | Path | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
):
    """The DiffusionReward FRM as a clip-backbone, use_text=True `FaceRewardModel`: score = <f_img, f_txt> (docs/methods.md 1.1).

    `tokenizer_path`: a local folder with CLIP tokenizer files (e.g. those of laion/CLIP-ViT-H-14); without it the
    checkpoint's own folder is tried. The Bradley-Terry logit scale starts at the checkpoint's `logit_scale`.
    """
    from facereward.models.frm import FaceRewardModel, FRMConfig

    towers, tokenizer, logit_scale = load_openclip_towers(checkpoint_path, tokenizer_path, vision_heads, text_heads)
    config = FRMConfig(backbone="clip", input_size=towers.image_size, use_text=True, init_logit_scale=logit_scale)
    return FaceRewardModel(config, clip=towers, tokenizer=tokenizer).eval()
