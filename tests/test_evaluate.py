"""`facereward evaluate`: the table, its files, output folders, no-GT sets, errors."""

from __future__ import annotations

import csv
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from facereward.cli import app
from facereward.data.imageio import read_image, write_image
from facereward.data.testset import write_toy_testset
from facereward.data.testset import write_degraded_testset
from facereward.data.toyfaces import TOY_MARKER, write_toyfaces
from facereward.evaluate import EvaluateConfig, evaluate, markdown_table, redraw_grid


@pytest.fixture(scope="module")
def toy_testset(tmp_path_factory):
    return write_toy_testset(tmp_path_factory.mktemp("toy") / "set", n=6, size=64, seed=0)


def test_images_equal_to_gt_score_perfectly_and_lq_does_not(toy_testset, tmp_path):
    cfg = EvaluateConfig(testset=str(toy_testset), out_dir=str(tmp_path / "o"), images={"oracle": str(toy_testset / "hq")},
                         identity="dlib", landmarks="dlib", fid="none", batch_size=4, progress=False)
    result = evaluate(cfg)
    oracle, lq = result.rows["oracle"], result.rows["LQ"]
    assert oracle["PSNR"] == float("inf") and oracle["SSIM"] == pytest.approx(1.0)
    assert oracle["IDS (dlib-resnet128)"] == pytest.approx(1.0, abs=1e-5)
    assert oracle["LMD (dlib-68)"] == pytest.approx(0.0, abs=1e-6)
    assert lq["PSNR"] < 30 and lq["SSIM"] < oracle["SSIM"] and lq["LMD (dlib-68)"] > 0
    # the per-image values behind the means
    assert len(result.per_image["LQ"]["PSNR"]) == 6
    assert lq["PSNR"] == pytest.approx(np.mean(result.per_image["LQ"]["PSNR"]))
    # files
    out = tmp_path / "o"
    rows = list(csv.reader(open(out / "results.csv")))
    assert rows[0][:3] == ["method", "PSNR", "SSIM"] and [r[0] for r in rows[1:]] == ["LQ", "oracle"]
    payload = json.loads((out / "results.json").read_text())
    assert payload["judges"]["identity"] == "dlib-resnet128"
    assert (out / "grid.png").is_file() and "| oracle |" in (out / "results.md").read_text()


def test_model_rows_stage1_and_saved_outputs(toy_testset, tmp_path, pixel_config):
    from facereward.models.restorer import Restorer

    pixel_config.size = 64
    Restorer.build(pixel_config).save_pretrained(tmp_path / "m")
    cfg = EvaluateConfig(testset=str(toy_testset), out_dir=str(tmp_path / "o"), models={"tiny": str(tmp_path / "m")},
                         include_stage1=True, sample_steps=2, identity="none", landmarks="none", fid="none", progress=False)
    result = evaluate(cfg)
    assert list(result.rows) == ["LQ", "tiny (stage 1)", "tiny"]
    # a fresh cleaner is the identity (zero-initialised tail): stage 1 scores equal the LQ's
    assert result.rows["tiny (stage 1)"]["PSNR"] == pytest.approx(result.rows["LQ"]["PSNR"])
    saved = sorted(p.name for p in (tmp_path / "o" / "outputs" / "tiny").glob("*.png"))
    assert saved == sorted(p.name for p in (toy_testset / "lq").glob("*.png"))
    # evaluating the saved outputs as a folder reproduces the model's row
    again = evaluate(EvaluateConfig(testset=str(toy_testset), out_dir=str(tmp_path / "o2"), include_lq=False,
                                    images={"tiny": str(tmp_path / "o" / "outputs" / "tiny")}, identity="none",
                                    landmarks="none", fid="none", progress=False))
    assert again.rows["tiny"]["PSNR"] == pytest.approx(result.rows["tiny"]["PSNR"], abs=1e-3)  # PNG rounding (float32 vs 64)
    # the grid redrawn from the saved files is the run's grid
    grid = read_image(tmp_path / "o" / "grid.png")
    (tmp_path / "o" / "grid.png").unlink()
    assert np.array_equal(read_image(redraw_grid(tmp_path / "o")), grid)


def test_fid_against_a_reference_without_gt(toy_testset, tmp_path):
    no_gt = tmp_path / "real"
    shutil.copytree(toy_testset / "lq", no_gt / "lq")
    cfg = EvaluateConfig(testset=str(no_gt), out_dir=str(tmp_path / "o"), images={"same-as-hq": str(toy_testset / "hq")},
                         identity="dlib", fid_reference=str(toy_testset / "hq"), options={"kid": {"subsets": 5}},
                         progress=False)
    with pytest.warns(UserWarning, match="singular"):
        result = evaluate(cfg)
    assert "PSNR" not in result.rows["LQ"]  # no GT: no full-reference metrics
    fid_col = "FID (dlib-resnet128)"
    assert result.rows["same-as-hq"][fid_col] == pytest.approx(0.0, abs=1e-6)
    assert result.rows["LQ"][fid_col] > 0.01


