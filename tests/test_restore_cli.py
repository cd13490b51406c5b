"""`facereward restore` and the other commands: bad files skipped by name, the rest restored; --help everywhere."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from facereward.cli import app
from facereward.data.imageio import read_image
from facereward.inference import restore_files

runner = CliRunner()


@pytest.fixture
def saved_pixel_model(tmp_path, pixel_restorer):
    folder = tmp_path / "model"
    pixel_restorer.save_pretrained(folder)
    return folder


def _messy_folder(tmp_path, size=32):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / "good1.png")
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / "good2.jpg")
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (size, size, 4), dtype=np.uint8), mode="RGBA").save(folder / "alpha.png")
    good = (folder / "good1.png").read_bytes()
    (folder / "corrupt.png").write_bytes(good[: len(good) // 2])  # truncated
    return folder


def test_restore_folder_skips_bad_files_by_name(tmp_path, saved_pixel_model):
    folder = _messy_folder(tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(app, ["restore", "--model", str(saved_pixel_model), "--steps", "3", "--no-progress", str(folder), str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["good1.png", "good2.png"]
    err = result.stderr if hasattr(result, "stderr") else result.output
    assert "corrupt.png: corrupt or truncated image" in err
    assert "gray.png: grayscale image" in err
    assert "alpha.png: image has an alpha channel" in err
    assert "restored 2 of 5 images" in result.output
    assert read_image(out / "good1.png", size=32).shape == (32, 32, 3)


def test_restore_convert_accepts_gray_and_alpha(tmp_path, saved_pixel_model):
    folder = _messy_folder(tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(app, ["restore", "--model", str(saved_pixel_model), "--steps", "2", "--convert", "--save-stage1",
                                 "--no-progress", str(folder), str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["alpha.png", "good1.png", "good2.png", "gray.png"]
    assert (out / "stage1" / "gray.png").is_file()


def test_restore_wrong_size_is_skipped_unless_resize(tmp_path, saved_pixel_model):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((48, 40, 3), np.uint8)).save(folder / "big.png")
    result = runner.invoke(app, ["restore", "--model", str(saved_pixel_model), "--steps", "2", "--no-progress", str(folder), str(tmp_path / "o1")])
    assert result.exit_code == 1
    assert "big.png: wrong size 40x48" in result.output
    result = runner.invoke(app, ["restore", "--model", str(saved_pixel_model), "--steps", "2", "--resize", "--no-progress", str(folder / "big.png"), str(tmp_path / "o2")])
    assert result.exit_code == 0, result.output
    assert read_image(tmp_path / "o2" / "big.png").shape == (32, 32, 3)


def test_restore_results_do_not_depend_on_batch_size(tmp_path, pixel_restorer):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    files = sorted(folder.glob("*.png"))
    restore_files(pixel_restorer, files, tmp_path / "a", steps=3, batch_size=1, progress=False)
    restore_files(pixel_restorer, files, tmp_path / "b", steps=3, batch_size=3, progress=False)
    for f in files:
        a = np.asarray(Image.open(tmp_path / "a" / f.name)).astype(int)
        b = np.asarray(Image.open(tmp_path / "b" / f.name)).astype(int)
        assert np.abs(a - b).max() <= 1  # identical up to float rounding across batch shapes


def test_restore_missing_model_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "facereward.cli", "restore", "--model", str(tmp_path / "nope"), str(tmp_path), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'nope'}: no such model folder (restorers load from a local path only)"


@pytest.mark.parametrize("command", ["degrade", "toyfaces", "train-base", "build-restorer", "restore", "demo", "evaluate", "train-frm", "candidates", "annotate", "toy-preferences", "auto-label", "refl"])
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_degrade_command_writes_a_paired_set(tmp_path):
    hq = tmp_path / "hq_in"
    hq.mkdir()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(hq / "a.png")
    result = runner.invoke(app, ["degrade", "--preset", "codeformer", "--seed", "3", "--no-progress", str(hq), str(tmp_path / "set")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "set" / "lq" / "a.png").is_file() and (tmp_path / "set" / "manifest.json").is_file()


def test_candidates_command_lays_out_k_restorations(tmp_path, saved_pixel_model):
    import json

    testset = tmp_path / "set"
    (testset / "lq").mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(testset / "lq" / f"{name}.png")
    result = runner.invoke(app, ["candidates", str(testset), str(tmp_path / "c"), "--model", f"m={saved_pixel_model}", "--k", "3",
                                 "--etas", "0,1", "--steps", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    items = json.loads((tmp_path / "c" / "candidates.json").read_text())["items"]
    assert [len(it["candidates"]) for it in items] == [3, 3]
    assert [c["eta"] for c in items[0]["candidates"]] == [0.0, 1.0, 0.0]
    bad = runner.invoke(app, ["candidates", str(testset), str(tmp_path / "c2"), "--etas", "x"])
    assert bad.exit_code == 2 and "--etas" in bad.output
    as_option = runner.invoke(app, ["candidates", "--testset", str(testset), str(tmp_path / "c3"), "--model", f"m={saved_pixel_model}",
                                    "--k", "1", "--steps", "1", "--no-progress"])  # as evaluate spells it
    assert as_option.exit_code == 0, as_option.output
    assert len(json.loads((tmp_path / "c3" / "candidates.json").read_text())["items"]) == 2
    twice = runner.invoke(app, ["candidates", "--testset", str(testset), str(testset), str(tmp_path / "c4")])
    assert twice.exit_code == 2 and "give the test set once" in twice.output


def test_help_is_quick_and_imports_no_torch():
    code = ("import sys; from facereward.cli import run; rc = run(['--help']); rc2 = run(['refl', '--help']); "
            "assert rc == rc2 == 0; assert 'torch' not in sys.modules, 'torch imported by --help'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
