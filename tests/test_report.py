"""`facereward report`: which folders it reads, what the page holds, and the page in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facereward.cli import run as cli_run
from facereward.report import ReportError, build_report, detect_kind, find_runs, html_table, plot_curves


def _write(folder: Path, name: str, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))
    return folder


def test_each_command_output_is_recognised(tmp_path):
    assert detect_kind(_write(tmp_path / "e", "results.json", {"rows": {}})) == "evaluate"
    assert detect_kind(_write(tmp_path / "l", "metrics.json", {"epochs": [{"epoch": 1, "reward": 0.1}]})) == "lrpo"
    assert detect_kind(_write(tmp_path / "n", "metrics.json", {"unit": "epoch", "held_out": [], "train_log": []})) == "lrpo"
    assert detect_kind(_write(tmp_path / "r", "metrics.json", {"held_out": [], "train_log": []})) == "refl"
    assert detect_kind(_write(tmp_path / "b", "metrics.json", {"train_log": [{"step": 1, "stage2/loss": 1.0}]})) == "train-base"
    assert detect_kind(_write(tmp_path / "f", "metrics.json", {"best_held_out_accuracy": 0.7, "history": []})) == "train-frm"
    assert detect_kind(_write(tmp_path / "x", "other.json", {})) is None


def test_a_folder_of_runs_is_searched_but_not_a_runs_checkpoints(tmp_path):
    _write(tmp_path / "demo", "results.json", {"rows": {}})
    _write(tmp_path / "demo" / "runs" / "refl", "metrics.json", {"held_out": []})
    _write(tmp_path / "demo" / "runs" / "refl" / "checkpoints" / "step-1", "metrics.json", {"held_out": []})
    _write(tmp_path / "demo" / "runs" / "lrpo", "metrics.json", {"epochs": []})
    found = [(p.relative_to(tmp_path).as_posix(), k) for p, k in find_runs(tmp_path / "demo")]
    assert found == [("demo", "evaluate"), ("demo/runs/lrpo", "lrpo"), ("demo/runs/refl", "refl")]


def test_unreadable_folders_are_named(tmp_path):
    with pytest.raises(ReportError, match="no such folder"):
        build_report([tmp_path / "missing"], tmp_path / "r.html")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=r"empty: neither a training run"):
        build_report([tmp_path / "empty"], tmp_path / "r.html")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text('{"epochs": [')
    with pytest.raises(ReportError, match=r"bad/metrics.json: not readable JSON"):
        build_report([tmp_path / "bad"], tmp_path / "r.html")
    code = cli_run(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")])
    assert code == 2 and not (tmp_path / "r.html").exists()


def test_table_formatting_and_escaping():
    table = html_table({"<base>": {"PSNR (dB)": 21.456, "IDS": 0.51234, "FID": float("nan")}})
    assert "&lt;base&gt;" in table and "<td>21.46</td>" in table and "<td>0.5123</td>" in table and "<td>-</td>" in table


def _decode(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def test_curves_are_drawn_only_where_there_is_data():
    rows = [{"epoch": e, "reward": 0.1 * e, "reward/frm": 0.2 * e} for e in range(1, 6)] + [{"epoch": 6, "reward": float("nan")}]
    one = _decode(plot_curves(rows, "epoch", [("reward", ["reward"]), ("missing", ["held_out/psnr"])]))
    two = _decode(plot_curves(rows, "epoch", [("reward", ["reward"]), ("parts", ["reward/frm"])]))
    assert two.shape[1] > 1.5 * one.shape[1]  # a panel per group with data, the empty group left out
    assert one.std() > 10  # not blank
    assert plot_curves(rows, "epoch", [("missing", ["nope"])]) is None


def test_the_demo_report_holds_table_grid_curves_and_configs(tiny_demo):
    result, out = tiny_demo
    page = (out / "report.html").read_text()
    for title in ("Evaluation", "ReFL training run", "LRPO training run"):
        assert title in page
    for row in ("LQ", "base (stage 1)", "base", "ReFL", "LRPO"):
        assert f"<th>{row}</th>" in page
    assert "Initial vs live FRM" in page and "Training reward and its parts" in page and "Held-out fidelity" in page
    assert "init_from:" in page and "group_size:" in page  # each run's config.yaml
    assert "http://" not in page and "https://" not in page  # self-contained: nothing fetched
    images = re.findall(r'<img class="plot" src="([^"]+)"', page)
    assert len(images) >= 6 and all(uri.startswith("data:image/png;base64,") for uri in images)
    code = cli_run(["report", str(out), "--out", str(out / "again.html")])
    assert code == 0 and (out / "again.html").read_text().count("<section") == page.count("<section")


_IMAGES_JS = """
return Array.from(document.images).map((img) => {
  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  const d = c.width ? g.getImageData(0, 0, c.width, c.height).data : [];
  let lo = 255, hi = 0;
  for (let i = 0; i < d.length; i += 4) { const v = d[i] + d[i + 1] + d[i + 2]; lo = Math.min(lo, v); hi = Math.max(hi, v); }
  return {alt: img.alt, width: img.naturalWidth, shown: img.getBoundingClientRect().width, range: hi - lo};
});
"""


def test_the_report_renders_in_headless_chromium(tiny_demo, browser, tmp_path):
    _, out = tiny_demo
    browser.get((out / "report.html").resolve().as_uri())
    assert browser.title == "facereward demo"
    images = browser.execute_script(_IMAGES_JS)
    assert len(images) >= 7  # the grid and the training plots
    for img in images:
        assert img["width"] > 0 and img["shown"] > 0, img  # decoded and laid out
        assert img["range"] > 30, img  # not blank
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == []
    shot = tmp_path / "report.png"
    browser.set_window_size(1400, 3000)
    assert browser.save_screenshot(str(shot)) and Image.open(shot).size[0] > 0


def test_reward_per_compute_puts_each_lrpo_run_on_its_own_wall_clock(tmp_path):
    from facereward.report import reward_per_compute

    full = [{"epoch": 0, "held_out/reward": 0.30}, {"epoch": 1, "time/train_s": 4.0},
            {"epoch": 2, "time/train_s": 8.0, "held_out/reward": 0.34}]
    window = [{"epoch": 0, "held_out/reward": 0.30}, {"epoch": 2, "time/train_s": 3.0, "held_out/reward": 0.35}]
    fig = reward_per_compute([("full", full), ("window", window), ("no time", [{"epoch": 1, "held_out/reward": 0.1}])])
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].get_lines()}
    assert lines == {"full": ([0.0, 8.0], [0.30, 0.34]), "window": ([0.0, 3.0], [0.30, 0.35])}
    assert reward_per_compute([("no time", [{"epoch": 1, "held_out/reward": 0.1}])]) is None
    _write(tmp_path / "a", "metrics.json", {"epochs": full})
    _write(tmp_path / "b", "metrics.json", {"epochs": window})
    page = build_report([tmp_path / "a", tmp_path / "b"], tmp_path / "r.html").read_text()
    assert "Reward per compute" in page
    assert "Reward per compute" not in build_report([tmp_path / "a"], tmp_path / "one.html").read_text()
