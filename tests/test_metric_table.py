"""The measures table as evaluate's columns: its rows, `evaluate --metrics` / `--list-metrics`, a user's own measure,
the deprecated `register_metric`, and clear errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from typer.testing import CliRunner

from facereward.cli import app
from facereward.data.imageio import read_image
from facereward.data.testset import write_toy_testset
from facereward.evaluate import DEFAULT_MEASURES, EvaluateConfig, build_columns, evaluate
from facereward.measures import (
    Measure,
    MeasureEnv,
    MeasuresConfig,
    create_measure,
    format_measure_table,
    get_measure,
    list_measures,
    parse_measure_names,
    register_measure,
    unregister_measure,
)


@pytest.fixture(scope="module")
def toy_testset(tmp_path_factory):
    return write_toy_testset(tmp_path_factory.mktemp("toy") / "set", n=4, size=64, seed=0)


def _mean_abs_laplacian(images, gt=None, captions=None):
    k = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=images.dtype).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    return torch.nn.functional.conv2d(images, k, groups=3).abs().mean(dim=(1, 2, 3))


@pytest.fixture
def sharpness_metric():
    register_measure("sharpness", fn=_mean_abs_laplacian, kind="NR", lower_better=False)
    yield "sharpness"
    unregister_measure("sharpness")


def test_the_composite_reward_column_is_the_weighted_sum_of_its_terms():
    from facereward.measures.fullref import psnr

    torch.manual_seed(0)
    gt = torch.rand(3, 3, 16, 16)
    x = (gt + 0.1 * torch.randn_like(gt)).clamp(0, 1)
    env = MeasureEnv(identity="none")
    config = EvaluateConfig(identity="none", measures=["reward"], reward=MeasuresConfig(weights={"psnr": 0.5, "ssim": 0.0}))
    [metric] = build_columns(config, env, has_gt=True, has_reference=False)
    assert metric.column == "reward (composite)" and env.used["reward"] == "0.5 psnr + 0 ssim"
    expected = 0.5 * psnr(x, gt, quantize=False)  # the psnr reward: unquantised, so differentiable
    assert torch.allclose(metric(x, gt, None), expected.float(), atol=1e-4)
    with pytest.raises(ValueError, match="measure 'reward' needs options weights"):
        build_columns(EvaluateConfig(identity="none", measures=["reward"]), MeasureEnv(identity="none"), has_gt=True,
                      has_reference=False)


def test_the_table_has_every_metric_with_its_type_and_direction():
    rows = {s.name: s for s in list_measures()}
    assert set(DEFAULT_MEASURES) <= set(rows)
    kinds = {n: rows[n].kind for n in DEFAULT_MEASURES}
    paper_nr = ("musiq-koniq", "musiq-spaq", "musiq-paq2piq", "musiq-ava", "maniqa-koniq", "maniqa-pipal", "topiq-nr",
                "topiq-nr-face")
    assert kinds == {"psnr": "FR", "ssim": "FR", "psnr-y": "FR", "ssim-y": "FR", "lpips": "FR", "dists": "FR", "ids": "FR",
                     "deg": "FR", "lmd": "FR", "toy-quality": "FR", "frm": "NR", "reward": "NR", "clipiqa": "NR", "niqe": "NR",
                     **dict.fromkeys(paper_nr, "NR"), "fid": "set", "kid": "set"}
    lower = {n for n in DEFAULT_MEASURES if rows[n].lower_better}
    assert lower == {"lpips", "dists", "deg", "lmd", "niqe", "fid", "kid"}
    assert "--niqe-model" in rows["niqe"].needs and "backbone_path and heads_path" in rows["lpips"].needs and rows["psnr"].needs == ""
    # one row is the metric and the reward: a reward form where higher is better (or a transform, lpips: 1 - d)
    assert all(rows[n].reward is not None for n in ("psnr", "ssim", "clipiqa", "frm", "ids", "lpips", "wavelet"))
    assert all(rows[n].reward is None for n in ("deg", "lmd", "niqe", "fid", "kid"))
    text = format_measure_table()
    assert text.splitlines()[0] == "| name | type | lower is better | differentiable | reward | needs |"
    assert "| niqe | NR | yes | no | no | option model (" in text and "| lpips | FR | yes | yes | yes | options backbone_path" in text


def test_names_are_checked():
    assert parse_measure_names(" psnr, ssim-y ") == ["psnr", "ssim-y"]
    with pytest.raises(ValueError, match="metrics: unknown measure 'nope'; known: .*psnr"):
        parse_measure_names("psnr,nope")
    with pytest.raises(ValueError, match="given twice"):
        parse_measure_names("psnr,psnr")
    with pytest.raises(ValueError, match="measure 'identity' was renamed: use 'ids'"):
        parse_measure_names("psnr,identity")
    with pytest.raises(ValueError, match="kind must be"):
        register_measure("x", lambda env: None, kind="bogus")
    with pytest.raises(ValueError, match="already registered"):
        register_measure("psnr", lambda env: None)


def test_a_users_metric_gets_its_column(toy_testset, tmp_path, sharpness_metric):
    result = evaluate(EvaluateConfig(testset=str(toy_testset), out_dir=str(tmp_path / "o"), images={"gt": str(toy_testset / "hq")},
                                     measures=["psnr", "sharpness"], progress=False))
    assert list(result.rows["LQ"]) == ["PSNR", "sharpness"]
    lq = torch.stack([torch.from_numpy(read_image(p).transpose(2, 0, 1)) for p in sorted((toy_testset / "lq").glob("*.png"))])
    assert result.rows["LQ"]["sharpness"] == pytest.approx(_mean_abs_laplacian(lq).mean().item(), rel=1e-5)
    assert result.rows["gt"]["sharpness"] > result.rows["LQ"]["sharpness"]  # the degraded faces are blurrier


def test_metric_column_named_by_the_row_and_plugin_module(toy_testset, tmp_path):
    plugin = tmp_path / "my_metrics.py"
    plugin.write_text(
        "from facereward.measures import register_measure\n"
        "register_measure('meanvalue', fn=lambda x, gt, c: x.mean(dim=(1, 2, 3)), column='mean (rgb)',\n"
        "                 kind='NR', lower_better=False, overwrite=True)\n")
    base = ["evaluate", "--testset", str(toy_testset), "--images", f"gt={toy_testset / 'hq'}", "--out-dir", str(tmp_path / "o"),
            "--no-progress", "--metric-module", str(plugin)]
    listed = CliRunner().invoke(app, [*base, "--list-metrics"])
    assert listed.exit_code == 0, listed.output
    assert "| meanvalue | NR | no | no | yes | - |" in listed.output and "| psnr | FR | no | yes | yes |" in listed.output
    result = CliRunner().invoke(app, [*base, "--metrics", "ssim,meanvalue"])
    assert result.exit_code == 0, result.output
    assert "| | SSIM | mean (rgb) |" in result.output
    unregister_measure("meanvalue")


def test_deprecated_register_metric_still_works_and_warns(toy_testset, tmp_path):
    """An old `factory(ctx) -> fn(images, gt, captions)` registration: it warns, reads its options and judges through ctx."""
    from facereward.metrics.table import register_metric

    def factory(ctx):
        gain, judge = ctx.get("gain", 1.0), ctx.identity()
        assert judge is None or judge.name == "toy-id"
        return lambda x, gt, c: gain * x.mean(dim=(1, 2, 3))

    with pytest.warns(DeprecationWarning, match="register_metric is deprecated"):
        register_metric("test-oldmean", factory, kind="NR", lower_better=False)
    try:
        measure = create_measure("test-oldmean", env=MeasureEnv(toy=True), gain=2.0)
        x = torch.rand(2, 3, 8, 8)
        assert measure.column == "test-oldmean" and torch.allclose(measure(x), 2.0 * x.mean(dim=(1, 2, 3)))
        result = evaluate(EvaluateConfig(testset=str(toy_testset), out_dir=str(tmp_path / "o"), measures=["test-oldmean"],
                                         options={"test-oldmean": {"gain": 0.5}}, progress=False))
        assert list(result.rows["LQ"]) == ["test-oldmean"] and result.rows["LQ"]["test-oldmean"] > 0
    finally:
        unregister_measure("test-oldmean")


def test_list_metrics_needs_no_testset():
    result = CliRunner().invoke(app, ["evaluate", "--list-metrics"])
    assert result.exit_code == 0 and "| fid | set | yes |" in result.output


def test_asked_for_metrics_that_do_not_apply_are_errors(toy_testset, tmp_path):
    import shutil

    cfg = dict(testset=str(toy_testset), out_dir=str(tmp_path / "o"), identity="none", progress=False)
    with pytest.raises(ValueError, match="measure 'lpips' needs options backbone_path and heads_path"):
        evaluate(EvaluateConfig(**cfg, measures=["lpips"]))
    with pytest.raises(ValueError, match="measure 'niqe' needs option model .*--niqe-model"):
        evaluate(EvaluateConfig(**cfg, measures=["niqe"]))
    no_gt = tmp_path / "real"
    shutil.copytree(toy_testset / "lq", no_gt / "lq")
    with pytest.raises(ValueError, match="'psnr' is full-reference and the test set has no hq/"):
        evaluate(EvaluateConfig(**{**cfg, "testset": str(no_gt)}, measures=["psnr"]))
    with pytest.raises(ValueError, match="'kid' needs a reference set.*--fid-reference"):
        evaluate(EvaluateConfig(**{**cfg, "testset": str(no_gt)}, measures=["kid"]))
    with pytest.raises(ValueError, match="options.wavelet: options for a measure that is not evaluated"):
        evaluate(EvaluateConfig(**cfg, measures=["psnr"], options={"wavelet": {"levels": 2}}))
    bad = CliRunner().invoke(app, ["evaluate", "--testset", str(toy_testset), "--metrics", "psnr,nope", "--no-progress"])
    assert bad.exit_code == 2 and "--metrics: unknown measure 'nope'" in bad.output


@pytest.mark.filterwarnings("ignore:FID from 4 vs 4 images")
def test_default_set_is_what_evaluate_computed_before(toy_testset, tmp_path):
    """No --metrics: every default metric that applies, in the old column order; FID/KID share the toy-id features."""
    result = evaluate(EvaluateConfig(testset=str(toy_testset), out_dir=str(tmp_path / "o"), options={"kid": {"subsets": 5}},
                                     progress=False))
    assert list(result.rows["LQ"]) == ["PSNR", "SSIM", "PSNR-Y", "SSIM-Y", "IDS (toy-id)", "Deg (toy-id)", "LMD (toy-lmk)",
                                       "oracle (toy)", "FID (toy-id)", "KID (toy-id)"]
    assert result.judges == {"identity": "toy-id", "landmarks": "toy-lmk", "toy-quality": "toy oracle (toy-id, toy-lmk)",
                             "fid_features": "toy-id", "lpips": "none", "frm": "none", "clipiqa": "none"}


def test_toy_quality_column_is_the_oracle_on_toy_sets_only(toy_testset, tmp_path):
    from facereward.data.imageio import image_to_tensor, read_image
    from facereward.measures.toy_quality import toy_quality

    result = evaluate(EvaluateConfig(testset=str(toy_testset), out_dir=str(tmp_path / "o"), measures=["toy-quality"], progress=False))
    names = sorted(p.name for p in (toy_testset / "lq").glob("*.png"))
    lq = torch.cat([image_to_tensor(read_image(toy_testset / "lq" / n)) for n in names])
    hq = torch.cat([image_to_tensor(read_image(toy_testset / "hq" / n)) for n in names])
    assert result.rows["LQ"]["oracle (toy)"] == pytest.approx(float(toy_quality(lq, hq).mean()), abs=1e-6)
    plain = tmp_path / "plain"
    for sub in ("lq", "hq"):
        shutil.copytree(toy_testset / sub, plain / sub)
    assert "oracle (toy)" not in evaluate(EvaluateConfig(testset=str(plain), out_dir=str(tmp_path / "p"), identity="toy",
                                                         landmarks="toy", fid="none", progress=False)).rows["LQ"]


def test_toy_quality_asked_for_on_a_plain_set_is_an_error(toy_testset, tmp_path):
    plain = tmp_path / "plain"
    for sub in ("lq", "hq"):
        shutil.copytree(toy_testset / sub, plain / sub)
    with pytest.raises(ValueError, match="measure 'toy-quality' needs toy-world faces"):
        evaluate(EvaluateConfig(testset=str(plain), out_dir=str(tmp_path / "q"), measures=["toy-quality"], progress=False))


def test_identity_embeddings_are_shared_by_ids_and_deg(toy_testset):
    calls = []

    class Judge:
        name = "counting"

        def embed(self, images):
            calls.append(images.shape[0])
            return torch.nn.functional.normalize(images.flatten(1)[:, :8] + 0.1, dim=1)

    env = MeasureEnv(identity="counting")
    env._judges["identity", "counting"] = Judge()  # the judge "counting" resolves to, built once per env
    built = {m.name: m for m in build_columns(EvaluateConfig(identity="counting", measures=["ids", "deg"]), env, has_gt=True,
                                              has_reference=False)}
    assert isinstance(built["ids"], Measure) and built["ids"].column == "IDS (counting)"
    x, gt = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    ids, deg = built["ids"](x, gt), built["deg"](x, gt)
    assert calls == [3, 3]  # out and GT embedded once for both columns
    assert torch.allclose(torch.rad2deg(torch.arccos(ids.clamp(-1, 1))), deg, atol=1e-4)
    assert get_measure("ids").needs.startswith("an identity judge")
