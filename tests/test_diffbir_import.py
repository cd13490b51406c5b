"""`import-diffbir` against a plain-torch reference of the original modules, on fabricated checkpoints (docs/methods.md 0).

The real files (v2-1_512-ema-pruned.ckpt, v1_face.pth, face_swinir_v1.ckpt) cannot be fetched here, so the fixtures
write seeded random weights in their exact layouts at a tiny width that keeps the real key names and counts (686 UNet,
324 ControlNet, 732 SwinIR tensors), import them, and compare every stage with the reference in tests/diffbir_reference.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import diffbir_reference as R
from facereward.models.checkpoint_io import CheckpointError
from facereward.models.ddim import DDIMSchedule, make_scheduler, rollout
from facereward.models.diffbir_import import import_diffbir
from facereward.models.restorer import ModelFolderError, Restorer, SamplerOptions
from facereward.models.swinir import SwinIR
from test_swinir import _randomised, reference_swinir

SIZE, HEADS = 64, 8  # 64 px faces -> 8x8 latents; the tiny reference's 8-wide attention heads
SWINIR_TINY = {"embed_dim": 12}  # the face config otherwise: 8 x 6 blocks of 6 heads, window 8, unshuffle 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffbir")
    R.fabricate_sd21(root / "sd21.ckpt", seed=0)
    R.fabricate_v1_face(root / "v1_face.pth", seed=1)
    swinir = _randomised(SwinIR(**SWINIR_TINY), seed=2)
    torch.save({"state_dict": {"module." + k: v for k, v in swinir.state_dict().items()}}, root / "face_swinir.ckpt")
    return root


@pytest.fixture(scope="module")
def imported(files):
    out = files / "restorer"
    import_diffbir(out, files / "sd21.ckpt", files / "v1_face.pth", files / "face_swinir.ckpt", size=SIZE,
                   head_channels=HEADS, progress=False)
    return Restorer.from_pretrained(out)


@pytest.fixture(scope="module")
def reference(files):
    return R.reference_from_files(files / "sd21.ckpt", files / "v1_face.pth")


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    assert a.shape == b.shape
    err = (a.double() - b.double()).abs().max().item()
    assert err <= atol, f"max abs difference {err:.2e} > {atol:.0e}"


def test_fabricated_files_have_the_real_key_counts(files):
    sd = torch.load(files / "sd21.ckpt", weights_only=True)["state_dict"]
    assert sum(k.startswith(R.UNET_PREFIX) for k in sd) == 686
    assert len(torch.load(files / "v1_face.pth", weights_only=True)) == 324
    assert len(torch.load(files / "face_swinir.ckpt", weights_only=True)["state_dict"]) == 732


def test_imported_restorer_is_diffbir_shaped(imported):
    cfg = imported.config
    assert (cfg.mode, cfg.size, cfg.cleaner, cfg.eta, cfg.colour_fix) == ("latent", SIZE, "swinir", 1.0, True)
    assert imported.scheduler.config.timestep_spacing == "linspace" and imported.scheduler.config.set_alpha_to_one
    assert imported.controlnet.conv_in.weight.shape == (32, 8, 3, 3)
    assert not any("cond_embedding" in n for n, _ in imported.controlnet.named_parameters())


def test_residuals_and_eps_match_the_reference(imported, reference):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    c = torch.randn(2, 4, 8, 8, generator=g)
    ctx = reference.prompt_embedding().expand(2, -1, -1)
    with torch.no_grad():
        for t in (999, 0):
            tt = torch.full((2,), t)
            eps, residuals = imported.predict_eps(x, tt, c, return_residuals=True)
            ref_res = reference.residuals(x, c, tt, ctx)
            assert len(residuals) == len(ref_res) == 13
            for ours, theirs in zip(residuals, ref_res):
                _close(ours, theirs, atol=1e-4 * max(1.0, theirs.abs().max().item()))
            _close(eps, reference.eps(x, c, tt, ctx))


def test_vae_prompt_and_swinir_match_the_reference(imported, reference, files):
    g = torch.Generator().manual_seed(4)
    image = torch.rand(2, 3, SIZE, SIZE, generator=g)
    with torch.no_grad():
        _close(imported.condition(image), reference.condition(image))
        z = torch.randn(2, 4, 8, 8, generator=g)
        _close(imported.decode(z), reference.decode(z))
        _close(imported.prompt_embeds, reference.prompt_embedding())
        sd = {k.removeprefix("module."): v for k, v in
              torch.load(files / "face_swinir.ckpt", weights_only=True)["state_dict"].items()}
        lq = torch.rand(1, 3, SIZE, SIZE, generator=g)
        _close(imported.cleaner(lq), reference_swinir(lq, sd))
        # DiffBIR conditions on SwinIR's raw output (not clamped): so does the import
        assert imported.config.clamp_clean is False and torch.equal(imported.clean(lq), imported.cleaner(lq))


def test_four_step_sample_matches_the_reference(imported, reference):
    g = torch.Generator().manual_seed(5)
    lq = torch.rand(1, 3, SIZE, SIZE, generator=g)
    x_T = torch.randn(1, 4, 8, 8, generator=g)
    step = torch.Generator().manual_seed(6)
    noises = [torch.randn(1, 4, 8, 8, generator=step) for _ in range(4)]
    with torch.no_grad():
        out = imported.restore(lq, steps=4, x_T=x_T, generator=torch.Generator().manual_seed(6))
        clean = imported.clean(lq)
        theirs = reference.restore(clean, x_T, noises, 4).clamp(0, 1)
    _close(out["restored"], theirs)
    # without the colour fix the output differs: the option reaches the sampler
    with torch.no_grad():
        plain = imported.restore(lq, steps=4, x_T=x_T, generator=torch.Generator().manual_seed(6),
                                 sampler=SamplerOptions(colour_fix=False))
    assert (plain["restored"] - out["restored"]).abs().max() > 1e-3


def test_spaced_sampling_equals_ddim_eta_one_in_float64():
    """DiffBIR's respaced DDPM sampler and DDIM at eta 1 on the same (linspace) timesteps, with the same noise."""
    def eps_fn(x, t):
        return 0.5 * torch.tanh(x) + (t.to(x.dtype) / 1000.0).reshape(-1, 1, 1, 1) * 0.1

    g = torch.Generator().manual_seed(7)
    x_T = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    step = torch.Generator().manual_seed(8)
    noises = [torch.randn(2, 4, 6, 6, generator=step, dtype=torch.float64) for _ in range(50)]
    alphas_cumprod = torch.as_tensor(R.sd21_alphas_cumprod(), dtype=torch.float64)  # DiffBIR's float64 schedule
    ref, timesteps = R.reference_spaced_sample(eps_fn, x_T, alphas_cumprod, 50, noises, model_dtype=torch.float64)
    ours_schedule = DDIMSchedule.from_timesteps(alphas_cumprod, timesteps, final_alpha_cumprod=1.0)
    assert DDIMSchedule.from_scheduler(make_scheduler(spacing="linspace"), 50).timesteps.tolist() == list(timesteps)
    # the schedules differ only in float32 rounding: diffusers computes betas in float32, DiffBIR in float64
    torch.testing.assert_close(make_scheduler().alphas_cumprod.double(), alphas_cumprod, rtol=1e-6, atol=0)
    ours = rollout(eps_fn, x_T, ours_schedule, eta=1.0, generator=torch.Generator().manual_seed(8), record=False)
    _close(ours, ref, atol=1e-12)


