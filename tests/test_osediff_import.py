"""`import-osediff` against plain-torch and peft references, on a fabricated SD 2.1 folder and OSEDiff file.

The real files (stable-diffusion-2-1-base, osediff_face.pkl) cannot be fetched here, so the fixtures build a tiny
diffusers SD 2.1 folder (SD 2.1's block structure, tiny widths) and write an OSEDiff file the way the authors'
`OSEDiff_gen.save_model` does (cswry/OSEDiff osediff.py): peft adapters on target lists computed by their rules
(copied below), random LoRA tensors and conv_in base, the state dicts filtered as they filter them, torch.save.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig

from facereward.models.checkpoint_io import CheckpointError
from facereward.models.onestep import OneStepRestorer
from facereward.models.osediff_import import import_osediff
from facereward.models.restorer import ModelFolderError

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # the authors' 3 adapters

SIZE, RANK = 64, 4  # 64 px faces -> 8x8 latents; OSEDiff's released rank
SD21_BASE_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                       "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon",
                       "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
VOCAB = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "face</w>": 3, "photo</w>": 4}


# ---- the authors' rules, verbatim from osediff.py (initialize_vae, initialize_unet) -----------------------------
def authors_vae_targets(vae) -> list[str]:
    l_target_modules_encoder = []
    l_grep = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0"]
    for n, p in vae.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in l_grep:
            if pattern in n and ("encoder" in n):  # noqa: SIM114 - verbatim
                l_target_modules_encoder.append(n.replace(".weight", ""))
            elif ("quant_conv" in n) and ("post_quant_conv" not in n):
                l_target_modules_encoder.append(n.replace(".weight", ""))
    return l_target_modules_encoder


def authors_unet_targets(unet) -> tuple[list[str], list[str], list[str]]:
    l_target_modules_encoder, l_target_modules_decoder, l_modules_others = [], [], []
    l_grep = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out", "proj_out",
              "proj_in", "ff.net.2", "ff.net.0.proj"]
    for n, p in unet.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in l_grep:
            if pattern in n and ("down_blocks" in n or "conv_in" in n):
                l_target_modules_encoder.append(n.replace(".weight", ""))
                break
            elif pattern in n and ("up_blocks" in n or "conv_out" in n):
                l_target_modules_decoder.append(n.replace(".weight", ""))
                break
            elif pattern in n:
                l_modules_others.append(n.replace(".weight", ""))
                break
    return l_target_modules_encoder, l_target_modules_decoder, l_modules_others


def authors_load_ckpt(unet, vae, model) -> None:
    """OSEDiff_test.load_ckpt, verbatim but for `self.`: three unmerged UNet adapters and one VAE adapter, all active."""
    lora_conf_encoder = LoraConfig(r=model["rank_unet"], init_lora_weights="gaussian", target_modules=model["unet_lora_encoder_modules"])
    lora_conf_decoder = LoraConfig(r=model["rank_unet"], init_lora_weights="gaussian", target_modules=model["unet_lora_decoder_modules"])
    lora_conf_others = LoraConfig(r=model["rank_unet"], init_lora_weights="gaussian", target_modules=model["unet_lora_others_modules"])
    unet.add_adapter(lora_conf_encoder, adapter_name="default_encoder")
    unet.add_adapter(lora_conf_decoder, adapter_name="default_decoder")
    unet.add_adapter(lora_conf_others, adapter_name="default_others")
    for n, p in unet.named_parameters():
        if "lora" in n or "conv_in" in n:
            p.data.copy_(model["state_dict_unet"][n])
    unet.set_adapter(["default_encoder", "default_decoder", "default_others"])
    vae_lora_conf_encoder = LoraConfig(r=model["rank_vae"], init_lora_weights="gaussian", target_modules=model["vae_lora_encoder_modules"])
    vae.add_adapter(vae_lora_conf_encoder, adapter_name="default_encoder")
    for n, p in vae.named_parameters():
        if "lora" in n:
            p.data.copy_(model["state_dict_vae"][n])
    vae.set_adapter(["default_encoder"])


# ---- fixtures -----------------------------------------------------------------------------------------------------
def tiny_sd21(seed: int = 0) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """SD 2.1 base's structure (4 levels, 2 res blocks, attention on the first 3, linear projections) at tiny widths."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=4, out_channels=4, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, block_out_channels=[16, 32, 64, 64], layers_per_block=2,
        cross_attention_dim=32, attention_head_dim=[2, 2, 4, 4], use_linear_projection=True, norm_num_groups=8,
        flip_sin_to_cos=True, freq_shift=0, act_fn="silu")
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[16, 32, 64, 64], latent_channels=4, layers_per_block=2, norm_num_groups=8, sample_size=SIZE,
        scaling_factor=0.18215)
    return unet.eval(), vae.eval()


