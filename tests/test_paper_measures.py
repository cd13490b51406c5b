"""The no-reference and perceptual rows BFR papers report (musiq-*, maniqa-*, topiq-nr*, dists) as rows of the
measures table: listed with their weight files, built from a path, scored through `evaluate --weights`, recorded
with their files' SHA-256. The architectures' parity with pyiqa is in test_musiq/maniqa/topiq/dists."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from facereward.cli import app
from facereward.data.testset import write_toy_testset
from facereward.measures import MissingNeeds, create_measure, format_measure_table, list_measures
from facereward.measures.dists import DISTS
from facereward.measures.musiq import MUSIQ
from tests.test_dists import _fake_alpha_beta, _fake_vgg
from tests.test_musiq import fabricate, pyiqa_layout

ROWS = {"musiq-koniq": "musiq_koniq_ckpt-e95806b9.pth", "musiq-spaq": "musiq_spaq_ckpt-358bb6af.pth",
        "musiq-paq2piq": "musiq_paq2piq_ckpt-364c0c84.pth", "maniqa-koniq": "ckpt_koniq10k.pt",
        "maniqa-pipal": "MANIQA_PIPAL-ae6d356b.pth", "topiq-nr": "cfanet_nr_koniq_res50-9a73138b.pth",
        "topiq-nr-face": "topiq_nr_cgfiqa_res50-0a8b8e4f.pth", "dists": "DISTS_weights-f5e65c96.pth"}


def test_list_metrics_names_each_row_with_its_weight_file():
    table = format_measure_table()
    for name, file in ROWS.items():
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {name} |"))
        assert file in line, line
    kinds = {s.name: (s.kind, s.lower_better, s.differentiable) for s in list_measures()}
    assert kinds["dists"] == ("FR", True, True) and kinds["musiq-koniq"] == ("NR", False, True)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_row_needs_its_file_and_names_a_missing_one(name, tmp_path):
    with pytest.raises(MissingNeeds, match=name):
        create_measure(name)
    missing = tmp_path / ROWS[name]
    options = {"path": str(missing)} | ({"backbone_path": str(missing)} if name == "dists" else {})
    with pytest.raises((ValueError, FileNotFoundError), match=ROWS[name]):
        create_measure(name, **options)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    musiq = root / ROWS["musiq-koniq"]
    torch.save(fabricate(pyiqa_layout(), seed=0), musiq)
    vgg, ab = root / "vgg16-397923af.pth", root / ROWS["dists"]
    torch.save(_fake_vgg(3), vgg)
    torch.save(_fake_alpha_beta(4), ab)
    testset = write_toy_testset(root / "set", n=2, size=64, seed=0)
    return {"musiq": musiq, "vgg": vgg, "dists": ab, "testset": testset}


def test_evaluate_scores_the_rows_from_the_named_files_and_records_their_hashes(files, tmp_path):
    out = tmp_path / "o"
    result = CliRunner().invoke(app, [
        "evaluate", "--testset", str(files["testset"]), "--metrics", "psnr,musiq-koniq,dists", "--no-lq",
        "--images", f"gt={files['testset'] / 'lq'}", "--weights", f"musiq-koniq={files['musiq']}",
        "--weights", f"dists={files['dists']}", "--weights", f"dists.backbone_path={files['vgg']}",
        "--out-dir", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "results.json").read_text())
    from facereward.data.imageio import list_images, read_image

    lq = torch.from_numpy(np.stack([read_image(p) for p in list_images(files["testset"] / "lq")]).transpose(0, 3, 1, 2).copy())
    hq = torch.from_numpy(np.stack([read_image(p) for p in list_images(files["testset"] / "hq")]).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        musiq = MUSIQ.from_pretrained(files["musiq"])(lq)
        dists = DISTS(files["dists"], files["vgg"])(lq, hq)
    assert payload["per_image"]["gt"]["MUSIQ (KonIQ)"] == pytest.approx(musiq.tolist(), abs=1e-4)
    assert payload["per_image"]["gt"]["DISTS"] == pytest.approx(dists.tolist(), abs=1e-6)
    record = payload["provenance"]["MUSIQ (KonIQ)"]
    assert record["files"]["path"]["sha256"] == hashlib.sha256(files["musiq"].read_bytes()).hexdigest()
    assert record["details"]["variant"] == "koniq10k" and record["options"]["longer_side_lengths"] == [224, 384]
    assert set(payload["provenance"]["DISTS"]["files"]) == {"path", "backbone_path"}


def test_dists_as_a_reward_is_one_minus_the_distance(files):
    metric = create_measure("dists", path=str(files["dists"]), backbone_path=str(files["vgg"]))
    reward = create_measure("dists", as_reward=True, path=str(files["dists"]), backbone_path=str(files["vgg"]))
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    gt = torch.rand(1, 3, 32, 32)
    r = reward(x, gt)
    assert r.item() == pytest.approx(1 - metric(x, gt).item(), abs=1e-6)
    r.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
