"""The Face Reward Model (FRM, docs/methods.md 1.1): one scalar per face image, trained with a pairwise Bradley-Terry loss.

Backbones:
- `cnn` / `vit`: small networks trained from scratch (the toy default: a 4-stage CNN that trains on CPU in minutes at
  64 px); score = a linear head on the pooled features.
- `clip`: a transformers CLIP loaded from a local folder. Without text, score = a linear head on the normalised image
  embedding. With text (HPSv2-style, like the original DiffusionReward FRM), score = <f_img(x), f_txt(c)> of normalised
  embeddings, in [-1, 1]; `openclip_convert.load_openclip_frm` loads the original OpenCLIP ViT-H/14 checkpoint this way.

Images are BCHW in [0, 1] at any size: the model resizes (bilinear, antialiased) to `input_size` and normalises, and the
score stays differentiable wrt the images, also when the FRM itself is frozen (`freeze_for_reward`, for ReFL).

A saved FRM is one folder: `frm.json` (config, and the CLIP config for clip backbones), `model.safetensors` (all weights,
so a clip folder is self-contained) and `tokenizer/` when the model scores captions.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from facereward.atomic import staging_folder, swap_in_folder
from facereward.models.restorer import ModelFolderError

FORMAT_VERSION = 1
CONFIG_NAME = "frm.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
MAX_LOGIT_SCALE = math.log(100.0)  # tau = exp(logit_scale) is clamped to at most 100, as in CLIP
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

Captions = str | Sequence[str | None] | None


@dataclass
class FRMConfig:
    """Shape and training-relevant options of a Face Reward Model."""

    backbone: Literal["cnn", "vit", "clip"] = "cnn"
    input_size: int = 64  # images are resized to input_size x input_size (224 for CLIP ViT-H/14)
    mean: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    std: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    cnn_widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # one stride-2 stage each
    cnn_depth: int = 1  # residual blocks per stage after its stride-2 conv
    vit_patch: int = 8
    vit_dim: int = 128
    vit_depth: int = 4
    vit_heads: int = 4
    clip_path: str | None = None  # a local transformers CLIP folder (loaded with local_files_only=True)
    use_text: bool = False  # clip only: score = <f_img(x), f_txt(caption)> (HPSv2-style)
    freeze_blocks: int = 0  # freeze the embeddings + first N transformer blocks of each tower, or the first N CNN stages
    resize: Literal["antialias", "bilinear", "hpsv2"] = "antialias"  # how images reach input_size (see `preprocess`)
    init_logit_scale: float | None = None  # log(tau); None: the CLIP folder's logit_scale when use_text, else 0 (tau = 1)


# ---- Bradley-Terry ---------------------------------------------------------------------------


def bradley_terry_loss(
    s_chosen: torch.Tensor,
    s_rejected: torch.Tensor,
    logit_scale: torch.Tensor | float,
    tie: torch.Tensor | None = None,
    max_logit_scale: float | None = MAX_LOGIT_SCALE,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """Pairwise Bradley-Terry loss, the mean (or sum) over pairs; ties (bool per pair) use target 1/2.

    docs/methods.md 1.1: -log sigmoid(tau * (s(x_w) - s(x_l))), tau = exp(logit_scale), logit_scale clamped to
    <= `max_logit_scale` (None: unclamped, as the original dynamic-FRM step); written as binary cross-entropy with
    logits tau * (s_w - s_l) against target 1 (or 0.5 for a tie), which is the same for target 1.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=s_chosen.device)
    if max_logit_scale is not None:
        scale = scale.clamp(max=max_logit_scale)
    logits = scale.exp() * (s_chosen.float() - s_rejected.float())
    target = torch.ones_like(logits)
    if tie is not None:
        target = torch.where(tie.to(device=logits.device, dtype=torch.bool), 0.5, 1.0).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target, reduction=reduction)