def fabricate_osediff(unet, vae, path, rank: int = RANK, seed: int = 1) -> dict:
    """An OSEDiff file as OSEDiff_gen builds and saves it: adapters on the authors' lists, random LoRA and conv_in."""
    unet, vae = copy.deepcopy(unet), copy.deepcopy(vae)
    enc, dec, oth = authors_unet_targets(unet)
    for name, targets in (("default_encoder", enc), ("default_decoder", dec), ("default_others", oth)):
        unet.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=targets), adapter_name=name)
    vae_targets = authors_vae_targets(vae)
    vae.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=vae_targets), adapter_name="default_encoder")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in [*unet.named_parameters(), *vae.named_parameters()]:
            if "lora" in n:  # B too: the gaussian init leaves it at zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for p in (unet.conv_in.base_layer.weight, unet.conv_in.base_layer.bias):  # conv_in is trained in full
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    sd = {"vae_lora_encoder_modules": vae_targets, "unet_lora_encoder_modules": enc, "unet_lora_decoder_modules": dec,
          "unet_lora_others_modules": oth, "rank_unet": rank, "rank_vae": rank,
          "state_dict_unet": {k: v for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
          "state_dict_vae": {k: v for k, v in vae.state_dict().items() if "lora" in k}}
    torch.save(sd, path)
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_clip_tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("osediff")
    sd = root / "sd21-base"
    unet, vae = tiny_sd21()
    unet.save_pretrained(sd / "unet")
    vae.save_pretrained(sd / "vae")
    # SD 2.1 base's own scheduler config (a PNDMScheduler's); OSEDiff reads it with DDPMScheduler.from_pretrained
    (sd / "scheduler").mkdir()
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD21_BASE_SCHEDULER))
    make_clip_tokenizer(VOCAB, model_max_length=8).save_pretrained(sd / "tokenizer")
    torch.manual_seed(2)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(sd / "text_encoder")
    fabricate_osediff(unet, vae, root / "osediff_face.pkl")
    return root


@pytest.fixture(scope="module")
def imported(files):
    out = files / "restorer"
    import_osediff(out, files / "sd21-base", files / "osediff_face.pkl", size=SIZE, progress=False)
    return OneStepRestorer.from_pretrained(out)


def _sd_modules(files):
    sd = files / "sd21-base"
    return (UNet2DConditionModel.from_pretrained(sd / "unet").eval(), AutoencoderKL.from_pretrained(sd / "vae").eval())


def _authors_prompt(files, prompt: str = "") -> torch.Tensor:
    """OSEDiff_test.encode_prompt (CLIPTokenizer for AutoTokenizer: the fixture's tokenizer has no fast files)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(files / "sd21-base" / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(files / "sd21-base" / "text_encoder").eval()
    ids = tokenizer(prompt, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0]


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    assert a.shape == b.shape
    err = (a.double() - b.double()).abs().max().item()
    assert err <= atol, f"max abs difference {err:.2e} > {atol:.0e}"


_LORA = re.compile(r"^(.+)\.lora_A\.([^.]+)\.weight$")


def reference_merged(files) -> tuple[UNet2DConditionModel, AutoencoderKL, dict, dict]:
    unet, vae = _sd_modules(files)
    return reference_merge(unet, vae, torch.load(files / "osediff_face.pkl", weights_only=True))


def reference_merge(unet, vae, model) -> tuple[UNet2DConditionModel, AutoencoderKL, dict, dict]:
    """Merged weights by hand: conv_in's base from the file, then W + 8/r * B @ A on every layer with LoRA, loaded into
    fresh diffusers modules; and SD's own state dicts."""
    usd = {k: v.clone() for k, v in unet.state_dict().items()}
    vsd = {k: v.clone() for k, v in vae.state_dict().items()}
    usd["conv_in.weight"] = model["state_dict_unet"]["conv_in.base_layer.weight"].clone()
    usd["conv_in.bias"] = model["state_dict_unet"]["conv_in.base_layer.bias"].clone()
    for sd, tensors, rank in ((usd, model["state_dict_unet"], model["rank_unet"]), (vsd, model["state_dict_vae"], model["rank_vae"])):
        for key, a in tensors.items():
            found = _LORA.match(key)
            if found:
                b = tensors[f"{found[1]}.lora_B.{found[2]}.weight"]
                w = sd[found[1] + ".weight"]
                sd[found[1] + ".weight"] = (w.double() + 8 / rank * (b.flatten(1).double() @ a.flatten(1).double()).view(w.shape)).float()
    fresh_unet, fresh_vae = UNet2DConditionModel.from_config(unet.config), AutoencoderKL.from_config(vae.config)
    fresh_unet.load_state_dict(usd, strict=True)
    fresh_vae.load_state_dict(vsd, strict=True)
    return fresh_unet.eval(), fresh_vae.eval(), unet.state_dict(), vae.state_dict()