def test_safetensors_sd_gives_the_same_restorer(files, imported, tmp_path):
    sd = torch.load(files / "sd21.ckpt", weights_only=True)["state_dict"]
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "sd21.safetensors")
    again = import_diffbir(tmp_path / "out", tmp_path / "sd21.safetensors", files / "v1_face.pth",
                           files / "face_swinir.ckpt", size=SIZE, head_channels=HEADS, progress=False)
    for a, b in zip(again.controlnet.state_dict().values(), imported.controlnet.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(again.prompt_embeds, imported.prompt_embeds)


class Unpicklable:
    """An arbitrary class: torch.load(weights_only=True) must refuse a file holding one."""


def _bad(tmp_path, name: str, sd: dict | None = None, raw: bytes | None = None):
    path = tmp_path / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize("case", ["truncated_sd", "unet_as_controlnet", "sd1_checkpoint", "missing_controlnet_key",
                                  "extra_controlnet_key", "misshaped_controlnet_key", "controlnet_as_swinir",
                                  "pickled_object"])
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, case):
    sd_path, cn_path, sw_path = files / "sd21.ckpt", files / "v1_face.pth", files / "face_swinir.ckpt"
    cn = torch.load(cn_path, weights_only=True)
    if case == "truncated_sd":
        sd_path = _bad(tmp_path, "sd.ckpt", raw=sd_path.read_bytes()[: sd_path.stat().st_size // 2])
        match = "unreadable Stable Diffusion checkpoint"
    elif case == "unet_as_controlnet":
        cn_path, match = sd_path, "not a ControlNet"
    elif case == "sd1_checkpoint":
        sd = torch.load(sd_path, weights_only=True)["state_dict"]
        sd = {k.replace("cond_stage_model.model.", "cond_stage_model.transformer."): v for k, v in sd.items()}
        sd_path, match = _bad(tmp_path, "sd15.ckpt", {"state_dict": sd}), "Stable Diffusion 1.x"
    elif case == "missing_controlnet_key":
        cn.pop("input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight")
        cn_path, match = _bad(tmp_path, "cn.pth", cn), "missing down_blocks.1.attentions.0"
    elif case == "extra_controlnet_key":
        cn["input_blocks.1.0.extra.weight"] = torch.zeros(3)
        cn_path, match = _bad(tmp_path, "cn.pth", cn), r"unexpected input_blocks\.1\.0\.extra\.weight"
    elif case == "misshaped_controlnet_key":
        cn["zero_convs.3.0.weight"] = torch.zeros(5, 5, 1, 1)
        cn_path, match = _bad(tmp_path, "cn.pth", cn), r"mis-shaped zero_convs\.3\.0\.weight \(-> controlnet_down_blocks\.3\.weight\)"
    elif case == "controlnet_as_swinir":
        sw_path, match = cn_path, "not a SwinIR"
    else:
        sd_path = _bad(tmp_path, "evil.ckpt", {"state_dict": {"x": torch.zeros(1)}, "obj": Unpicklable()})
        match = "refused by torch.load"
    out = tmp_path / "out"
    with pytest.raises((CheckpointError, ModelFolderError, ValueError), match=match) as info:
        import_diffbir(out, sd_path, cn_path, sw_path, size=SIZE, head_channels=HEADS, progress=False)
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_cli_imports_then_restores_and_evaluates(files, tmp_path):
    from facereward.cli import run
    from facereward.data.imageio import write_image

    out = tmp_path / "diffbir"
    assert run(["import-diffbir", str(out), "--sd", str(files / "sd21.ckpt"), "--controlnet", str(files / "v1_face.pth"),
                "--swinir", str(files / "face_swinir.ckpt"), "--size", str(SIZE), "--head-channels", str(HEADS),
                "--no-progress"]) == 0
    for sub in ("lq", "hq"):
        for i in range(2):
            write_image(tmp_path / "set" / sub / f"{i}.png", torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(i)).numpy())
    assert run(["restore", str(tmp_path / "set" / "lq"), str(tmp_path / "restored"), "--model", str(out), "--steps", "2",
                "--eta", "0.8", "--no-progress"]) == 0
    assert len(list((tmp_path / "restored").glob("*.png"))) == 2
    import json
    used = json.loads((tmp_path / "restored" / "restore.json").read_text())
    assert (used["eta"], used["spacing"], used["final_alpha_bar"], used["colour_fix"]) == (0.8, "linspace", "one", True)
    assert run(["evaluate", "--testset", str(tmp_path / "set"), "--model", f"diffbir={out}", "--steps", "2",
                "--out-dir", str(tmp_path / "eval"), "--identity", "none", "--landmarks", "none", "--fid", "none",
                "--no-progress"]) == 0
    header = (tmp_path / "eval" / "results.md").read_text().splitlines()[0]
    assert "diffbir: eta 1.0, linspace spacing, final alpha-bar one, colour fix" in header


def test_refl_and_lrpo_post_train_an_imported_model(files, imported, tmp_path):
    """The imported folder is an ordinary restorer: both trainers load it, change only the ControlNet, and save it."""
    import yaml

    from facereward.cli import run
    from facereward.weights import WEIGHTS_DIR

    model = files / "restorer"
    lrpo = {"run": {"output_dir": str(tmp_path / "lrpo"), "progress": False, "save_every": 1}, "init_from": str(model),
            "data": {"toy_faces": 4, "size": SIZE}, "rewards": {"weights": {"wavelet": 0.5, "ssim": 0.5}},
            "group_size": 2, "inputs_per_batch": 1, "batches_per_epoch": 1, "epochs": 1, "sample_steps": 3, "micro_batch": 2,
            "reg_steps": 1, "lr": 1e-3, "held_out": {"every": 0}, "spacing": "leading", "final_alpha_bar": "first"}
    (tmp_path / "lrpo.yaml").write_text(yaml.safe_dump(lrpo))
    assert run(["lrpo", "--config", str(tmp_path / "lrpo.yaml")]) == 0
    assert run(["refl", "--init-from", str(model), "--frm", str(WEIGHTS_DIR / "toy-frm"), "--toy-faces", "2", "--train-steps", "1",
                "--output-dir", str(tmp_path / "refl"), "--set", f"data.size={SIZE}", "--set", "sample_steps=2",
                "--set", "held_out.every=0", "--set", "batch_size=1", "--set", "run.progress=false",
                "--set", "grad_window=1", "--set", "losses.weights.lpips=0"]) == 0
    for name in ("lrpo", "refl"):
        trained = Restorer.from_pretrained(tmp_path / name / "model")
        assert trained.config.cleaner == "swinir" and trained.config.colour_fix
        changed = [k for k, v in trained.controlnet.state_dict().items() if not torch.equal(v, imported.controlnet.state_dict()[k])]
        assert changed, name
        assert all(torch.equal(v, imported.unet.state_dict()[k]) for k, v in trained.unet.state_dict().items())


def test_a_diffusers_sd_folder_gives_the_same_networks(files, imported, tmp_path, make_clip_tokenizer):
    """--sd as a diffusers folder: the UNet and VAE are taken as saved, the prompt comes from its text encoder."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path / "sd21"
    imported.unet.save_pretrained(folder / "unet")
    imported.vae.save_pretrained(folder / "vae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(folder / "scheduler")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}
    make_clip_tokenizer(vocab, model_max_length=6).save_pretrained(folder / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=3, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 max_position_embeddings=6, bos_token_id=0, eos_token_id=1, pad_token_id=1)).save_pretrained(folder / "text_encoder")
    again = import_diffbir(tmp_path / "out", folder, files / "v1_face.pth", files / "face_swinir.ckpt", size=SIZE,
                           head_channels=HEADS, progress=False)
    for name in ("unet", "controlnet", "vae"):
        ours, theirs = getattr(again, name).state_dict(), getattr(imported, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert again.prompt_embeds.shape == (1, 6, 32)