# ---- backbones ---------------------------------------------------------------------------------


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), _group_norm(channels), nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1), _group_norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x + self.body(x))


class CNNBackbone(nn.Module):
    """Stride-2 stages (conv, GroupNorm, SiLU, residual blocks) and a global average pool: (B, 3, H, W) -> (B, widths[-1])."""

    def __init__(self, widths: Sequence[int], depth: int = 1):
        super().__init__()
        if not widths:
            raise ValueError("cnn_widths needs at least one stage")
        stages, c_in = [], 3
        for width in widths:
            layers: list[nn.Module] = [nn.Conv2d(c_in, width, 3, stride=2, padding=1), _group_norm(width), nn.SiLU()]
            layers += [_ResBlock(width) for _ in range(depth)]
            stages.append(nn.Sequential(*layers))
            c_in = width
        self.stages = nn.ModuleList(stages)
        self.out_features = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x.mean(dim=(2, 3))


class ViTBackbone(nn.Module):
    """A small pre-norm ViT: patch embedding, class token, learned positions, blocks; returns the normed class token."""

    def __init__(self, image_size: int, patch: int, dim: int, depth: int, heads: int):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"input_size {image_size} is not a multiple of vit_patch {patch}")
        if dim % heads:
            raise ValueError(f"vit_dim {dim} is not a multiple of vit_heads {heads}")
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.out_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])


def clip_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """The CLIP processor's geometry in torch ops: shortest side -> `size` (bicubic, antialiased), centre crop size x size.

    Output sizes and crop offsets follow transformers' CLIPImageProcessor (long side int(size * long / short), offsets
    (new - size) // 2); values are clamped to [0, 1] as PIL's 8-bit resize does. Differentiable wrt `images`.
    """
    h, w = images.shape[-2:]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return images[..., top : top + size, left : left + size]


class CLIPTowers(nn.Module):
    """The parts of a transformers `CLIPModel` the FRM uses, under the same attribute (and state_dict) names."""

    def __init__(self, config: Any, vision_model: nn.Module, visual_projection: nn.Linear,
                 text_model: nn.Module | None = None, text_projection: nn.Linear | None = None):
        super().__init__()
        self.config = config  # the full transformers CLIPConfig, saved in frm.json
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.text_model = text_model
        self.text_projection = text_projection

    @property
    def image_size(self) -> int:
        return int(self.config.vision_config.image_size)

    @property
    def context_length(self) -> int:
        return int(self.config.text_config.max_position_embeddings)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) image embeddings of normalised pixels."""
        resize = pixel_values.shape[-1] != self.image_size or pixel_values.shape[-2] != self.image_size
        out = self.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=resize)
        return self.visual_projection(out.pooler_output)

    def text_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) text embeddings of token ids (pooled at the end-of-text token)."""
        return self.text_projection(self.text_model(input_ids=input_ids).pooler_output)


