"""CLIPIQA (measures.clipiqa): the score against a hand computation, the CLIP processor's resize, gradients, errors,
the `clipiqa` measure as a reward and the `evaluate --clipiqa` column; with a tiny random CLIP saved like a hub folder."""

from __future__ import annotations

import csv
import math
import string

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

from facereward.cli import app
from facereward.measures.clipiqa import CLIPIQA, PROMPT_SETS, clip_resize, resolve_prompts
from facereward.models.frm import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from facereward.models.restorer import ModelFolderError

IMAGE, PATCH, CONTEXT, HEADS = 32, 8, 24, 2
MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)


def _save_tokenizer(folder, make_clip_tokenizer) -> None:
    """A character-level CLIP BPE tokenizer (every prompt word spelled out, no unknown tokens); end-of-text has the top id."""
    chars = [*string.ascii_lowercase, ".", "-"]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f"{c}</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    make_clip_tokenizer(vocab, model_max_length=CONTEXT).save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, make_clip_tokenizer):
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("clipiqa") / "clip"
    _save_tokenizer(folder, make_clip_tokenizer)
    vocab = 2 * 28 + 2
    config = CLIPConfig(
        text_config={"vocab_size": vocab, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": HEADS, "max_position_embeddings": CONTEXT, "bos_token_id": vocab - 2,
                     "eos_token_id": vocab - 1, "pad_token_id": vocab - 1, "hidden_act": "gelu"},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": HEADS,
                       "image_size": IMAGE, "patch_size": PATCH, "hidden_act": "gelu"},
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(tiny_clip):
    """The plain transformers CLIPModel and tokenizer of the folder (the hand computation's side)."""
    from transformers import AutoTokenizer, CLIPModel

    return CLIPModel.from_pretrained(tiny_clip).eval(), AutoTokenizer.from_pretrained(tiny_clip)


def _images(n: int = 3, h: int = IMAGE, w: int = IMAGE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    return (0.7 * smooth + 0.3 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1)


def _hand_score(reference, pixels: torch.Tensor, pairs, scale: float | None = None) -> torch.Tensor:
    """CLIPModel's own logits (exp(logit_scale) * cosines), or scale * cosines; 2-way softmax per pair; mean over pairs."""
    model, tokenizer = reference
    texts = [t for pair in pairs for t in pair]
    tokens = tokenizer(texts, padding=True, return_tensors="pt")  # padded to the longest: causal attention ignores it
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels,
                    interpolate_pos_encoding=tuple(pixels.shape[-2:]) != (IMAGE, IMAGE))
    logits = out.logits_per_image
    if scale is not None:
        logits = logits / model.logit_scale.exp() * scale
    return torch.stack([logits[:, 2 * i : 2 * i + 2].softmax(-1)[:, 0] for i in range(len(pairs))], dim=1).mean(1)


# ---- (a) the score ------------------------------------------------------------------------------------------------


def test_score_is_the_mean_positive_prompt_probability(tiny_clip, reference):
    iqa = CLIPIQA.from_pretrained(tiny_clip)
    assert iqa.pairs == list(PROMPT_SETS["pyiqa"]) and len(iqa.pairs) == 5
    assert iqa.scale == pytest.approx(math.exp(reference[0].logit_scale.item()))  # CLIP's own exp(logit_scale), as pyiqa
    assert iqa.clip.text_model is None and iqa.text_embeds.shape == (10, 8)  # prompts encoded once, text tower dropped
    images = torch.cat([_images(2), torch.full((1, 3, IMAGE, IMAGE), 0.5)])
    with torch.no_grad():
        s = iqa(images)
    assert s.shape == (3,) and s.dtype == torch.float32 and ((s > 0) & (s < 1)).all()
    expected = _hand_score(reference, (images - MEAN) / STD, PROMPT_SETS["pyiqa"])
    assert torch.allclose(s, expected, atol=1e-6)