def reference_restore(unet, vae, prompt, lq, noise) -> torch.Tensor:
    """encode -> posterior sample with `noise` -> UNet at t=999 -> x0 = (z - sqrt(1-abar) eps) / sqrt(abar) -> decode."""
    with torch.no_grad():
        sf = vae.config.scaling_factor
        mean, logvar = vae.quant_conv(vae.encoder(lq * 2 - 1)).chunk(2, dim=1)
        z = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise) * sf
        eps = unet(z, torch.tensor([999]), encoder_hidden_states=prompt.expand(lq.shape[0], -1, -1)).sample
        abar = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod[999]
        x0 = (z - (1 - abar).sqrt() * eps) / abar.sqrt()
        return (vae.decode(x0 / sf).sample.clamp(-1, 1) + 1) / 2


def _inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, SIZE, SIZE, generator=g), torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=g)


# ---- tests ---------------------------------------------------------------------------------------------------------
def test_fabricated_file_has_the_released_layout(files):
    model = torch.load(files / "osediff_face.pkl", weights_only=True)
    assert set(model) == {"vae_lora_encoder_modules", "unet_lora_encoder_modules", "unet_lora_decoder_modules",
                          "unet_lora_others_modules", "rank_unet", "rank_vae", "state_dict_unet", "state_dict_vae"}
    # SD 2.1's structure gives the real list sizes (the notes' counts on the full-width model)
    assert [len(model[k]) for k in ("unet_lora_encoder_modules", "unet_lora_decoder_modules", "unet_lora_others_modules")] == [94, 148, 16]
    assert (len(model["vae_lora_encoder_modules"]), len(set(model["vae_lora_encoder_modules"]))) == (65, 32)
    unet_keys = model["state_dict_unet"]
    assert {"conv_in.base_layer.weight", "conv_in.base_layer.bias", "conv_in.lora_A.default_encoder.weight"} <= set(unet_keys)
    assert len(unet_keys) == 2 * (94 + 148 + 16) + 2 and len(model["state_dict_vae"]) == 2 * 32
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.default_others.weight" in unet_keys


def test_imported_folder_is_an_osediff_one_step_restorer(imported, files):
    cfg = imported.config
    assert (cfg.mode, cfg.size, cfg.timestep, cfg.prediction_type, cfg.latent_sample, cfg.colour_fix) == \
        ("latent", SIZE, 999, "epsilon", True, False)
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == ("scaled_linear", 0.00085, 0.012)
    meta = json.loads((files / "restorer" / "facereward.json").read_text())
    source = meta["source"]
    assert (source["imported"], source["osediff"], source["rank_unet"], source["lora_alpha"]) == ("OSEDiff", "osediff_face.pkl", 4, 8)
    assert source["osediff_bytes"] == (files / "osediff_face.pkl").stat().st_size and source["sd_bytes"] > 0
    assert source["lora_layers_unet"] == {"default_encoder": 94, "default_decoder": 148, "default_others": 16}
    assert not any("lora" in k or "base_layer" in k for k in imported.net.unet.state_dict())  # plain diffusers weights
    _close(imported.prompt_embeds, _authors_prompt(files, ""), atol=0)


