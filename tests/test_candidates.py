"""make_candidates: the annotation layout, determinism, extra candidates and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from facereward.candidates import load_candidates, make_candidates
from facereward.models.restorer import ModelFolderError, Restorer


def _write_testset(root, n=3, size=32, hq=True):
    rng = np.random.default_rng(0)
    (root / "lq").mkdir(parents=True)
    if hq:
        (root / "hq").mkdir()
    for i in range(n):
        img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        lq = np.asarray(Image.fromarray(img).resize((8, 8), Image.BILINEAR).resize((size, size), Image.BILINEAR))
        Image.fromarray(lq).save(root / "lq" / f"{i:04d}.png")
        if hq:
            Image.fromarray(img).save(root / "hq" / f"{i:04d}.png")
            (root / "hq" / f"{i:04d}.txt").write_text(f"face number {i}\n")
    return root


@pytest.fixture
def testset(tmp_path):
    return _write_testset(tmp_path / "set")


@pytest.fixture
def model_dirs(tmp_path, pixel_config):
    dirs = {}
    for name, s in [("base", 0), ("tuned", 1)]:
        torch.manual_seed(s)
        Restorer.build(pixel_config).save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    return dirs


def test_layout_matches_the_annotation_contract(tmp_path, testset, model_dirs):
    (testset / "toyworld.json").write_text('{"split": "train"}')
    out = make_candidates(testset, tmp_path / "out", {"base": model_dirs["base"]}, k=3, etas=(0.0, 1.0), steps=2,
                          seed=5, include_lq=True, include_gt=True, degraded_strengths=(0.3,), progress=False)
    data = json.loads((out / "candidates.json").read_text())
    assert data["k"] == 3 and data["testset"] == str(testset.resolve())
    assert [it["name"] for it in data["items"]] == ["0000", "0001", "0002"]
    item = data["items"][1]
    assert item["lq"] == "lq/0001.png" and item["gt"] == "gt/0001.png" and item["caption"] == "face number 1"
    assert [c["path"] for c in item["candidates"]] == [f"candidates/0001/c{j:02d}.png" for j in range(6)]
    assert [(c["model"], c["seed"], c["eta"], c["steps"]) for c in item["candidates"]] == [
        ("base", 5, 0.0, 2), ("base", 6, 1.0, 2), ("base", 7, 0.0, 2),
        ("lq", None, None, None), ("lq@0.3", None, None, None), ("gt", None, None, None)]
    for it in data["items"]:
        for rel in [it["lq"], it["gt"]] + [c["path"] for c in it["candidates"]]:
            assert (out / rel).is_file(), rel
    assert (out / "toyworld.json").read_text() == '{"split": "train"}'
    # the extra candidates are the LQ input and the GT themselves; lq@0.3 is a new, different image
    assert np.array_equal(np.asarray(Image.open(out / item["candidates"][3]["path"])), np.asarray(Image.open(testset / "lq" / "0001.png")))
    assert np.array_equal(np.asarray(Image.open(out / item["candidates"][5]["path"])), np.asarray(Image.open(testset / "hq" / "0001.png")))
    degraded = np.asarray(Image.open(out / item["candidates"][4]["path"])).astype(int)
    assert np.abs(degraded - np.asarray(Image.open(testset / "hq" / "0001.png")).astype(int)).mean() > 1
    # three restorations of the same input differ (different seeds)
    imgs = [np.asarray(Image.open(out / c["path"])) for c in item["candidates"][:3]]
    assert not np.array_equal(imgs[0], imgs[1]) and not np.array_equal(imgs[0], imgs[2])
    loaded = load_candidates(out)
    assert loaded[1].gt == out / "gt" / "0001.png" and loaded[1].paths[0] == out / "candidates" / "0001" / "c00.png"


def test_candidates_cycle_over_models(tmp_path, testset, model_dirs):
    out = make_candidates(testset, tmp_path / "out", model_dirs, k=4, etas=(0.0, 0.5, 1.0), steps=2, progress=False)
    item = json.loads((out / "candidates.json").read_text())["items"][0]
    assert [(c["model"], c["eta"], c["seed"]) for c in item["candidates"]] == [
        ("base", 0.0, 0), ("tuned", 0.5, 1), ("base", 1.0, 2), ("tuned", 0.0, 3)]


def test_deterministic_given_seed_and_different_across_seeds(tmp_path, testset, model_dirs):
    kw = {"models": {"base": model_dirs["base"]}, "k": 2, "etas": (1.0,), "steps": 2, "batch_size": 2, "progress": False}
    a = make_candidates(testset, tmp_path / "a", seed=3, **kw)
    b = make_candidates(testset, tmp_path / "b", seed=3, **kw)
    c = make_candidates(testset, tmp_path / "c", seed=4, **kw)
    files = sorted(p.relative_to(a) for p in (a / "candidates").rglob("*.png"))
    assert len(files) == 6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_rerun_replaces_the_previous_layout(tmp_path, testset, model_dirs):
    out = make_candidates(testset, tmp_path / "out", {"base": model_dirs["base"]}, k=3, steps=1, progress=False)
    make_candidates(testset, out, {"base": model_dirs["base"]}, k=1, steps=1, progress=False)
    assert sorted(p.name for p in (out / "candidates" / "0000").iterdir()) == ["c00.png"]


def test_no_gt_testset_gives_null_gt(tmp_path, model_dirs):
    root = _write_testset(tmp_path / "real", n=2, hq=False)
    out = make_candidates(root, tmp_path / "out", {"base": model_dirs["base"]}, k=1, steps=1, include_lq=True, progress=False)
    data = json.loads((out / "candidates.json").read_text())
    assert all(it["gt"] is None for it in data["items"]) and not (out / "gt").exists()
    with pytest.raises(FileNotFoundError, match="ground truth"):
        make_candidates(root, tmp_path / "out2", {"base": model_dirs["base"]}, k=1, steps=1, include_gt=True, progress=False)


def test_clear_errors(tmp_path, testset, model_dirs):
    with pytest.raises(FileNotFoundError, match="no such test set"):
        make_candidates(tmp_path / "nope", tmp_path / "out", {"base": model_dirs["base"]}, progress=False)
    with pytest.raises(ModelFolderError, match="'missing'.*not a facereward restorer"):
        make_candidates(testset, tmp_path / "out", {"missing": tmp_path / "no-model"}, progress=False)
    with pytest.raises(ValueError, match="reserved"):
        make_candidates(testset, tmp_path / "out", {"gt": model_dirs["base"]}, progress=False)
    with pytest.raises(FileNotFoundError, match="not a candidates folder"):
        load_candidates(tmp_path)


def test_size_mismatch_and_same_folder_are_refused_before_writing(tmp_path, model_dirs):
    root = _write_testset(tmp_path / "big", n=1, size=48)
    with pytest.raises(ValueError, match="48x48.*restores 32x32"):
        make_candidates(root, tmp_path / "out", {"base": model_dirs["base"]}, k=1, steps=1, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="must differ"):
        make_candidates(root, root, {"base": model_dirs["base"]}, k=1, steps=1, progress=False)
    assert (root / "lq" / "0000.png").is_file()
