"""The demo end to end (tiny models: test set, ReFL, LRPO, evaluation, report), and the shipped toy restorer."""

from __future__ import annotations

import json

from facereward.cli import run as cli_run
from facereward.demo import DEMO_CHANGES, DEMO_LRPO, DEMO_REFL, merge, run_demo
from facereward.models.restorer import Restorer
from facereward.weights import default_restorer_path

def test_demo_post_trains_with_both_methods_and_evaluates_them_side_by_side(tiny_demo):
    result, out = tiny_demo
    rows = result.evaluation.rows
    assert list(rows) == ["LQ", "base (stage 1)", "base", "ReFL", "LRPO"]
    columns = set(rows["base"])
    for prefix in ("PSNR", "SSIM", "IDS", "LMD", "FID", "FRM", "reward (composite)"):
        assert any(c.startswith(prefix) for c in columns), (prefix, columns)
    # the post-trained models are new files that differ from the base, and restore every test face
    for name in ("ReFL", "LRPO"):
        assert (out / "runs" / name.lower() / "model" / "facereward.json").is_file()
        assert len(list((out / "outputs" / name).glob("*.png"))) == 3
        assert rows[name]["PSNR"] != rows["base"]["PSNR"]
    refl = json.loads((out / "runs" / "refl" / "metrics.json").read_text())
    assert [r["step"] for r in refl["held_out"]] == [0, 1, 2] and "frm/initial" in refl["held_out"][0]
    lrpo = json.loads((out / "runs" / "lrpo" / "metrics.json").read_text())
    assert [r["epoch"] for r in lrpo["held_out"]] == [0, 1, 2] and "psnr" in lrpo["held_out"][-1]
    assert refl["unit"] == "step" and lrpo["unit"] == "epoch" and "held_out/psnr" in lrpo["train_log"][-1]
    assert (out / "grid.png").is_file() and (out / "report.html").is_file() and result.report == out / "report.html"
    assert set(result.seconds) == {"test set", "ReFL", "LRPO", "evaluate", "report"}


def test_demo_recipes_are_the_toy_configs_shortened():
    import yaml

    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for kind, recipe, length in (("refl", DEMO_REFL, "train_steps"), ("lrpo", DEMO_LRPO, "epochs")):
        full = yaml.safe_load((root / f"configs/{kind}_toy.yaml").read_text())
        changed = DEMO_CHANGES[kind]
        same = {k: v for k, v in full.items() if k not in ("run", length, "held_out", *changed)}
        assert merge(recipe, same) == recipe, kind  # every other setting as in the full toy config
        assert all(recipe[k] != full[k] for k in changed), kind  # the listed changes are real
        assert recipe[length] <= full[length]


def test_demo_skip_training_only_restores(tmp_path, pixel_restorer):
    pixel_restorer.save_pretrained(tmp_path / "model")
    result = run_demo(tmp_path / "out", n=3, model=tmp_path / "model", steps=2, identity="none", landmarks="none",
                      progress=False, train=False)
    assert list(result.evaluation.rows) == ["LQ", "base (stage 1)", "base"] and not result.runs
    manifest = json.loads((tmp_path / "out" / "toy-test" / "manifest.json").read_text())
    assert len(manifest["images"]) == 3 and manifest["preset"] == "diffbir"
    world = json.loads((tmp_path / "out" / "toy-test" / "toyworld.json").read_text())
    assert world["split"] == "test" and len(world["identities"]) == 3
    assert not (tmp_path / "out" / "runs").exists()
    assert "| LQ |" in result.evaluation.table and (tmp_path / "out" / "report.html").is_file()


def test_demo_command_names_what_it_wrote(tmp_path, pixel_restorer, capsys):
    pixel_restorer.save_pretrained(tmp_path / "model")
    code = cli_run(["demo", "--skip-training", "--out-dir", str(tmp_path / "out"), "--n", "2", "--sample-steps", "2",
                    "--model", str(tmp_path / "model"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "| base |" in out and "report.html" in out


def test_shipped_toy_base_beats_its_input_and_its_stage_1(tmp_path):
    """Held-out identities: stage 1 beats the LQ on PSNR; the full restorer (v-prediction, colour fix on) is above the
    LQ on identity and well above stage 1 on the toy oracle's quality; reruns are bit-identical (eta 0, seeded)."""
    restorer = Restorer.from_pretrained(default_restorer_path())
    assert restorer.mode == "pixel" and restorer.config.size == 64
    assert restorer.prediction_type == "v_prediction" and restorer.config.colour_fix
    kw = dict(n=8, steps=10, landmarks="none", progress=False, train=False, report=False)
    result = run_demo(tmp_path / "out", **kw).evaluation
    lq, s1, base = result.rows["LQ"], result.rows["base (stage 1)"], result.rows["base"]
    assert s1["PSNR"] > lq["PSNR"] + 1.0 and s1["SSIM"] > lq["SSIM"]
    assert base["IDS (toy-id)"] > lq["IDS (toy-id)"] and base["oracle (toy)"] > s1["oracle (toy)"] + 0.08
    assert base["PSNR"] > lq["PSNR"] - 0.5
    again = run_demo(tmp_path / "again", **kw).evaluation
    assert again.rows["base"]["PSNR"] == base["PSNR"]


def test_shipped_weights_are_small():
    size = sum(f.stat().st_size for f in default_restorer_path().rglob("*") if f.is_file())
    assert size <= 20 * 2**20


def test_the_time_estimate_counts_the_recipes_network_calls(monkeypatch):
    """estimate_seconds against a hand count: ReFL 2 steps at batch 4, 10 DDIM steps, grad window 2, regulariser on:
    10 - 1.5 + 1 = 9.5 no-grad calls and 1 forward+backward a step; held-out at 0, 1 and 2 (8 faces, 10 steps each)."""
    from facereward import demo

    monkeypatch.setattr(demo, "OVERHEAD", {"ReFL": 1.0, "LRPO": 1.0, "evaluate": 1.0})
    monkeypatch.setattr(demo, "FIXED", {"ReFL": 2.0, "LRPO": 0.0, "evaluate": 0.0, "report": 1.0})
    times = demo.CallTimes({4: 1.0, 16: 4.0}, {4: 3.0})
    assert times.at(8) == 2.0 and times.at(2) == 0.5 and times.at(4, grad=True) == 3.0
    refl = merge(DEMO_REFL, {"train_steps": 2, "batch_size": 4, "sample_steps": 10, "grad_window": 2, "reg_weight": 1e-4,
                             "held_out": {"every": 1, "toy_faces": 8, "sample_steps": 10}})
    lrpo = merge(DEMO_LRPO, {"epochs": 1, "group_size": 4, "inputs_per_batch": 2, "sample_steps": 6, "micro_batch": 4,
                             "held_out": {"every": 0}})
    out = demo.estimate_seconds(times, refl, lrpo, n=16, steps=6, models=3)
    assert out["ReFL"] == 2 * (9.5 * 1.0 + 1 * 3.0) + 3 * 10 * 2.0 + 2.0 * 4.0  # + the fixed part, 2 batch-16 calls
    # LRPO: 8 samples in 2 micro-batches of 4; per micro-batch 6 rollout calls and 5 trained steps (int(0.99 * 6))
    assert out["LRPO"] == 2 * (6 * 1.0 + 5 * 3.0)
    assert out["evaluate"] == 3 * 1 * 6 * 4.0 and out["report"] == 4.0