def test_single_pair_with_a_fixed_scale_is_a_sigmoid_of_the_cosine_gap(tiny_clip, reference):
    model, tokenizer = reference
    iqa = CLIPIQA.from_pretrained(tiny_clip, prompts="paper", scale=100.0)
    images = _images(4, seed=1)
    with torch.no_grad():
        s = iqa(images)
        img = F.normalize(model.visual_projection(model.vision_model(pixel_values=(images - MEAN) / STD).pooler_output), dim=-1)
        ids = tokenizer(["Good photo.", "Bad photo."], padding=True, return_tensors="pt")
        txt = F.normalize(model.text_projection(model.text_model(**ids).pooler_output), dim=-1)
    cos = img @ txt.t()
    assert torch.allclose(s, torch.sigmoid(100.0 * (cos[:, 0] - cos[:, 1])), atol=1e-6)  # softmax of 2 = sigmoid of the gap
    assert torch.allclose(s, _hand_score(reference, (images - MEAN) / STD, PROMPT_SETS["paper"], scale=100.0), atol=1e-6)
    custom = CLIPIQA.from_pretrained(tiny_clip, prompts=[["sharp photo.", "blurry photo."], ["good image", "bad image"]])
    assert custom.pairs == [("sharp photo.", "blurry photo."), ("good image", "bad image")]