def test_missing_outputs_and_bad_options_are_clear(toy_testset, tmp_path):
    partial = tmp_path / "partial"
    for p in sorted((toy_testset / "hq").glob("*.png"))[:2]:
        write_image(partial / p.name, read_image(p))
    with pytest.raises(FileNotFoundError, match="4 outputs for 'x' are missing"):
        evaluate(EvaluateConfig(testset=str(toy_testset), out_dir=str(tmp_path / "o"), images={"x": str(partial)}, progress=False))
    with pytest.raises(ValueError, match="features must be auto, identity, inception:PATH or none, got 'bogus'"):
        evaluate(EvaluateConfig(testset=str(toy_testset), out_dir=str(tmp_path / "o"), identity="none", landmarks="none", fid="bogus", progress=False))
    with pytest.raises(ValueError, match="measure 'lpips' needs both backbone_path and heads_path"):
        evaluate(EvaluateConfig(testset=str(toy_testset), out_dir=str(tmp_path / "o"), options={"lpips": {"backbone_path": "x.pth"}},
                                identity="none", landmarks="none", fid="none", progress=False))


def test_evaluate_command(toy_testset, tmp_path):
    result = CliRunner().invoke(app, ["evaluate", "--testset", str(toy_testset), "--images", f"gt={toy_testset / 'hq'}",
                                      "--identity", "none", "--landmarks", "none", "--fid", "none", "--out-dir", str(tmp_path / "o"),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "| gt | inf | 1.0000 |" in result.output
    bad = CliRunner().invoke(app, ["evaluate", "--testset", str(toy_testset), "--images", "nodir"])
    assert bad.exit_code == 2 and "NAME=DIR" in bad.output


def test_markdown_table_formats_and_missing_values():
    table = markdown_table({"a": {"PSNR": 21.234, "SSIM": 0.61234}, "b": {"PSNR": float("nan")}})
    assert table.splitlines() == ["| | PSNR | SSIM |", "|---|---|---|", "| a | 21.23 | 0.6123 |", "| b | - | - |"]


def test_frm_score_column_without_gt(toy_testset, tmp_path):
    from facereward.models.frm import FaceRewardModel, FRMConfig

    torch.manual_seed(0)
    frm = FaceRewardModel(FRMConfig(backbone="cnn", input_size=32, cnn_widths=[8, 16]))
    frm.save_pretrained(tmp_path / "myfrm")
    no_gt = tmp_path / "real"
    shutil.copytree(toy_testset / "lq", no_gt / "lq")
    result = evaluate(EvaluateConfig(testset=str(no_gt), out_dir=str(tmp_path / "o"), options={"frm": {"path": str(tmp_path / "myfrm")}},
                                     images={"gt": str(toy_testset / "hq")}, identity="none", fid="none", progress=False))
    lq_images = torch.stack([torch.from_numpy(read_image(p).transpose(2, 0, 1)) for p in sorted((no_gt / "lq").glob("*.png"))])
    with torch.no_grad():
        expected = frm.score(lq_images).mean().item()
    assert result.rows["LQ"]["FRM (myfrm)"] == pytest.approx(expected, abs=1e-5)
    assert set(result.rows["gt"]) == {"FRM (myfrm)"}


@pytest.fixture(scope="module")
def toyfaces_testset(tmp_path_factory):
    """`facereward toyfaces` then `facereward degrade` of its test images: no demo helper involved."""
    root = tmp_path_factory.mktemp("toyfaces")
    write_toyfaces(root / "toys", n=10, size=64, seed=0, progress=False)
    write_degraded_testset(root / "toys" / "test" / "images", root / "toy-test", progress=False)
    return root / "toy-test"


def test_a_toyfaces_set_degraded_by_hand_gets_the_toy_judges(toyfaces_testset, tmp_path):
    assert (toyfaces_testset / TOY_MARKER).is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dlib warning on a toy set
        result = evaluate(EvaluateConfig(testset=str(toyfaces_testset), out_dir=str(tmp_path / "o"), fid="none", progress=False))
    assert result.judges["identity"] == "toy-id" and result.judges["landmarks"] == "toy-lmk"
    assert "IDS (toy-id)" in result.rows["LQ"]


def test_auto_dlib_on_small_plain_faces_warns(toyfaces_testset, tmp_path):
    plain = tmp_path / "plain"  # the same faces without the marker: a set evaluate cannot tell is toy
    for sub in ("lq", "hq"):
        shutil.copytree(toyfaces_testset / sub, plain / sub)
    with pytest.warns(UserWarning, match=r"dlib-resnet128 on 64x64 px faces are unreliable.*--identity toy.*toyworld\.json"):
        result = evaluate(EvaluateConfig(testset=str(plain), out_dir=str(tmp_path / "o"), landmarks="none", fid="none",
                                         progress=False))
    assert result.judges["identity"] == "dlib-resnet128"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for by name: the user knows
        evaluate(EvaluateConfig(testset=str(plain), out_dir=str(tmp_path / "o2"), identity="dlib", landmarks="none",
                                fid="none", progress=False))
