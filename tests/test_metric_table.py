"""The metric table: its rows, `evaluate --metrics` / `--list-metrics`, a user's own metric, and clear errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from facereward.cli import app
from facereward.data.imageio import read_image
from facereward.data.testset import write_toy_testset
from facereward.evaluate import EvaluateConfig, evaluate
from facereward.metrics.table import (
    DEFAULT_METRICS,
    MetricContext,
    PerImageMetric,
    build_metrics,
    format_metric_table,
    get_metric,
    list_metrics,
    parse_metric_names,
    register_metric,
    unregister_metric,
)


@pytest.fixture(scope="module")
def toy_testset(tmp_path_factory):
    return write_toy_testset(tmp_path_factory.mktemp("toy") / "set", n=4, size=64, seed=0)


def _mean_abs_laplacian(images, gt=None, captions=None):
    k = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=images.dtype).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    return torch.nn.functional.conv2d(images, k, groups=3).abs().mean(dim=(1, 2, 3))


@pytest.fixture
def sharpness_metric():
    register_metric("sharpness", lambda ctx: _mean_abs_laplacian, kind="NR", lower_better=False)
    yield "sharpness"
    unregister_metric("sharpness")


def test_the_composite_reward_column_is_the_weighted_sum_of_its_terms():
    from facereward.measures.fullref import psnr

    torch.manual_seed(0)
    gt = torch.rand(3, 3, 16, 16)
    x = (gt + 0.1 * torch.randn_like(gt)).clamp(0, 1)
    ctx = MetricContext(EvaluateConfig(identity="none", reward_weights={"psnr": 0.5, "ssim": 0.0}), has_gt=True)
    [(spec, metric)] = build_metrics(["reward"], ctx)
    assert metric.column == "reward (composite)" and ctx.judges["reward"] == "0.5 psnr + 0 ssim"
    expected = 0.5 * psnr(x, gt, quantize=False)  # the psnr reward: unquantised, so differentiable
    assert torch.allclose(metric(x, gt, None), expected.float(), atol=1e-4)
    with pytest.raises(ValueError, match="metric 'reward' needs --reward NAME=WEIGHT"):
        build_metrics(["reward"], MetricContext(EvaluateConfig(identity="none"), has_gt=True))


def test_the_table_has_every_metric_with_its_type_and_direction():
    rows = {s.name: s for s in list_metrics()}
    assert [s.name for s in list_metrics()][: len(DEFAULT_METRICS)] == list(DEFAULT_METRICS)
    kinds = {n: rows[n].kind for n in DEFAULT_METRICS}
    assert kinds == {"psnr": "FR", "ssim": "FR", "psnr-y": "FR", "ssim-y": "FR", "lpips": "FR", "ids": "FR", "deg": "FR",
                     "lmd": "FR", "toy-quality": "FR", "frm": "NR", "reward": "FR", "clipiqa": "NR", "niqe": "NR", "fid": "set", "kid": "set"}
    lower = {n for n in DEFAULT_METRICS if rows[n].lower_better}
    assert lower == {"lpips", "deg", "lmd", "niqe", "fid", "kid"}
    assert "--niqe-model" in rows["niqe"].needs and "--lpips-backbone" in rows["lpips"].needs and rows["psnr"].needs == ""
    assert rows["psnr"].reward == "psnr" and rows["clipiqa"].reward == "clipiqa"  # the rewards built on the same code
    text = format_metric_table()
    assert text.splitlines()[0] == "| name | type | lower is better | needs | reward |"
    assert "| niqe | NR | yes | --niqe-model FILE" in text


def test_names_are_checked():
    assert parse_metric_names(" psnr, ssim-y ") == ["psnr", "ssim-y"]
    with pytest.raises(ValueError, match="unknown metric 'nope'; known: .*psnr"):
        parse_metric_names("psnr,nope")
    with pytest.raises(ValueError, match="given twice"):
        parse_metric_names("psnr,psnr")
    with pytest.raises(ValueError, match="kind must be"):
        register_metric("x", lambda ctx: None, kind="bogus")
    with pytest.raises(ValueError, match="already registered"):
        register_metric("psnr", lambda ctx: None)


def test_a_users_metric_gets_its_column(toy_testset, tmp_path, sharpness_metric):
    result = evaluate(EvaluateConfig(testset=str(toy_testset), out_dir=str(tmp_path / "o"), images={"gt": str(toy_testset / "hq")},
                                     metrics=["psnr", "sharpness"], progress=False))
    assert list(result.rows["LQ"]) == ["PSNR", "sharpness"]
    lq = torch.stack([torch.from_numpy(read_image(p).transpose(2, 0, 1)) for p in sorted((toy_testset / "lq").glob("*.png"))])
    assert result.rows["LQ"]["sharpness"] == pytest.approx(_mean_abs_laplacian(lq).mean().item(), rel=1e-5)
    assert result.rows["gt"]["sharpness"] > result.rows["LQ"]["sharpness"]  # the degraded faces are blurrier


def test_metric_column_named_by_the_factory_and_plugin_module(toy_testset, tmp_path):
    plugin = tmp_path / "my_metrics.py"
    plugin.write_text(
        "from facereward.metrics.table import PerImageMetric, register_metric\n"
        "register_metric('meanvalue', lambda ctx: PerImageMetric('mean (rgb)', lambda x, gt, c: x.mean(dim=(1, 2, 3))),\n"
        "                kind='NR', lower_better=False, overwrite=True)\n")
    base = ["evaluate", "--testset", str(toy_testset), "--images", f"gt={toy_testset / 'hq'}", "--out-dir", str(tmp_path / "o"),
            "--no-progress", "--metric-module", str(plugin)]
    listed = CliRunner().invoke(app, [*base, "--list-metrics"])
    assert listed.exit_code == 0, listed.output
    assert "| meanvalue | NR | no | - | - |" in listed.output and "| psnr | FR | no |" in listed.output
    result = CliRunner().invoke(app, [*base, "--metrics", "ssim,meanvalue"])
    assert result.exit_code == 0, result.output
    assert "| | SSIM | mean (rgb) |" in result.output
    unregister_metric("meanvalue")


def test_list_metrics_needs_no_testset():
    result = CliRunner().invoke(app, ["evaluate", "--list-metrics"])
    assert result.exit_code == 0 and "| fid | set | yes |" in result.output


def test_asked_for_metrics_that_do_not_apply_are_errors(toy_testset, tmp_path):
    import shutil

    cfg = dict(testset=str(toy_testset), out_dir=str(tmp_path / "o"), identity="none", progress=False)
    with pytest.raises(ValueError, match="metric 'lpips' needs --lpips-backbone FILE and --lpips-heads FILE"):
        evaluate(EvaluateConfig(**cfg, metrics=["lpips"]))
    with pytest.raises(ValueError, match="metric 'niqe' needs --niqe-model FILE"):
        evaluate(EvaluateConfig(**cfg, metrics=["niqe"]))
    no_gt = tmp_path / "real"
    shutil.copytree(toy_testset / "lq", no_gt / "lq")
    with pytest.raises(ValueError, match="'psnr' is full-reference and the test set has no hq/"):
        evaluate(EvaluateConfig(**{**cfg, "testset": str(no_gt)}, metrics=["psnr"]))
    with pytest.raises(ValueError, match="'kid' needs a reference set.*--fid-reference"):
        evaluate(EvaluateConfig(**{**cfg, "testset": str(no_gt)}, metrics=["kid"]))
    bad = CliRunner().invoke(app, ["evaluate", "--testset", str(toy_testset), "--metrics", "psnr,nope", "--no-progress"])
    assert bad.exit_code == 2 and "unknown metric 'nope'" in bad.output


@pytest.mark.filterwarnings("ignore:FID from 4 vs 4 images")
def test_default_set_is_what_evaluate_computed_before(toy_testset, tmp_path):
    """No --metrics: every default metric that applies, in the old column order; FID/KID share the toy-id features."""
    result = evaluate(EvaluateConfig(testset=str(toy_testset), out_dir=str(tmp_path / "o"), kid_subsets=5, progress=False))
    assert list(result.rows["LQ"]) == ["PSNR", "SSIM", "PSNR-Y", "SSIM-Y", "IDS (toy-id)", "Deg (toy-id)", "LMD (toy-lmk)",
                                       "oracle (toy)", "FID (toy-id)", "KID (toy-id)"]
    assert result.judges == {"identity": "toy-id", "landmarks": "toy-lmk", "toy-quality": "toy oracle (toy-id, toy-lmk)",
                             "fid_features": "toy-id", "lpips": "none", "frm": "none", "clipiqa": "none"}


def test_toy_quality_column_is_the_oracle_on_toy_sets_only(toy_testset, tmp_path):
    from facereward.data.imageio import image_to_tensor, read_image
    from facereward.labelling.oracle import toy_quality

    result = evaluate(EvaluateConfig(testset=str(toy_testset), out_dir=str(tmp_path / "o"), metrics=["toy-quality"], progress=False))
    names = sorted(p.name for p in (toy_testset / "lq").glob("*.png"))
    lq = torch.cat([image_to_tensor(read_image(toy_testset / "lq" / n)) for n in names])
    hq = torch.cat([image_to_tensor(read_image(toy_testset / "hq" / n)) for n in names])
    assert result.rows["LQ"]["oracle (toy)"] == pytest.approx(float(toy_quality(lq, hq).mean()), abs=1e-6)
    plain = tmp_path / "plain"
    for sub in ("lq", "hq"):
        shutil.copytree(toy_testset / sub, plain / sub)
    assert "oracle (toy)" not in evaluate(EvaluateConfig(testset=str(plain), out_dir=str(tmp_path / "p"), identity="toy",
                                                         landmarks="toy", fid="none", progress=False)).rows["LQ"]
    with pytest.raises(ValueError, match="'toy-quality' needs a toy-world test set"):
        evaluate(EvaluateConfig(testset=str(plain), out_dir=str(tmp_path / "q"), metrics=["toy-quality"], progress=False))


def test_identity_embeddings_are_shared_by_ids_and_deg(toy_testset):
    calls = []

    class Judge:
        name = "counting"

        def embed(self, images):
            calls.append(images.shape[0])
            return torch.nn.functional.normalize(images.flatten(1)[:, :8] + 0.1, dim=1)

    ctx = MetricContext(EvaluateConfig(identity="none"), has_gt=True)
    ctx._judges["identity"] = Judge()
    built = dict((s.name, m) for s, m in build_metrics(["ids", "deg"], ctx))
    assert isinstance(built["ids"], PerImageMetric) and built["ids"].column == "IDS (counting)"
    x, gt = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    ids, deg = built["ids"](x, gt), built["deg"](x, gt)
    assert calls == [3, 3]  # out and GT embedded once for both columns
    assert torch.allclose(torch.rad2deg(torch.arccos(ids.clamp(-1, 1))), deg, atol=1e-4)
    assert get_metric("ids").needs.startswith("an identity judge")