def test_prompt_and_option_validation(tiny_clip):
    assert resolve_prompts("paper") == [("Good photo.", "Bad photo.")]
    for bad in ("nosuch", [["only one"]], ["ab"], [], [["a", ""]], 3):
        with pytest.raises(ValueError, match="clipiqa prompts"):
            resolve_prompts(bad)
    with pytest.raises(ValueError, match="resize must be"):
        CLIPIQA.from_pretrained(tiny_clip, resize="square")
    with pytest.raises(ValueError, match="scale must be a positive number"):
        CLIPIQA.from_pretrained(tiny_clip, scale=0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        CLIPIQA.from_pretrained(tiny_clip)(torch.rand(3, IMAGE, IMAGE))


# ---- (b) preprocessing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(40, 56), (61, 37)])
def test_clip_resize_matches_the_clip_processor_on_non_square_images(tiny_clip, hw):
    try:  # transformers 5 names the PIL processor apart; in 4, CLIPImageProcessor is the PIL one
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ModuleNotFoundError:
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil

    g = torch.Generator().manual_seed(hw[0])
    uint8 = (_images(1, *hw, seed=hw[1]) * 255).round().to(torch.uint8)
    uint8[..., :5, :5] = torch.randint(0, 256, (1, 3, 5, 5), generator=g, dtype=torch.uint8)  # a sharp corner
    processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
                                      image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    expected = processor(images=[uint8[0].permute(1, 2, 0).numpy()], return_tensors="pt").pixel_values
    iqa = CLIPIQA.from_pretrained(tiny_clip, resize="clip")
    got = iqa.preprocess(uint8.float() / 255)
    assert got.shape == expected.shape == (1, 3, IMAGE, IMAGE)
    diff = ((got - expected) * STD).abs()  # in [0, 1] units: PIL rounds to 8 bits, torch does not
    assert diff.max() < 3 / 255 and diff.mean() < 0.5 / 255
    # the geometry alone: shortest side to 32, int() of the long side, centre crop at (new - 32) // 2
    h, w = hw
    new = (IMAGE, int(IMAGE * w / h)) if h <= w else (int(IMAGE * h / w), IMAGE)
    full = F.interpolate(uint8.float() / 255, size=new, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (new[0] - IMAGE) // 2, (new[1] - IMAGE) // 2
    assert torch.equal(clip_resize(uint8.float() / 255, IMAGE), full[..., top : top + IMAGE, left : left + IMAGE])


def test_native_mode_scores_any_size_with_interpolated_positions(tiny_clip, reference):
    iqa = CLIPIQA.from_pretrained(tiny_clip)  # pyiqa / LRPO: no resize
    images = _images(2, 48, 72, seed=3)
    assert torch.equal(iqa.preprocess(images), (images - MEAN) / STD)
    with torch.no_grad():
        s = iqa(images)
    assert torch.allclose(s, _hand_score(reference, (images - MEAN) / STD, PROMPT_SETS["pyiqa"]), atol=1e-6)


# ---- (c) gradients --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resize", ["native", "clip"])
def test_gradients_reach_the_images_and_not_the_weights(tiny_clip, resize):
    iqa = CLIPIQA.from_pretrained(tiny_clip, resize=resize)
    assert not any(p.requires_grad for p in iqa.parameters()) and not iqa.training
    images = _images(2, 40, 48, seed=4).requires_grad_(True)
    iqa(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()


# ---- OpenCLIP checkpoints ---------------------------------------------------------------------------------------------


def _as_openclip_state_dict(model) -> dict[str, torch.Tensor]:
    """The transformers CLIPModel's weights under OpenCLIP's names (the converter's tables run backwards)."""
    from facereward.models import openclip_convert as oc

    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    out = {old: sd[new] for old, new in oc._TOP_RENAMES.items()}
    out["logit_scale"] = sd["logit_scale"].reshape(())
    out.update({old: sd[new].t().contiguous() for old, new in oc._TOP_TRANSPOSED.items()})
    for old_prefix, new_prefix in oc._TOWERS.items():
        layers = {int(k[len(new_prefix):].split(".")[0]) for k in sd if k.startswith(new_prefix)}
        for i in sorted(layers):
            b_old, b_new = f"{old_prefix}{i}.", f"{new_prefix}{i}."
            out.update({b_old + o: sd[b_new + n] for o, n in oc._BLOCK_RENAMES.items()})
            for kind in ("weight", "bias"):
                out[f"{b_old}attn.in_proj_{kind}"] = torch.cat([sd[f"{b_new}self_attn.{q}_proj.{kind}"] for q in "qkv"])
    return {k: v.contiguous() for k, v in out.items()}


def test_an_openclip_checkpoint_scores_like_its_transformers_folder(tiny_clip, reference, tmp_path, make_clip_tokenizer):
    ckpt = tmp_path / "openclip" / "clip.safetensors"
    _save_tokenizer(ckpt.parent, make_clip_tokenizer)  # the tokenizer files beside the checkpoint
    save_file(_as_openclip_state_dict(reference[0]), ckpt)
    images = _images(2, seed=5)
    from_file = CLIPIQA.from_pretrained(ckpt, vision_heads=HEADS, text_heads=HEADS)
    with torch.no_grad():
        assert torch.allclose(from_file(images), CLIPIQA.from_pretrained(tiny_clip)(images), atol=1e-5)
    # no tokenizer beside it: a one-line error that says how to give one
    bare = tmp_path / "bare" / "clip.safetensors"
    bare.parent.mkdir()
    bare.write_bytes(ckpt.read_bytes())
    with pytest.raises(ModelFolderError, match=r"no usable CLIP tokenizer.*tokenizer_path.*\[from rewards\.options\.clipiqa\.path\]") as info:
        CLIPIQA.from_pretrained(bare, option="rewards.options.clipiqa.path")
    assert "\n" not in str(info.value)
    assert CLIPIQA.from_pretrained(bare, tokenizer_path=ckpt.parent, vision_heads=HEADS, text_heads=HEADS).pairs


# ---- (d) errors -----------------------------------------------------------------------------------------------------


def test_missing_or_broken_weights_are_one_line_errors_naming_path_and_option(tiny_clip, tmp_path):
    import shutil

    missing = tmp_path / "nothing"
    with pytest.raises(ModelFolderError, match=r"nothing: no such CLIP folder or OpenCLIP checkpoint \(set --clipiqa PATH") as info:
        CLIPIQA.from_pretrained(missing, option="--clipiqa PATH")
    assert "\n" not in str(info.value)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_clip, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelFolderError, match=r"broken: could not load the CLIP model .*\[from --clipiqa PATH\]") as info:
        CLIPIQA.from_pretrained(broken, option="--clipiqa PATH")
    assert "\n" not in str(info.value)
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_clip / name, no_tok / name)
    with pytest.raises(ModelFolderError, match="no-tokenizer: CLIPIQA needs the CLIP tokenizer files"):
        CLIPIQA.from_pretrained(no_tok)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00junk")
    with pytest.raises(ModelFolderError, match=r"junk\.pt: unreadable OpenCLIP checkpoint, truncated .*\[from the clipiqa path\]"):
        CLIPIQA.from_pretrained(junk)


# ---- (e) the reward ---------------------------------------------------------------------------------------------------


def test_clipiqa_reward_in_the_registry_and_a_composite(tiny_clip):
    from facereward.measures import Measure, MeasuresConfig, WeightedSum, create_measure

    reward = create_measure("clipiqa", as_reward=True, path=str(tiny_clip))
    assert isinstance(reward, Measure) and reward.differentiable and not reward.needs_gt
    images = _images(3, 40, 40, seed=6)
    with torch.no_grad():
        direct = CLIPIQA.from_pretrained(tiny_clip)(images)
        assert torch.allclose(reward(images), direct, atol=1e-6)
    config = MeasuresConfig(weights={"clipiqa": 0.1, "psnr": 0.01},
                            options={"clipiqa": {"path": str(tiny_clip), "prompts": "paper", "scale": 100.0}})
    composite = WeightedSum.from_config(config)
    gt = _images(3, 40, 40, seed=7)
    out = composite(images, gt)
    paper = CLIPIQA.from_pretrained(tiny_clip, prompts="paper", scale=100.0)
    with torch.no_grad():
        assert torch.allclose(out.components["clipiqa"], paper(images), atol=1e-6)
    assert torch.allclose(out.total, 0.1 * out.components["clipiqa"] + 0.01 * out.components["psnr"])
    # no-reference: it alone needs no GT, and ReFL can differentiate through it
    alone = WeightedSum.from_config(MeasuresConfig(weights={"clipiqa": 1.0}, options={"clipiqa": {"path": str(tiny_clip)}}))
    assert alone.differentiable and not alone.needs_gt
    x = images.clone().requires_grad_(True)
    alone(x).total.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"rewards\.weights\.clipiqa: measure 'clipiqa' needs option path"):
        WeightedSum.from_config(MeasuresConfig(weights={"clipiqa": 1.0}))
    with pytest.raises(ModelFolderError, match=r"no such CLIP folder .*set options\.clipiqa\.path"):
        create_measure("clipiqa", as_reward=True, path="/no/such/clip")
    with pytest.raises(ValueError, match=r"rewards\.weights\.clipiqa: .*no such CLIP folder .*set options\.clipiqa\.path"):
        WeightedSum.from_config(MeasuresConfig(weights={"clipiqa": 1.0}, options={"clipiqa": {"path": "/no/such/clip"}}))


