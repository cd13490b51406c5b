"""CLIPIQA (Wang et al., "Exploring CLIP for Assessing the Look and Feel of Images"), docs/methods.md 3.

A no-reference quality score in [0, 1]: for each antonym prompt pair (positive, negative), the softmax over
`scale * cos(f_img(x), f_txt(prompt))` gives the probability of the positive prompt; the score is the mean over pairs.
One implementation serves the `clipiqa` reward and the `evaluate` column.

Defaults follow what LRPO ran (`pyiqa.create_metric("clipiqa")`, pyiqa 0.1.14.1): its five prompt pairs, CLIP's own
exp(logit_scale) as the scale, CLIP's mean/std normalisation and no resizing (the image at its own size; the ViT's
position embeddings are interpolated). Options give the paper's / torchmetrics' single pair ("Good photo." /
"Bad photo."), torchmetrics' fixed scale 100 and the CLIP processor's resize (shortest side, centre crop).

Weights: a local transformers CLIP folder (e.g. openai/clip-vit-base-patch32, downloaded beforehand, with its tokenizer
files) or an OpenCLIP ViT checkpoint file with the CLIP tokenizer files beside it (or `tokenizer_path`). pyiqa's default
backbone is OpenAI's RN50 CLIP (its attention-pool position embedding left out), which neither loader reads: with a ViT
CLIP this is the same formula, not pyiqa's exact numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from facereward.models.frm import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CLIPTowers,
    clip_resize,
)
from facereward.models.restorer import ModelFolderError

# name -> (positive, negative) prompt pairs
PROMPT_SETS: dict[str, tuple[tuple[str, str], ...]] = {
    # pyiqa's `CLIPIQA` (pyiqa/archs/clipiqa_arch.py, model_type "clipiqa", since v0.1.6): what LRPO's reward server ran
    "pyiqa": (
        ("Good image", "bad image"),
        ("Sharp image", "blurry image"),
        ("sharp edges", "blurry edges"),
        ("High resolution image", "low resolution image"),
        ("Noise-free image", "noisy image"),
    ),
    # the CLIP-IQA paper's pair, torchmetrics' default prompts=("quality",)
    "paper": (("Good photo.", "Bad photo."),),
}
RESIZE_MODES = ("native", "clip")

Prompts = str | Sequence[Sequence[str]]


def resolve_prompts(prompts: Prompts) -> list[tuple[str, str]]:
    """A preset name ("pyiqa", "paper") or a list of (positive, negative) pairs -> the list of pairs."""
    if isinstance(prompts, str):
        if prompts not in PROMPT_SETS:
            raise ValueError(f"clipiqa prompts: unknown preset {prompts!r} "
                             f"(use {' or '.join(PROMPT_SETS)}, or a list of [positive, negative] pairs)")
        return list(PROMPT_SETS[prompts])
    ok = isinstance(prompts, Sequence) and len(prompts) > 0 and all(
        isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 and all(isinstance(t, str) and t for t in p)
        for p in prompts)
    if not ok:
        raise ValueError(f"clipiqa prompts: expected a preset name or a list of [positive, negative] string pairs, got {prompts!r}")
    return [(p[0], p[1]) for p in prompts]


class CLIPIQA(nn.Module):
    """CLIPIQA(x): images (B, 3, H, W) in [0, 1] -> (B,) in [0, 1], differentiable wrt the images (docs/methods.md 3).

    Frozen (eval mode, no parameter gradients); the prompt embeddings are computed once here and the text tower dropped.
    """

    def __init__(
        self,
        clip: CLIPTowers,
        tokenizer: Any,
        clip_logit_scale: float,
        prompts: Prompts = "pyiqa",
        scale: float | None = None,
        resize: Literal["native", "clip"] = "native",
    ):
        """`clip` with its text tower, its `tokenizer` and logit_scale.

        `scale` None: exp(clip_logit_scale), as pyiqa; a number: that fixed multiplier (torchmetrics: 100).
        """
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"clipiqa resize must be 'native' (as pyiqa) or 'clip' (the CLIP processor's), got {resize!r}")
        if clip.text_model is None or clip.text_projection is None or tokenizer is None:
            raise ValueError("CLIPIQA needs CLIP towers with a text model and a tokenizer to embed its prompts")
        if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
            raise ValueError(f"clipiqa scale must be a positive number or None (CLIP's own exp(logit_scale)), got {scale!r}")
        self.pairs = resolve_prompts(prompts)
        self.resize = resize
        self.scale = math.exp(float(clip_logit_scale)) if scale is None else float(scale)
        self.register_buffer("mean", torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1), persistent=False)
        texts = [t for pair in self.pairs for t in pair]  # pos_0, neg_0, pos_1, neg_1, ...
        tokens = tokenizer(texts, padding="max_length", max_length=clip.context_length, truncation=True, return_tensors="pt")
        clip.requires_grad_(False)
        clip.eval()
        with torch.no_grad():
            param = next(clip.text_model.parameters())
            ids = tokens.input_ids.to(param.device)
            pooled = clip.text_model(input_ids=ids, attention_mask=tokens.attention_mask.to(param.device)).pooler_output
            text = F.normalize(clip.text_projection(pooled).float(), dim=-1)
        self.register_buffer("text_embeds", text, persistent=False)  # (2P, E), normalised
        clip.text_model = clip.text_projection = None  # only the image side is needed from here on
        self.clip = clip
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        tokenizer_path: str | Path | None = None,
        prompts: Prompts = "pyiqa",
        scale: float | None = None,
        resize: Literal["native", "clip"] = "native",
        vision_heads: int | None = None,
        text_heads: int | None = None,
        option: str = "the clipiqa path",
        tokenizer_hint: str = "pass tokenizer_path: a local folder with the CLIP tokenizer files",
    ) -> CLIPIQA:
        """Load a local transformers CLIP folder or an OpenCLIP ViT checkpoint file (its tokenizer beside it or at tokenizer_path).

        Errors are one line naming the path and `option` (the flag or config key it came from); `tokenizer_hint` says
        how to give an OpenCLIP checkpoint its tokenizer.
        """
        from facereward.models.frm import load_clip_folder
        from facereward.models.openclip_convert import load_openclip_towers

        source = Path(path)
        if not source.exists():
            raise ModelFolderError(f"{source}: no such CLIP folder or OpenCLIP checkpoint (set {option} to a local "
                                   "transformers CLIP folder, e.g. openai/clip-vit-base-patch32 downloaded beforehand)")
        try:
            if source.is_dir():
                if tokenizer_path is not None:
                    raise ModelFolderError(f"{source}: tokenizer_path is for OpenCLIP checkpoint files; "
                                           "a CLIP folder carries its own tokenizer")
                clip, tokenizer, logit_scale = load_clip_folder(source, use_text=True, option=option, tokenizer_for="CLIPIQA")
            else:
                clip, tokenizer, logit_scale = load_openclip_towers(source, tokenizer_path, vision_heads, text_heads,
                                                                    tokenizer_hint=tokenizer_hint)
        except ModelFolderError as err:
            raise type(err)(f"{err} [from {option}]") from None
        return cls(clip, tokenizer, logit_scale, prompts=prompts, scale=scale, resize=resize)

    @property
    def image_size(self) -> int:
        return self.clip.image_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] BCHW -> normalised pixels: as they are ("native", pyiqa) or the CLIP processor's resize and crop ("clip")."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIPIQA expects images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        x = images.to(self.mean.dtype)
        if self.resize == "clip":
            x = clip_resize(x, self.image_size)
        return (x - self.mean) / self.std

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings f_img(x), (B, E) float32."""
        pixels = self.preprocess(images).to(next(self.clip.parameters()).dtype)
        return F.normalize(self.clip.image_embeds(pixels).float(), dim=-1)

    def pair_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, P): per prompt pair, softmax(scale * [cos(x, pos), cos(x, neg)])[pos] (docs/methods.md 3)."""
        logits = self.scale * self.image_embeds(images) @ self.text_embeds.t()  # (B, 2P)
        return logits.view(logits.shape[0], -1, 2).softmax(dim=-1)[..., 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The CLIPIQA score, (B,) float32 in [0, 1]: the mean positive-prompt probability over the pairs."""
        return self.pair_probabilities(images).mean(dim=-1)


__all__ = ["CLIPIQA", "PROMPT_SETS", "clip_resize", "resolve_prompts"]