def test_merged_weights_change_the_targeted_layers_only(imported, files):
    ref_unet, ref_vae, sd_unet, sd_vae = reference_merged(files)
    model = torch.load(files / "osediff_face.pkl", weights_only=True)
    lora_modules = {m.group(1) for k in model["state_dict_unet"] if (m := _LORA.match(k))}
    ours = imported.net.unet.state_dict()
    changed = {k for k in ours if not torch.equal(ours[k], sd_unet[k])}
    assert changed == {m + ".weight" for m in lora_modules} | {"conv_in.bias"}
    for k, v in ref_unet.state_dict().items():
        _close(ours[k], v, atol=1e-6)
    vae = imported.vae.state_dict()
    changed = {k for k in vae if not torch.equal(vae[k], sd_vae[k])}
    assert changed == {m + ".weight" for m in set(model["vae_lora_encoder_modules"])}
    assert all(k.startswith(("encoder.", "quant_conv.")) for k in changed)  # the decoder and post_quant_conv untouched
    for k, v in ref_vae.state_dict().items():
        _close(vae[k], v, atol=1e-6)


def test_forward_matches_the_plain_torch_reference(imported, files):
    ref_unet, ref_vae, _, _ = reference_merged(files)
    lq, noise = _inputs()
    with torch.no_grad():
        ours = imported.restore(lq, x_T=noise)["restored"]
        raw, _ = imported.forward_with_residuals(lq, noise=noise)
    theirs = reference_restore(ref_unet, ref_vae, _authors_prompt(files), lq, noise)
    _close(ours, theirs)
    _close(raw.clamp(0, 1), theirs)
    assert theirs.std() > 0.01  # not a constant image