# ---- (f) evaluate -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_testset(tmp_path_factory):
    from facereward.data.testset import write_toy_testset

    return write_toy_testset(tmp_path_factory.mktemp("toy") / "set", n=4, size=64, seed=0)


def test_evaluate_adds_a_clipiqa_column_without_gt(tiny_clip, toy_testset, tmp_path):
    import shutil

    from facereward.data.imageio import read_image
    from facereward.evaluate import EvaluateConfig, evaluate

    no_gt = tmp_path / "real"
    shutil.copytree(toy_testset / "lq", no_gt / "lq")
    result = evaluate(EvaluateConfig(testset=str(no_gt), out_dir=str(tmp_path / "o"), options={"clipiqa": {"path": str(tiny_clip)}},
                                     images={"gt": str(toy_testset / "hq")}, identity="none", fid="none", batch_size=3,
                                     progress=False))
    column = "CLIPIQA (clip)"
    assert set(result.rows["LQ"]) == {column} and result.judges["clipiqa"] == str(tiny_clip)
    lq = torch.stack([torch.from_numpy(read_image(p).transpose(2, 0, 1)) for p in sorted((no_gt / "lq").glob("*.png"))])
    with torch.no_grad():
        expected = CLIPIQA.from_pretrained(tiny_clip)(lq)
    assert result.rows["LQ"][column] == pytest.approx(expected.mean().item(), abs=1e-6)
    assert np.allclose(result.per_image["LQ"][column], expected.numpy(), atol=1e-6)
    rows = list(csv.reader(open(tmp_path / "o" / "results.csv")))
    assert rows[0] == ["method", column] and [r[0] for r in rows[1:]] == ["LQ", "gt"]


def test_evaluate_command_clipiqa_flag(tiny_clip, toy_testset, tmp_path):
    base = ["evaluate", "--testset", str(toy_testset), "--identity", "none", "--landmarks", "none", "--fid", "none",
            "--out-dir", str(tmp_path / "o"), "--no-progress"]
    result = CliRunner().invoke(app, [*base, "--clipiqa", str(tiny_clip)])
    assert result.exit_code == 0, result.output
    assert "| | PSNR | SSIM | PSNR-Y | SSIM-Y | oracle (toy) | CLIPIQA (clip) |" in result.output
    bad = CliRunner().invoke(app, [*base, "--clipiqa", str(tmp_path / "nope")])
    assert bad.exit_code != 0 and isinstance(bad.exception, ModelFolderError)
    assert "set options.clipiqa.path" in str(bad.exception) and "\n" not in str(bad.exception)