def _no_init():
    """transformers' context that skips random weight init (weights are loaded right after); a no-op if unavailable."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def build_clip_towers(clip_config: Any, use_text: bool) -> CLIPTowers:
    """Uninitialised CLIP towers of `clip_config` (a transformers CLIPConfig), to be filled by `load_state_dict`."""
    from transformers import CLIPTextModel, CLIPVisionModel

    clip_config = copy.deepcopy(clip_config)
    for sub in (clip_config, clip_config.vision_config, clip_config.text_config):
        # one attention kernel whichever way the config came (built, or read back from a saved FRM): transformers 4
        # picks eager or sdpa by how the model is made, and the two differ in the last bits
        sub._attn_implementation = "sdpa"
    with _no_init():
        vision = CLIPVisionModel(clip_config.vision_config)
        vision = getattr(vision, "vision_model", vision)  # transformers 4 wraps the transformer; 5 does not
        visual_projection = nn.Linear(clip_config.vision_config.hidden_size, clip_config.projection_dim, bias=False)
        text = text_projection = None
        if use_text:
            text = CLIPTextModel(clip_config.text_config)
            text = getattr(text, "text_model", text)
            text_projection = nn.Linear(clip_config.text_config.hidden_size, clip_config.projection_dim, bias=False)
    return CLIPTowers(clip_config, vision, visual_projection, text, text_projection)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else err.__class__.__name__


def has_tokenizer_files(folder: str | Path) -> bool:
    """Whether `folder` holds a tokenizer vocabulary (tokenizer.json or vocab.json).

    transformers 5 builds an empty two-token CLIP tokenizer from a folder with only config.json, silently.
    """
    return any((Path(folder) / name).is_file() for name in ("tokenizer.json", "vocab.json"))


def load_clip_folder(path: str | Path, use_text: bool, option: str = "clip_path",
                     tokenizer_for: str = "use_text") -> tuple[CLIPTowers, Any, float]:
    """(towers, tokenizer or None, the folder's logit_scale) from a local transformers CLIP folder.

    `option` (the setting the path came from) and `tokenizer_for` (what needs the text side) word the one-line errors.
    """
    from transformers import AutoTokenizer, CLIPModel

    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such CLIP folder ({option} loads from a local path only)")
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"{folder}: not a transformers CLIP folder (no config.json)")
    try:
        clip, info = CLIPModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as err:
        raise ModelFolderError(f"{folder}: could not load the CLIP model ({_first_line(err)})") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise ModelFolderError(f"{folder}: CLIP weights incomplete, missing {', '.join(sorted(missing)[:5])}")
    tokenizer = None
    if use_text:
        for candidate in (c for c in (folder, folder / TOKENIZER_DIR) if has_tokenizer_files(c)):
            with contextlib.suppress(OSError, ValueError, TypeError):
                tokenizer = AutoTokenizer.from_pretrained(candidate, local_files_only=True)
                break
        if tokenizer is None:
            raise ModelFolderError(f"{folder}: {tokenizer_for} needs the CLIP tokenizer files (in the folder or its tokenizer/)")
    towers = CLIPTowers(clip.config, clip.vision_model, clip.visual_projection,
                        clip.text_model if use_text else None, clip.text_projection if use_text else None)
    return towers, tokenizer, float(clip.logit_scale.detach())


def check_state_dict_fits(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str | None:
    """None if `got` has exactly the keys and shapes of `expected`, else a short description naming the misfits."""
    def names(keys: list[str]) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {tuple(got[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
              if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing {names(missing)}")
    if unexpected:
        parts.append(f"unexpected {names(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch {names(shapes)}")
    return "; ".join(parts) or None


# ---- the model -----------------------------------------------------------------------------


class _RewardFreeze:
    """Freezes an FRM at creation; as a context manager, restores requires_grad flags and train/eval mode on exit."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.training = model.training
        model.requires_grad_(False)
        model.eval()

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc: object) -> None:
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.training)


