"""The Face Reward Model (docs/methods.md 1.1): Bradley-Terry loss, scoring, freezing, save/load, OpenCLIP conversion, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from facereward.models.frm import FaceRewardModel, FRMConfig, bradley_terry_loss
from facereward.models.openclip_convert import (
    OpenCLIPCheckpointError,
    clip_config_from_openclip_state_dict,
    convert_openclip_state_dict,
    default_heads,
    load_openclip_frm,
)
from facereward.models.restorer import ModelFolderError


def sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def _images(batch: int = 2, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _cnn(**kw) -> FaceRewardModel:
    torch.manual_seed(0)
    return FaceRewardModel(FRMConfig(backbone="cnn", cnn_widths=[8, 16, 16, 32], **kw))


def _vit(**kw) -> FaceRewardModel:
    torch.manual_seed(0)
    return FaceRewardModel(FRMConfig(backbone="vit", vit_patch=16, vit_dim=32, vit_depth=2, vit_heads=2, **kw))


# ---- Bradley-Terry (docs/methods.md 1.1) -------------------------------------------------------------------


def test_bt_loss_matches_hand_computation():
    s_w, s_l = torch.tensor([1.0, 0.2]), torch.tensor([0.5, 0.4])
    log_tau = torch.tensor(math.log(2.0), requires_grad=True)
    loss = bradley_terry_loss(s_w, s_l, log_tau)
    expected = (-math.log(sig(2 * 0.5)) - math.log(sig(2 * -0.2))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert log_tau.grad is not None and log_tau.grad.abs() > 0  # tau is learnable


def test_bt_loss_tie_uses_target_one_half():
    s_w, s_l = torch.tensor([1.0, 0.2]), torch.tensor([0.5, 0.4])
    loss = bradley_terry_loss(s_w, s_l, math.log(2.0), tie=torch.tensor([False, True]))
    tie_term = -(0.5 * math.log(sig(-0.4)) + 0.5 * math.log(1 - sig(-0.4)))
    expected = (-math.log(sig(1.0)) + tie_term) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # a tie is not the same as a win: the loss differs from the no-tie value
    assert loss.item() != pytest.approx(bradley_terry_loss(s_w, s_l, math.log(2.0)).item())


def test_bt_tau_is_clamped_at_100_and_bt_logits():
    s_w, s_l = torch.tensor([0.30]), torch.tensor([0.29])
    at_100 = bradley_terry_loss(s_w, s_l, math.log(100.0))
    assert bradley_terry_loss(s_w, s_l, math.log(1000.0)).item() == pytest.approx(at_100.item(), rel=1e-6)
    frm = _cnn(init_logit_scale=math.log(3.0))
    assert torch.allclose(frm.bt_logits(s_w, s_l), torch.tensor([0.03]), atol=1e-6)
    frm.logit_scale.data.fill_(math.log(500.0))
    assert frm.tau.item() == pytest.approx(100.0, rel=1e-5)
    assert frm.loss(s_w, s_l).item() == pytest.approx(at_100.item(), rel=1e-6)


# ---- scoring ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_cnn, _vit], ids=["cnn", "vit"])
@pytest.mark.parametrize("size", [(64, 64), (48, 48), (100, 72)])
def test_cnn_and_vit_score_any_size(make, size):
    frm = make().eval()
    images = _images(3, *size)
    s = frm.score(images)
    assert s.shape == (3,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert s.std() > 0  # one score per image, not a constant
    # the model resizes to input_size itself: a 64 px image scores like its pre-resized self
    if size == (100, 72):
        pre = F.interpolate(images, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        assert torch.allclose(frm.score(pre), s, atol=1e-5)
    # captions are accepted (and ignored) without a text tower
    assert torch.equal(frm.score(images, ["a face"] * 3), s)


def test_default_cnn_is_the_documented_small_network():
    frm = FaceRewardModel(FRMConfig())
    widths = [stage[0].out_channels for stage in frm.backbone.stages]
    assert widths == [32, 64, 128, 256]
    assert all(stage[0].stride == (2, 2) for stage in frm.backbone.stages)
    assert sum(p.numel() for p in frm.parameters()) < 3_000_000


def test_freeze_for_reward_keeps_gradients_wrt_images():
    frm = _cnn().train()
    images = _images(2, 80, 80).requires_grad_(True)
    frm.freeze_for_reward()
    assert not any(p.requires_grad for p in frm.parameters()) and not frm.training
    s = frm.score(images)
    assert s.shape == (2,) and s.requires_grad
    s.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    assert all(p.grad is None for p in frm.parameters())


def test_freeze_for_reward_as_context_restores_flags_and_mode():
    frm = _cnn(freeze_blocks=1).train()
    before = {n: p.requires_grad for n, p in frm.named_parameters()}
    with frm.freeze_for_reward() as frozen:
        assert frozen is frm and not frm.training
        assert not any(p.requires_grad for p in frm.parameters())
    assert {n: p.requires_grad for n, p in frm.named_parameters()} == before
    assert frm.training and not all(before.values())


def _frozen_names(frm: FaceRewardModel) -> set[str]:
    return {n for n, p in frm.named_parameters() if not p.requires_grad}


def test_freeze_blocks_cnn_and_vit_freeze_exactly_the_first_n():
    frm = _cnn(freeze_blocks=2)
    expected = {n for n, _ in frm.named_parameters() if n.startswith(("backbone.stages.0.", "backbone.stages.1."))}
    assert expected and _frozen_names(frm) == expected
    assert len(_frozen_names(_cnn())) == 0
    vit = _vit(freeze_blocks=1)
    expected = {n for n, _ in vit.named_parameters()
                if n.startswith(("backbone.patch_embed.", "backbone.blocks.0.")) or n in ("backbone.cls_token", "backbone.pos_embed")}
    assert _frozen_names(vit) == expected
    assert sum(p.requires_grad for p in vit.parameters()) == sum(1 for _ in vit.parameters()) - len(expected)
    with pytest.raises(ValueError, match="only 2 blocks"):
        _vit(freeze_blocks=3)


# ---- a tiny transformers CLIP folder -------------------------------------------------------------


@pytest.fixture
def tiny_clip(tmp_path, make_clip_tokenizer):
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path / "clip"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "face</w>": 3}
    make_clip_tokenizer(vocab, model_max_length=8).save_pretrained(folder)
    config = CLIPConfig(
        text_config={"vocab_size": 4, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 8, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


def test_freeze_blocks_clip_freezes_embeddings_and_first_blocks_of_both_towers(tiny_clip):
    frm = FaceRewardModel(FRMConfig(backbone="clip", clip_path=str(tiny_clip), input_size=32, use_text=True, freeze_blocks=1))
    frozen = _frozen_names(frm)
    prefixes = ("clip.vision_model.embeddings.", "clip.vision_model.pre_layrnorm.", "clip.vision_model.encoder.layers.0.",
                "clip.text_model.embeddings.", "clip.text_model.encoder.layers.0.")
    expected = {n for n, _ in frm.named_parameters() if n.startswith(prefixes)}
    assert frozen == expected
    assert len(expected) == 3 + 2 + 16 + 2 + 16
    assert frm.logit_scale.requires_grad and frm.clip.text_model.encoder.layers[1].mlp.fc1.weight.requires_grad


def test_openclip_style_unlocking_and_the_refl_parameter_groups(tiny_clip):
    """lock_image_tower(unlocked_groups=2) + lock_text_tower(unlocked_layers=1) on 2-block towers, and ReFL's AdamW groups."""
    from facereward.train.refl import frm_param_groups

    frm = FaceRewardModel(FRMConfig(backbone="clip", clip_path=str(tiny_clip), input_size=32, use_text=True))
    frm.unlock_openclip_style(vision_groups=2, text_layers=1)
    trainable = {n for n, p in frm.named_parameters() if p.requires_grad}
    prefixes = ("clip.vision_model.encoder.layers.1.", "clip.vision_model.post_layernorm.", "clip.visual_projection.",
                "clip.text_model.encoder.layers.1.", "clip.text_model.final_layer_norm.", "clip.text_projection.")
    assert trainable == {n for n, _ in frm.named_parameters() if n.startswith(prefixes)} | {"logit_scale"}
    frm.unlock_openclip_style(vision_groups=4, text_layers=0)  # every vision group, the embeddings included
    assert frm.clip.vision_model.embeddings.patch_embedding.weight.requires_grad
    assert not frm.clip.text_model.encoder.layers[1].mlp.fc1.weight.requires_grad
    assert frm.clip.text_projection.weight.requires_grad  # OpenCLIP never locks the text projection
    with pytest.raises(ValueError, match=r"vision_unlocked_groups must be in \[0, 4\]"):
        frm.unlock_openclip_style(vision_groups=5, text_layers=0)
    decay, rest = frm_param_groups(frm, 0.35)
    assert decay["weight_decay"] == 0.35 and rest["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in rest["params"])
    assert any(p is frm.logit_scale for p in rest["params"]) and any(p is frm.clip.visual_projection.weight for p in decay["params"])
    assert len(decay["params"]) + len(rest["params"]) == sum(p.requires_grad for p in frm.parameters())
    cnn = FaceRewardModel(FRMConfig(backbone="cnn", input_size=32, cnn_widths=[8, 16]))
    with pytest.raises(ValueError, match="needs the clip backbone"):
        cnn.unlock_openclip_style(20, 11)


def test_resize_modes():
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    cfg = dict(backbone="cnn", input_size=32, cnn_widths=[8, 16], mean=[0.0] * 3, std=[1.0] * 3)
    anti = FaceRewardModel(FRMConfig(**cfg)).preprocess(images)
    plain = FaceRewardModel(FRMConfig(**cfg, resize="bilinear")).preprocess(images)
    assert torch.allclose(anti, F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False))
    assert torch.allclose(plain, F.interpolate(images, size=(32, 32), mode="bilinear", antialias=False, align_corners=False))
    hps = FaceRewardModel(FRMConfig(**cfg, resize="hpsv2")).preprocess(images)  # shortest side 32 (-> 32 x 42), centre crop
    full = F.interpolate(images, size=(32, 42), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    assert torch.allclose(hps, full[..., :, 5:37])
    with pytest.raises(ValueError, match="resize must be"):
        FaceRewardModel(FRMConfig(**cfg, resize="nearest"))


def test_clip_with_text_scores_caption_cosines(tiny_clip):
    frm = FaceRewardModel(FRMConfig(backbone="clip", clip_path=str(tiny_clip), input_size=32, use_text=True)).eval()
    images = _images(2, 40, 40)
    s = frm.score(images, ["a face", None])
    assert s.shape == (2,) and (s.abs() <= 1 + 1e-6).all()
    assert torch.equal(s, frm.score(images, ["a face", ""]))
    expected = (frm.embed_images(images) * frm.embed_texts(["a face", ""], 2)).sum(-1)
    assert torch.allclose(s, expected, atol=1e-6)
    assert not torch.allclose(frm.score(images, "a face"), frm.score(images, ""))  # the caption matters
    # tau starts at the CLIP folder's logit scale
    assert frm.logit_scale.item() == pytest.approx(2.6592, abs=1e-4)


def test_clip_without_text_starts_near_zero_and_passes_gradients(tiny_clip):
    frm = FaceRewardModel(FRMConfig(backbone="clip", clip_path=str(tiny_clip), input_size=32))
    assert frm.clip.text_model is None and frm.tokenizer is None
    images = _images(3, 32, 32).requires_grad_(True)
    frm.freeze_for_reward()
    s = frm.score(images)
    assert s.shape == (3,) and s.abs().max() < 0.1 and s.std() > 0
    s.sum().backward()
    assert images.grad.abs().sum() > 0


# ---- save / load -----------------------------------------------------------------------------------


def test_save_load_round_trip_cnn(tmp_path):
    frm = _cnn(freeze_blocks=1, init_logit_scale=0.7)
    with torch.no_grad():
        frm.head.bias.fill_(0.25)
    images = _images(3)
    frm.save_pretrained(tmp_path / "frm")
    frm.save_pretrained(tmp_path / "frm")  # overwriting an existing folder works
    assert sorted(p.name for p in (tmp_path / "frm").iterdir()) == ["frm.json", "model.safetensors"]
    again = FaceRewardModel.from_pretrained(tmp_path / "frm")
    assert again.config == frm.config and not again.training
    assert torch.equal(again.score(images), frm.eval().score(images))
    assert again.logit_scale.item() == pytest.approx(0.7)
    assert _frozen_names(again) == _frozen_names(frm) != set()


@pytest.mark.parametrize("use_text", [True, False])
def test_save_load_round_trip_clip_is_self_contained(tiny_clip, tmp_path, use_text):
    import shutil

    frm = FaceRewardModel(FRMConfig(backbone="clip", clip_path=str(tiny_clip), input_size=32, use_text=use_text)).eval()
    with torch.no_grad():  # weights that differ from the source folder's, so a reload from clip_path would be caught
        frm.clip.visual_projection.weight.mul_(1.5)
    images, captions = _images(2, 48, 48), ["a face", "a"]
    before = frm.score(images, captions)
    frm.save_pretrained(tmp_path / "frm")
    shutil.rmtree(tiny_clip)  # the saved folder must not need the original CLIP folder
    assert (tmp_path / "frm" / "tokenizer").is_dir() == use_text
    again = FaceRewardModel.from_pretrained(tmp_path / "frm")
    assert torch.equal(again.score(images, captions), before)


# ---- OpenCLIP conversion -----------------------------------------------------------------------------

V_WIDTH, V_LAYERS, V_HEADS, PATCH, IMAGE = 64, 2, 4, 8, 32
T_WIDTH, T_LAYERS, T_HEADS, CONTEXT, VOCAB, EMBED = 32, 2, 2, 8, 50, 16


def _openclip_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the exact OpenCLIP ViT key names and shapes (a tiny ViT-H/14 look-alike)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    sd: dict[str, torch.Tensor] = {}

    def norm(name: str, d: int) -> None:
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + r(d, std=0.1), r(d, std=0.1)

    def blocks(prefix: str, d: int, layers: int) -> None:
        for i in range(layers):
            b = f"{prefix}{i}."
            norm(b + "ln_1", d)
            sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"] = r(3 * d, d, std=d**-0.5), r(3 * d, std=0.1)
            sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"] = r(d, d, std=d**-0.5), r(d, std=0.1)
            norm(b + "ln_2", d)
            sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"] = r(4 * d, d, std=d**-0.5), r(4 * d, std=0.1)
            sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"] = r(d, 4 * d, std=(4 * d) ** -0.5), r(d, std=0.1)

    sd["visual.class_embedding"] = r(V_WIDTH, std=0.5)
    sd["visual.positional_embedding"] = r((IMAGE // PATCH) ** 2 + 1, V_WIDTH, std=0.5)
    sd["visual.proj"] = r(V_WIDTH, EMBED, std=V_WIDTH**-0.5)
    sd["visual.conv1.weight"] = r(V_WIDTH, 3, PATCH, PATCH, std=0.1)
    norm("visual.ln_pre", V_WIDTH)
    blocks("visual.transformer.resblocks.", V_WIDTH, V_LAYERS)
    norm("visual.ln_post", V_WIDTH)
    sd["positional_embedding"] = r(CONTEXT, T_WIDTH, std=0.5)
    sd["text_projection"] = r(T_WIDTH, EMBED, std=T_WIDTH**-0.5)
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    sd["token_embedding.weight"] = r(VOCAB, T_WIDTH, std=0.5)
    blocks("transformer.resblocks.", T_WIDTH, T_LAYERS)
    norm("ln_final", T_WIDTH)
    return sd


def _ref_block(x: torch.Tensor, sd: dict[str, torch.Tensor], b: str, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    """OpenCLIP's ResidualAttentionBlock (pre-norm; nn.MultiheadAttention maths with the fused in_proj) in plain torch."""
    n, length, d = x.shape
    h = F.layer_norm(x, (d,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"], 1e-5)
    q, k, v = (h @ sd[b + "attn.in_proj_weight"].t() + sd[b + "attn.in_proj_bias"]).split(d, dim=-1)
    q, k, v = (t.reshape(n, length, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    att = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        att = att + mask
    out = (att.softmax(-1) @ v).transpose(1, 2).reshape(n, length, d)
    x = x + out @ sd[b + "attn.out_proj.weight"].t() + sd[b + "attn.out_proj.bias"]
    h = F.layer_norm(x, (d,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"], 1e-5)
    h = F.gelu(h @ sd[b + "mlp.c_fc.weight"].t() + sd[b + "mlp.c_fc.bias"])
    return x + h @ sd[b + "mlp.c_proj.weight"].t() + sd[b + "mlp.c_proj.bias"]


def _ref_image(sd: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """OpenCLIP VisionTransformer.forward: patches, class token, positions, ln_pre, blocks, ln_post(class token) @ proj."""
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (V_WIDTH,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
    for i in range(V_LAYERS):
        x = _ref_block(x, sd, f"visual.transformer.resblocks.{i}.", V_HEADS, None)
    x = F.layer_norm(x[:, 0], (V_WIDTH,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5)
    return x @ sd["visual.proj"]


def _ref_text(sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """OpenCLIP CLIP.encode_text: token + positions, causal blocks, ln_final, features at argmax(ids) @ text_projection."""
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(T_LAYERS):
        x = _ref_block(x, sd, f"transformer.resblocks.{i}.", T_HEADS, mask)
    x = F.layer_norm(x, (T_WIDTH,), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    return x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]


@pytest.fixture
def openclip_tokenizer(tmp_path, make_clip_tokenizer):
    """A 50-token CLIP BPE tokenizer whose end-of-text token has the highest id (49), as in OpenCLIP's vocabulary."""
    vocab = {"a</w>": 0, "face</w>": 1, "f": 2, "a": 3, "c": 4, "e</w>": 5, "fa": 6, "fac": 7}
    vocab.update({f"x{i}</w>": i for i in range(8, VOCAB - 2)})
    vocab.update({"<|startoftext|>": VOCAB - 2, "<|endoftext|>": VOCAB - 1})
    tokenizer = make_clip_tokenizer(vocab, [("f", "a"), ("fa", "c"), ("fac", "e</w>")], model_max_length=CONTEXT)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


def test_openclip_config_inference():
    sd = _openclip_state_dict()
    cfg = clip_config_from_openclip_state_dict(sd, vision_heads=V_HEADS, text_heads=T_HEADS)
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size) == (V_WIDTH, V_LAYERS, V_HEADS, PATCH, IMAGE)
    assert (v.intermediate_size, t.intermediate_size) == (4 * V_WIDTH, 4 * T_WIDTH)
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size, t.max_position_embeddings) == (T_WIDTH, T_LAYERS, VOCAB, CONTEXT)
    assert cfg.projection_dim == EMBED and v.hidden_act == t.hidden_act == "gelu"
    assert v.layer_norm_eps == t.layer_norm_eps == 1e-5
    assert t.eos_token_id == VOCAB - 1  # OpenCLIP's end-of-text token is its largest id
    assert cfg.logit_scale_init_value == pytest.approx(math.log(1 / 0.07))
    # OpenCLIP ViT-H/14: 1280-wide vision heads of 80 (16 heads); 1024-wide text heads of 64 (16 heads)
    assert default_heads(1280, "vision") == 16 and default_heads(1024, "text") == 16 and default_heads(768, "vision") == 12
    assert clip_config_from_openclip_state_dict(sd).vision_config.num_attention_heads == 1  # 64 // 64


def test_openclip_conversion_matches_a_plain_torch_openclip_forward(openclip_tokenizer):
    from transformers import AutoTokenizer, CLIPModel

    sd = _openclip_state_dict()
    model = CLIPModel(clip_config_from_openclip_state_dict(sd, V_HEADS, T_HEADS)).eval()
    converted = convert_openclip_state_dict(sd)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    ids = AutoTokenizer.from_pretrained(openclip_tokenizer)(["a face", "", "face a a face"], padding="max_length",
                                                            max_length=CONTEXT, truncation=True, return_tensors="pt").input_ids
    assert ids[0].tolist()[:4] == [VOCAB - 2, 0, 1, VOCAB - 1]
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        ref_img, ref_txt = _ref_image(sd, pixels), _ref_text(sd, ids)
    assert ref_img.abs().mean() > 0.1 and ref_txt.abs().mean() > 0.1
    assert torch.allclose(img, ref_img, atol=1e-5, rtol=1e-5)
    assert torch.allclose(txt, ref_txt, atol=1e-5, rtol=1e-5)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


@pytest.mark.parametrize("fmt", ["pt_wrapped", "safetensors"])
def test_load_openclip_frm_scores_like_hpsv2(openclip_tokenizer, tmp_path, fmt):
    from safetensors.torch import save_file

    from facereward.models.frm import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    sd = _openclip_state_dict(seed=3)
    if fmt == "pt_wrapped":
        path = tmp_path / "frm.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    else:
        path = tmp_path / "frm.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    frm = load_openclip_frm(path, openclip_tokenizer, vision_heads=V_HEADS, text_heads=T_HEADS)
    assert frm.config.backbone == "clip" and frm.config.use_text and frm.config.input_size == IMAGE
    assert frm.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    images = _images(2, IMAGE, IMAGE, seed=4)
    captions = ["a face", "face"]
    ids = frm.tokenizer(captions, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt").input_ids
    pixels = (images - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = (F.normalize(_ref_image(sd, pixels), dim=-1) * F.normalize(_ref_text(sd, ids), dim=-1)).sum(-1)
        s = frm.score(images, captions)
    assert torch.allclose(s, expected, atol=1e-5)
    frm.save_pretrained(tmp_path / "saved")
    assert torch.equal(FaceRewardModel.from_pretrained(tmp_path / "saved").score(images, captions), s)


# ---- clear errors --------------------------------------------------------------------------------------


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ModelFolderError, match="no such FRM folder"):
        FaceRewardModel.from_pretrained(tmp_path / "nothing")
    (tmp_path / "restorer").mkdir()
    (tmp_path / "restorer" / "facereward.json").write_text("{}")
    with pytest.raises(ModelFolderError, match="not a facereward FRM folder"):
        FaceRewardModel.from_pretrained(tmp_path / "restorer")
    _cnn().save_pretrained(tmp_path / "frm")
    meta = json.loads((tmp_path / "frm" / "frm.json").read_text())
    meta["config"]["cnn_widths"] = [8, 16, 32, 32]
    (tmp_path / "frm" / "frm.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFolderError, match=r"do not fit.*backbone\.stages\.2\.0\.weight"):
        FaceRewardModel.from_pretrained(tmp_path / "frm")
    (tmp_path / "frm" / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="missing model.safetensors"):
        FaceRewardModel.from_pretrained(tmp_path / "frm")
    with pytest.raises(ModelFolderError, match="no such CLIP folder"):
        FaceRewardModel(FRMConfig(backbone="clip", clip_path=str(tmp_path / "no-clip")))
    with pytest.raises(ValueError, match="use_text needs the clip backbone"):
        FaceRewardModel(FRMConfig(backbone="cnn", use_text=True))


def test_openclip_checkpoint_errors_name_the_problem(tmp_path, openclip_tokenizer):
    with pytest.raises(OpenCLIPCheckpointError, match="no such OpenCLIP checkpoint file"):
        load_openclip_frm(tmp_path / "missing.pt", openclip_tokenizer)
    sd = _openclip_state_dict()
    del sd["visual.transformer.resblocks.1.mlp.c_proj.bias"]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(OpenCLIPCheckpointError, match=r"missing visual\.transformer\.resblocks\.1\.mlp\.c_proj\.bias"):
        load_openclip_frm(tmp_path / "broken.pt", openclip_tokenizer, V_HEADS, T_HEADS)
    sd = _openclip_state_dict()
    sd["visual.attn_pool.query"] = torch.zeros(2)
    with pytest.raises(OpenCLIPCheckpointError, match=r"unexpected .*visual\.attn_pool\.query"):
        convert_openclip_state_dict(sd)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(OpenCLIPCheckpointError, match="unreadable OpenCLIP checkpoint"):
        load_openclip_frm(tmp_path / "junk.pt", openclip_tokenizer)
    assert issubclass(OpenCLIPCheckpointError, ModelFolderError)  # the CLI prints it as one line
