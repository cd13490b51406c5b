"""The one-step restorer family (docs/methods.md 0.1): its one call by hand, its folder, the commands that take it
(restore, evaluate, refl) and the ones that cannot (lrpo, nft, dpo: a one-line error)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from facereward.cli import app
from facereward.cli import run as cli_run
from facereward.models.ddim import output_to_x0
from facereward.models.families import family_of, load_restorer
from facereward.models.onestep import OneStepConfig, OneStepRestorer
from facereward.models.restorer import ModelFolderError, PixelUNetConfig

TINY_PIXEL = PixelUNetConfig(block_out_channels=[16, 32], attention_levels=[False, False], norm_num_groups=8)


def tiny(mode: str = "pixel", **kw) -> OneStepRestorer:
    torch.manual_seed(0)
    return OneStepRestorer.build(OneStepConfig(mode=mode, size=32, pixel=TINY_PIXEL, **kw))


@pytest.fixture
def onestep_dir(tmp_path):
    tiny("pixel", prediction_type="v_prediction").save_pretrained(tmp_path / "onestep")
    return tmp_path / "onestep"


def test_the_pixel_step_by_hand():
    r = tiny("pixel", prediction_type="v_prediction", timestep=700)
    lq = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x = 2 * lq - 1
    t = torch.full((2,), 700)
    with torch.no_grad():
        v = r.net.unet(x, t).sample
    abar = r.scheduler.alphas_cumprod[700].float()
    expected = (abar.sqrt() * x - (1 - abar).sqrt() * v + 1) / 2  # x0 = sqrt(abar) x_t - sqrt(1 - abar) v
    out = r.restore(lq)
    assert torch.allclose(out["restored"], expected.clamp(0, 1), atol=1e-6)
    assert torch.equal(out["clean"], lq)  # no stage 1


def test_the_latent_step_samples_the_posterior_with_the_given_noise():
    r = tiny("latent")
    lq = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(r.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        moments = r.vae.quant_conv(r.vae.encoder(2 * lq - 1))
        mean, logvar = moments.chunk(2, dim=1)
        z = (mean + torch.exp(0.5 * logvar) * noise) * r.vae.config.scaling_factor
        t = torch.full((2,), r.config.timestep)
        eps = r.net.unet(z, t, encoder_hidden_states=r.prompt_embeds.expand(2, -1, -1)).sample
        z0 = output_to_x0(eps, z, r.scheduler.alphas_cumprod[t].float(), "epsilon")
        expected = (r.vae.decode(z0 / r.vae.config.scaling_factor).sample + 1) / 2
        out = r.restore(lq, x_T=noise)["restored"]
    assert torch.allclose(out, expected.clamp(0, 1), atol=1e-5)
    again = r.restore(lq, x_T=noise)["restored"]
    assert torch.equal(out, again)
    mean_only = tiny("latent", latent_sample=False).restore(lq, x_T=noise)["restored"]
    assert not torch.allclose(mean_only, out)


@pytest.mark.parametrize("mode", ["pixel", "latent"])
def test_a_folder_round_trips_through_the_family_loader(mode, tmp_path):
    r = tiny(mode)
    r.save_pretrained(tmp_path / "m")
    assert family_of(tmp_path / "m") == "one-step"
    loaded = load_restorer(tmp_path / "m")
    assert isinstance(loaded, OneStepRestorer) and loaded.config == r.config
    lq = torch.rand(1, 3, 32, 32)
    noise = torch.randn(r.latent_shape(1, 32, 32))
    assert torch.equal(loaded.restore(lq, x_T=noise)["restored"], r.restore(lq, x_T=noise)["restored"])
    meta = json.loads((tmp_path / "m" / "facereward.json").read_text())
    meta["family"] = "three-step"
    (tmp_path / "m" / "facereward.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFolderError, match="unknown restorer family 'three-step'"):
        load_restorer(tmp_path / "m")
    with pytest.raises(ModelFolderError, match="no such model folder"):
        load_restorer(tmp_path / "nowhere")


@pytest.mark.parametrize("command", ["lrpo", "nft", "dpo"])
def test_the_multi_step_trainers_refuse_a_one_step_restorer_in_one_line(command, onestep_dir, tmp_path, capsys):
    rc = cli_run([command, "--init-from", str(onestep_dir), "--toy-faces", "4", "--set", f"run.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "one-step restorer" in line[0] and "facereward refl --init-from" in line[0]
    assert "Traceback" not in err


def test_restore_and_evaluate_take_a_one_step_folder(onestep_dir, tmp_path):
    from facereward.data.testset import write_toy_testset

    testset = write_toy_testset(tmp_path / "set", n=2, size=32, seed=0)
    assert cli_run(["restore", "--model", str(onestep_dir), str(testset / "lq"), str(tmp_path / "restored")]) == 0
    settings = json.loads((tmp_path / "restored" / "restore.json").read_text())
    assert settings["one_step_timestep"] == 999 and settings["written"] == 2
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", "--testset", str(testset), "--model", f"one={onestep_dir}",
                                      "--metrics", "psnr,ids", "--out-dir", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "results.json").read_text())
    assert payload["sampling"]["one"]["one_step_timestep"] == 999 and "one step at t = 999" in (out / "results.md").read_text()
    assert cli_run(["evaluate", "--testset", str(testset), "--model", f"one={onestep_dir}", "--stage1", "--metrics", "psnr",
                    "--out-dir", str(out), "--no-progress"]) == 2


def _refl_config(tmp_path, init_from, frm, **kw):
    return {"run": {"save_every": 2, "log_every": 1, "progress": False, "speed": "off", "output_dir": str(tmp_path / "run")},
            "init_from": str(init_from), "rewards": {"weights": {"frm": 1.0}, "options": {"frm": {"path": str(frm)}}},
            "data": {"toy_faces": 6, "size": 32, "toy_identities": 10}, "train_steps": 3, "batch_size": 2, "lr": 1e-3,
            "reward_weight": 1.0, "reg_weight": 1.0,
            "losses": {"weights": {"wavelet": 0.01}, "options": {"wavelet": {"wavelet": "dtcwt", "levels": 3, "clamp": True}}},
            "dynamic_frm": {"every": 1, "lr": 1e-3}, "held_out": {"every": 0}, **kw}


@pytest.fixture
def tiny_frm_dir(tmp_path):
    from facereward.models.frm import FaceRewardModel, FRMConfig

    torch.manual_seed(1)
    FaceRewardModel(FRMConfig(backbone="cnn", input_size=32, cnn_widths=[8, 16], cnn_depth=1)).save_pretrained(tmp_path / "frm")
    return tmp_path / "frm"


@pytest.mark.parametrize("mode,rank", [("pixel", 0), ("latent", 0), ("latent", 4)])
def test_refl_trains_a_one_step_restorer_through_its_single_step(mode, rank, tmp_path, tiny_frm_dir):
    import yaml

    from facereward.train.refl import ReFLConfig, train_refl
    from facereward.config import load_config

    start = tmp_path / "start"
    tiny(mode).save_pretrained(start)
    cfg = _refl_config(tmp_path, start, tiny_frm_dir, lora={"rank": rank})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = train_refl(load_config(ReFLConfig, tmp_path / "c.yaml", []))
    assert family_of(out) == "one-step" and isinstance(load_restorer(out), OneStepRestorer)
    log = json.loads((tmp_path / "run" / "metrics.json").read_text())["train_log"]
    assert len(log) == 3 and all(r["refl/grad_step"] == 0.0 for r in log)
    assert log[0]["refl/reg_loss"] == 0.0 and log[-1]["refl/reg_loss"] > 0  # the initial network, then it moves
    before = {k: v for f in ("unet",) for k, v in load_file(next((start / f).glob("*.safetensors"))).items()}
    after = load_file(next((out / "unet").glob("*.safetensors")))
    assert before.keys() == after.keys()  # LoRA merged: the plain layout
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if mode == "latent":  # the VAE encoder trained too, the decoder not
        vb, va = load_file(next((start / "vae").glob("*.safetensors"))), load_file(next((out / "vae").glob("*.safetensors")))
        assert any(not torch.equal(vb[k], va[k]) for k in vb if k.startswith("encoder."))
        assert all(torch.equal(vb[k], va[k]) for k in vb if k.startswith("decoder."))


def test_the_shipped_one_step_base_restores_toy_faces_beyond_their_lq(tmp_path):
    from facereward.data.datasets import PairedFolderDataset, collate_batch
    from facereward.data.testset import write_toy_testset
    from facereward.measures.fullref import psnr
    from facereward.weights import default_onestep_path

    testset = write_toy_testset(tmp_path / "set", n=4, size=64, seed=3)
    batch = collate_batch([PairedFolderDataset(testset)[i] for i in range(4)])
    restorer = load_restorer(default_onestep_path())
    assert restorer.family == "one-step" and restorer.config.timestep == 999
    out = restorer.restore(batch["lq"])["restored"]
    assert psnr(out, batch["hq"]).mean() > psnr(batch["lq"], batch["hq"]).mean() + 1.0  # ~3.4 dB on 32 faces


def test_the_one_step_recipes_load():
    from facereward.config import load_config
    from facereward.train.refl import ReFLConfig

    toy = load_config(ReFLConfig, "configs/refl_onestep_toy.yaml", [])
    assert toy.init_from == "src/facereward/weights/toy-onestep" and toy.losses.weights == {"wavelet": 0.1}
    real = load_config(ReFLConfig, "configs/refl_osediff.yaml", [])
    assert real.lora.rank == 4 and real.lora.alpha == 8 and "quant_conv" in real.lora.target_modules