class FaceRewardModel(nn.Module):
    """s(x[, c]): one scalar per face image (higher = better), differentiable wrt the images (docs/methods.md 1.1)."""

    def __init__(self, config: FRMConfig, clip: CLIPTowers | None = None, tokenizer: Any = None):
        """Build from `config`; the clip backbone loads `config.clip_path` unless `clip` (and `tokenizer`) are given."""
        super().__init__()
        self.config = config
        if config.use_text and config.backbone != "clip":
            raise ValueError(f"use_text needs the clip backbone, not {config.backbone!r}")
        if config.resize not in ("antialias", "bilinear", "hpsv2"):
            raise ValueError(f"resize must be antialias, bilinear or hpsv2, got {config.resize!r}")
        if len(config.mean) != 3 or len(config.std) != 3:
            raise ValueError("mean and std need three values (RGB)")
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self.backbone: nn.Module | None = None
        self.clip: CLIPTowers | None = None
        self.head: nn.Linear | None = None
        self.tokenizer = None
        init_scale = 0.0
        if config.backbone == "cnn":
            self.backbone = CNNBackbone(config.cnn_widths, config.cnn_depth)
            self.head = nn.Linear(self.backbone.out_features, 1)
        elif config.backbone == "vit":
            self.backbone = ViTBackbone(config.input_size, config.vit_patch, config.vit_dim, config.vit_depth, config.vit_heads)
            self.head = nn.Linear(self.backbone.out_features, 1)
        elif config.backbone == "clip":
            if clip is None:
                if not config.clip_path:
                    raise ValueError("the clip backbone needs clip_path (a local transformers CLIP folder)")
                clip, tokenizer, init_scale = load_clip_folder(config.clip_path, config.use_text)
            if config.use_text and (clip.text_model is None or tokenizer is None):
                raise ValueError("use_text needs CLIP towers with a text model and a tokenizer")
            self.clip = clip
            self.tokenizer = tokenizer if config.use_text else None
            if not config.use_text:
                self.head = nn.Linear(clip.config.projection_dim, 1)
                nn.init.normal_(self.head.weight, std=0.01)  # scores start near 0
                nn.init.zeros_(self.head.bias)
                init_scale = 0.0
        else:
            raise ValueError(f"backbone must be 'cnn', 'vit' or 'clip', got {config.backbone!r}")
        if config.init_logit_scale is not None:
            init_scale = config.init_logit_scale
        self.logit_scale = nn.Parameter(torch.tensor(float(init_scale)))  # log(tau), docs/methods.md 1.1
        self._freeze_blocks(config.freeze_blocks)

    # ---- freezing ------------------------------------------------------------------------------
    def block_groups(self) -> list[tuple[list[nn.Module | nn.Parameter], list[nn.Module]]]:
        """Per tower: (its embedding parts, its ordered blocks); CNN: no embedding, the stages are the blocks."""
        if self.config.backbone == "cnn":
            return [([], list(self.backbone.stages))]
        if self.config.backbone == "vit":
            b = self.backbone
            return [([b.patch_embed, b.cls_token, b.pos_embed], list(b.blocks))]
        vm = self.clip.vision_model
        groups = [([vm.embeddings, vm.pre_layrnorm], list(vm.encoder.layers))]
        if self.clip.text_model is not None:
            tm = self.clip.text_model
            groups.append(([tm.embeddings], list(tm.encoder.layers)))
        return groups

    def _freeze_blocks(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"freeze_blocks must be >= 0, got {n}")
        if n == 0:
            return
        for embeddings, blocks in self.block_groups():
            if n > len(blocks):
                raise ValueError(f"freeze_blocks={n} but a tower of the {self.config.backbone} backbone has only {len(blocks)} blocks")
            for part in [*embeddings, *blocks[:n]]:
                part.requires_grad_(False)

    def unlock_openclip_style(self, vision_groups: int, text_layers: int) -> None:
        """Train only what OpenCLIP's `lock_image_tower(unlocked_groups=vision_groups)` and `lock_text_tower(unlocked_layers=
        text_layers)` leave trainable (the original ReFL: 20 and 11), plus the logit scale (docs/methods.md 1.2 step 6).

        Vision groups, last first: the projection, [the last block + post-norm], then one block each (the embeddings and
        pre-norm are the first group). Text: the last `text_layers` blocks, the final norm and the projection.
        """
        if self.clip is None:
            raise ValueError(f"unlocking OpenCLIP-style needs the clip backbone, not {self.config.backbone!r}")
        vm = self.clip.vision_model
        blocks = list(vm.encoder.layers)
        groups = [[vm.embeddings, vm.pre_layrnorm], *[[b] for b in blocks[:-1]], [blocks[-1], vm.post_layernorm],
                  [self.clip.visual_projection]]
        if not 0 <= vision_groups <= len(groups):
            raise ValueError(f"vision_unlocked_groups must be in [0, {len(groups)}], got {vision_groups}")
        self.requires_grad_(False)
        for group in groups[len(groups) - vision_groups:]:
            for part in group:
                part.requires_grad_(True)
        if self.clip.text_model is not None:
            tm = self.clip.text_model
            layers = list(tm.encoder.layers)
            if not 0 <= text_layers <= len(layers):
                raise ValueError(f"text_unlocked_layers must be in [0, {len(layers)}], got {text_layers}")
            for part in [*layers[len(layers) - text_layers:], tm.final_layer_norm, self.clip.text_projection]:
                part.requires_grad_(True)
        if self.head is not None:
            self.head.requires_grad_(True)
        self.logit_scale.requires_grad_(True)

    def freeze_for_reward(self) -> _RewardFreeze:
        """Freeze all parameters (eval mode); gradients still flow to the input images (the FRM in a ReFL step).

        Call it plainly to freeze for good, or use `with frm.freeze_for_reward():` to restore flags and mode after.
        """
        return _RewardFreeze(self)

    # ---- scoring -------------------------------------------------------------------------------
    @property
    def tau(self) -> torch.Tensor:
        """The Bradley-Terry temperature exp(logit_scale), clamped to <= 100."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] BCHW images of any size -> input_size x input_size, mean/std normalised.

        `config.resize`: "antialias" (bilinear, antialiased; default), "bilinear" (no antialias: what the original ReFL
        and LRPO code's tensor resize does), "hpsv2" (shortest side bicubic, centre crop: HPSv2's own transform).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        x = images.to(self.logit_scale.dtype)
        size = self.config.input_size
        if self.config.resize == "hpsv2":
            x = clip_resize(x, size)
        elif tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=self.config.resize == "antialias",
                              align_corners=False)
        return (x - self.mean) / self.std

    def _caption_list(self, captions: Captions, batch: int) -> list[str]:
        if captions is None or isinstance(captions, str):
            return [captions or ""] * batch
        captions = ["" if c is None else str(c) for c in captions]
        if len(captions) == 1:
            return captions * batch
        if len(captions) != batch:
            raise ValueError(f"got {len(captions)} captions for {batch} images")
        return captions

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Clip backbone: L2-normalised image embeddings f_img(x), (B, E)."""
        if self.clip is None:
            raise ValueError("embed_images needs the clip backbone")
        return F.normalize(self.clip.image_embeds(self.preprocess(images)), dim=-1)

    def embed_texts(self, captions: Captions, batch: int = 1) -> torch.Tensor:
        """Clip backbone with text: L2-normalised caption embeddings f_txt(c), (B, E); None or "" is the empty caption."""
        if self.tokenizer is None or self.clip is None or self.clip.text_model is None:
            raise ValueError("embed_texts needs the clip backbone with use_text")
        texts = self._caption_list(captions, batch)
        ids = self.tokenizer(texts, padding="max_length", max_length=self.clip.context_length, truncation=True,
                             return_tensors="pt").input_ids
        return F.normalize(self.clip.text_embeds(ids.to(self.logit_scale.device)), dim=-1)

    def score(self, images: torch.Tensor, captions: Captions = None) -> torch.Tensor:
        """One score per image, (B,) float32. With use_text: <f_img(x), f_txt(c)> in [-1, 1]; captions ignored otherwise."""
        if self.config.use_text:
            img = self.embed_images(images)
            txt = self.embed_texts(captions, images.shape[0])
            return (img * txt.to(img.dtype)).sum(dim=-1).float()  # HPSv2 score, docs/methods.md 1.1
        if self.clip is not None:
            features = self.embed_images(images)
        else:
            features = self.backbone(self.preprocess(images))
        return self.head(features).squeeze(-1).float()

    def forward(self, images: torch.Tensor, captions: Captions = None) -> torch.Tensor:
        """Same as `score` (so wrappers such as DDP see the call)."""
        return self.score(images, captions)

    def bt_logits(self, s_chosen: torch.Tensor, s_rejected: torch.Tensor) -> torch.Tensor:
        """tau * (s_w - s_l), the Bradley-Terry logit of preferring the first (docs/methods.md 1.1)."""
        return self.tau * (s_chosen - s_rejected)

    def loss(self, s_chosen: torch.Tensor, s_rejected: torch.Tensor, tie: torch.Tensor | None = None) -> torch.Tensor:
        """`bradley_terry_loss` with this model's learnable logit scale."""
        return bradley_terry_loss(s_chosen, s_rejected, self.logit_scale, tie)

    # ---- save / load -----------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """Write frm.json + model.safetensors (+ tokenizer/); written beside and moved in place, so a crash leaves no half folder."""
        folder = Path(folder)
        tmp = staging_folder(folder)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, tmp / WEIGHTS_NAME)
        clip_config = json.loads(self.clip.config.to_json_string(use_diff=False)) if self.clip is not None else None
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        meta = {"format_version": FORMAT_VERSION, "kind": "facereward-frm", "config": asdict(self.config), "clip_config": clip_config}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        swap_in_folder(tmp, folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, resize: str | None = None) -> FaceRewardModel:
        """Load a folder written by `save_pretrained`, from a local path only; returned in eval mode. `resize` overrides
        the folder's `config.resize` (a run's choice, e.g. the original recipes' "bilinear")."""
        from facereward.config import ConfigError, config_from_dict

        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFolderError(f"{folder}: no such FRM folder (face reward models load from a local path only)")
        meta_path = folder / CONFIG_NAME
        if not meta_path.is_file():
            raise ModelFolderError(f"{folder}: not a facereward FRM folder (no {CONFIG_NAME})")
        try:
            meta = json.loads(meta_path.read_text())
            config = config_from_dict(FRMConfig, meta["config"], f"{meta_path}: config")
        except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as err:
            raise ModelFolderError(f"{meta_path}: unreadable FRM config ({err})") from None
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ModelFolderError(f"{meta_path}: format version {meta['format_version']} is newer than this facereward supports")
        if resize is not None:
            if resize not in ("antialias", "bilinear", "hpsv2"):
                raise ValueError(f"FRM resize must be antialias, bilinear or hpsv2, got {resize!r}")
            config.resize = resize
        missing = [WEIGHTS_NAME] if not (folder / WEIGHTS_NAME).is_file() else []
        if config.use_text and not (folder / TOKENIZER_DIR).is_dir():
            missing.append(TOKENIZER_DIR)
        if missing:
            raise ModelFolderError(f"{folder}: incomplete FRM folder, missing {', '.join(missing)}")
        try:
            state = load_file(folder / WEIGHTS_NAME)
        except (OSError, SafetensorError) as err:
            raise ModelFolderError(f"{folder / WEIGHTS_NAME}: unreadable weights ({_first_line(err)})") from None
        clip, tokenizer = None, None
        if config.backbone == "clip":
            from transformers import AutoTokenizer, CLIPConfig

            if not isinstance(meta.get("clip_config"), dict):
                raise ModelFolderError(f"{meta_path}: a clip FRM needs its clip_config")
            try:
                clip = build_clip_towers(CLIPConfig.from_dict(meta["clip_config"]), config.use_text)
                if config.use_text:
                    tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR, local_files_only=True)
            except (OSError, ValueError, TypeError, KeyError) as err:
                raise ModelFolderError(f"{folder}: could not rebuild the CLIP model ({_first_line(err)})") from None
        try:
            model = cls(config, clip=clip, tokenizer=tokenizer)
        except ValueError as err:
            raise ModelFolderError(f"{meta_path}: {_first_line(err)}") from None
        problem = check_state_dict_fits(model.state_dict(), state)
        if problem:
            raise ModelFolderError(f"{folder / WEIGHTS_NAME}: weights do not fit the configured FRM ({problem})")
        model.load_state_dict(state)
        return model.eval()