def test_authors_unmerged_peft_adapters_give_the_same_output(imported, files):
    """OSEDiff_test.load_ckpt's three UNet adapters and the VAE adapter, unmerged, with its forward (DDPM step at 999)."""
    unet, vae = _sd_modules(files)
    model = torch.load(files / "osediff_face.pkl", weights_only=True)
    authors_load_ckpt(unet, vae, model)
    assert set(unet.active_adapters()) == {"default_encoder", "default_decoder", "default_others"}
    scheduler = DDPMScheduler.from_pretrained(files / "sd21-base" / "scheduler")
    scheduler.set_timesteps(1)
    # diffusers 0.25 (OSEDiff's) steps from 999 to -1 with one inference step; later versions look 999 up in timesteps
    scheduler.previous_timestep = lambda t: t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    lq, noise = _inputs()
    timesteps = torch.tensor([999]).long()
    with torch.no_grad():
        posterior = vae.encode(lq * 2 - 1).latent_dist
        lq_latent = (posterior.mean + posterior.std * noise) * vae.config.scaling_factor  # latent_dist.sample() with our noise
        prompt = _authors_prompt(files, "").expand(2, -1, -1)
        model_pred = unet(lq_latent, timesteps, encoder_hidden_states=prompt).sample
        x_denoised = scheduler.step(model_pred, timesteps, lq_latent, return_dict=True).prev_sample
        theirs = (vae.decode(x_denoised / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2
        ours = imported.restore(lq, x_T=noise)["restored"]
    _close(ours, theirs)


def test_an_ldm_sd_file_gives_the_same_merge(tmp_path):
    """--sd as an ldm checkpoint (v2-1_512-ema-pruned layout, fabricated at tiny width): SD 2.1 base's schedule, the
    empty prompt through the OpenCLIP tower, and the same hand-merged weights and forward."""
    import diffbir_reference as R

    from facereward.models.diffbir_import import load_sd21

    R.fabricate_sd21(tmp_path / "sd21.ckpt", seed=0)
    unet, vae, prompt, _ = load_sd21(tmp_path / "sd21.ckpt", SIZE, head_channels=8)
    model = fabricate_osediff(unet, vae, tmp_path / "osediff.pkl", rank=2, seed=5)
    ours = import_osediff(tmp_path / "out", tmp_path / "sd21.ckpt", tmp_path / "osediff.pkl", size=SIZE, head_channels=8,
                          progress=False)
    assert (ours.config.prediction_type, ours.config.beta_schedule) == ("epsilon", "scaled_linear")
    assert torch.equal(ours.prompt_embeds, prompt)
    ref_unet, ref_vae, _, _ = reference_merge(unet, vae, model)
    for mine, theirs in ((ours.net.unet, ref_unet), (ours.vae, ref_vae)):
        for k, v in theirs.state_dict().items():
            _close(mine.state_dict()[k], v, atol=1e-6)
    lq, noise = _inputs()
    with torch.no_grad():
        _close(ours.restore(lq, x_T=noise)["restored"], reference_restore(ref_unet, ref_vae, prompt, lq, noise))
    source = json.loads((tmp_path / "out" / "facereward.json").read_text())["source"]
    assert (source["sd"], source["sd_bytes"], source["rank_unet"]) == ("sd21.ckpt", (tmp_path / "sd21.ckpt").stat().st_size, 2)


def test_prompt_and_caption(files, imported, tmp_path):
    a = import_osediff(tmp_path / "a", files / "sd21-base", files / "osediff_face.pkl", size=SIZE, prompt="a face", progress=False)
    _close(a.prompt_embeds, _authors_prompt(files, "a face"), atol=0)
    assert (a.prompt_embeds - imported.prompt_embeds).abs().max() > 1e-3
    (tmp_path / "caption.txt").write_text("a face\n")
    b = import_osediff(tmp_path / "b", files / "sd21-base", files / "osediff_face.pkl", size=SIZE, caption=tmp_path / "caption.txt",
                       progress=False)
    assert torch.equal(b.prompt_embeds, a.prompt_embeds)
    assert json.loads((tmp_path / "b" / "facereward.json").read_text())["source"]["caption"] == "caption.txt"
    loaded = OneStepRestorer.from_pretrained(tmp_path / "a")
    assert torch.equal(loaded.prompt_embeds, a.prompt_embeds)


class Unpicklable:
    """An arbitrary class: torch.load(weights_only=True) must refuse a file holding one."""


CASES = {
    "missing_sd": r"no such file \(--sd",
    "not_sd_folder": "not a diffusers Stable Diffusion folder, missing unet",
    "clipping_scheduler": "clip_sample or thresholding is on",
    "missing_osediff": r"no such file \(--osediff",
    "truncated_osediff": "unreadable OSEDiff file",
    "pickled_object": "refused by torch.load",
    "missing_top_level_key": "not an OSEDiff file, no 'rank_vae'",
    "lora_key_for_missing_module": r"'down_blocks\.1\.attentions\.7\.proj_in\.lora_A\.default_encoder\.weight', unused: LoRA for "
                                   r"'down_blocks\.1\.attentions\.7\.proj_in', a module the SD 2\.1 UNet does not have",
    "target_for_missing_module": r"unet_lora_others_modules names 'mid_block\.resnets\.5\.conv1', a module the SD 2\.1 UNet does not have",
    "rank_mismatch": r"'conv_in\.lora_A\.default_encoder\.weight' is \(4, 4, 3, 3\), rank mismatch: rank 4 where rank_unet is 8",
    "unused_extra_tensor": r"state_dict_vae has 'decoder\.conv_in\.lora_A\.default_encoder\.weight', unused: LoRA of adapter",
    "missing_lora_tensor": r"state_dict_unet lacks 'up_blocks\.1\.resnets\.0\.conv1\.lora_B\.default_decoder\.weight'",
    "misshaped_conv_in": r"'conv_in\.base_layer\.weight' is \(16, 5, 3, 3\), the SD 2\.1 UNet's conv_in\.weight is \(16, 4, 3, 3\)",
    "prompt_with_ldm_file": "a prompt needs a diffusers Stable Diffusion folder",
    "unreadable_caption": "caption.txt: unreadable caption file",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, case):
    sd, osediff = files / "sd21-base", files / "osediff_face.pkl"
    model = torch.load(osediff, weights_only=True)
    kwargs = {}

    def write(m):
        torch.save(m, tmp_path / "bad.pkl")
        return tmp_path / "bad.pkl"

    if case == "missing_sd":
        sd = tmp_path / "nowhere"
    elif case == "not_sd_folder":
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "model_index.json").write_text("{}")
        sd = tmp_path / "folder"
    elif case == "clipping_scheduler":
        import shutil

        shutil.copytree(sd, tmp_path / "sd", ignore=lambda d, names: [n for n in names if n.endswith(".safetensors")])
        config = {k: v for k, v in SD21_BASE_SCHEDULER.items() if k != "clip_sample"}  # DDPMScheduler's default: True
        (tmp_path / "sd" / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
        sd = tmp_path / "sd"
    elif case == "missing_osediff":
        osediff = tmp_path / "osediff.pkl"
    elif case == "truncated_osediff":
        (tmp_path / "bad.pkl").write_bytes(osediff.read_bytes()[: osediff.stat().st_size // 2])
        osediff = tmp_path / "bad.pkl"
    elif case == "pickled_object":
        osediff = write({**model, "args": Unpicklable()})
    elif case == "missing_top_level_key":
        del model["rank_vae"]
        osediff = write(model)
    elif case == "lora_key_for_missing_module":
        model["state_dict_unet"]["down_blocks.1.attentions.7.proj_in.lora_A.default_encoder.weight"] = torch.zeros(4, 64)
        osediff = write(model)
    elif case == "target_for_missing_module":
        model["unet_lora_others_modules"].append("mid_block.resnets.5.conv1")
        osediff = write(model)
    elif case == "rank_mismatch":
        model["rank_unet"] = 8
        osediff = write(model)
    elif case == "unused_extra_tensor":
        model["state_dict_vae"]["decoder.conv_in.lora_A.default_encoder.weight"] = torch.zeros(4, 64, 3, 3)
        osediff = write(model)
    elif case == "missing_lora_tensor":
        del model["state_dict_unet"]["up_blocks.1.resnets.0.conv1.lora_B.default_decoder.weight"]
        osediff = write(model)
    elif case == "misshaped_conv_in":
        model["state_dict_unet"]["conv_in.base_layer.weight"] = torch.zeros(16, 5, 3, 3)
        osediff = write(model)
    elif case == "prompt_with_ldm_file":
        (tmp_path / "v2-1_512-ema-pruned.ckpt").write_bytes(b"not read")
        sd, kwargs = tmp_path / "v2-1_512-ema-pruned.ckpt", {"prompt": "a face"}
    elif case == "unreadable_caption":
        kwargs = {"caption": tmp_path / "caption.txt"}
    out = tmp_path / "out"
    with pytest.raises((CheckpointError, ModelFolderError, ValueError, FileNotFoundError), match=CASES[case]) as info:
        import_osediff(out, sd, osediff, size=SIZE, progress=False, **kwargs)
    assert "\n" not in str(info.value)
    if case not in ("missing_sd", "missing_osediff", "not_sd_folder", "clipping_scheduler", "prompt_with_ldm_file", "unreadable_caption"):
        assert str(osediff) in str(info.value)  # the error names the OSEDiff file
    assert not out.exists() and not (tmp_path / "out.tmp-save").exists()


def test_cli_help_and_end_to_end_restore_and_evaluate(files, tmp_path, capsys):
    from facereward.cli import run
    from facereward.data.imageio import write_image

    assert run(["import-osediff", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "OSEDiff (SD 2.1 + LoRA on the UNet and the VAE encoder, one step at t=999)" in text and "--caption" in text
    out = tmp_path / "osediff"
    assert run(["import-osediff", str(out), "--sd", str(files / "sd21-base"), "--osediff", str(files / "osediff_face.pkl"),
                "--size", str(SIZE), "--prompt", "a face", "--no-progress"]) == 0
    assert "wrote OSEDiff (64 px, one step at t=999, epsilon prediction, prompt 'a face'" in capsys.readouterr().out
    for sub in ("lq", "hq"):
        for i in range(2):
            image = torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(10 * i + len(sub))).numpy()
            write_image(tmp_path / "set" / sub / f"{i}.png", image)
    assert run(["restore", str(tmp_path / "set" / "lq"), str(tmp_path / "restored"), "--model", str(out), "--steps", "1",
                "--no-progress"]) == 0
    assert len(list((tmp_path / "restored").glob("*.png"))) == 2
    assert run(["evaluate", "--testset", str(tmp_path / "set"), "--model", f"osediff={out}", "--steps", "1",
                "--out-dir", str(tmp_path / "eval"), "--identity", "none", "--landmarks", "none", "--fid", "none",
                "--no-progress"]) == 0
    assert (tmp_path / "eval" / "results.md").is_file()
    # a bad input through the CLI is one line on stderr and exit status 2
    assert run(["import-osediff", str(tmp_path / "x"), "--sd", str(files / "sd21-base"), "--osediff", str(tmp_path / "nope.pkl"),
                "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope.pkl" in err and "\n" not in err
