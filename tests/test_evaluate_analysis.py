"""evaluate's uncertainty, paired tests, slices and published-table check (docs/methods.md 3.1-3.2)."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from facereward.cli import app
from facereward.data.attributes import read_attributes_csv, toy_attributes
from facereward.data.imageio import read_image, write_image
from facereward.data.testset import write_toy_testset
from facereward.evaluate import EvaluateConfig, evaluate
from facereward.evaluate.published import check_published, read_published
from facereward.stats import (
    bootstrap_p_value,
    compare_paired,
    mean_interval,
    percentile_interval,
    set_interval,
    wilcoxon_p_value,
)

# ---- the statistics, by hand


def test_the_bootstrap_interval_matches_the_exact_bootstrap_distribution_of_a_tiny_set():
    # [0, 1, 3]: the 27 equally likely resamples give the mean 0 once and 1/3 three times (two 0s and a 1), so the
    # 10% point of the exact bootstrap distribution lies inside the atom at 1/3 (cumulative 1/27 .. 4/27), and by the
    # same count the 90% point inside the atom at 7/3 (two 3s and a 1).
    lo, hi = mean_interval([0.0, 1.0, 3.0], n_boot=20000, level=0.8, seed=1)
    assert lo == pytest.approx(1 / 3, abs=1e-12) and hi == pytest.approx(7 / 3, abs=1e-12)


def test_the_interval_is_the_quantiles_of_the_resampled_means():
    values = np.array([1.0, 2.0, 4.0])
    indices = np.array([[0, 0, 0], [0, 1, 2], [2, 2, 1], [1, 1, 1], [2, 2, 2]])  # means 1, 7/3, 10/3, 2, 4
    lo, hi = mean_interval(values, indices=indices, level=0.5)
    # sorted means 1, 2, 7/3, 10/3, 4: numpy's linear quantiles at 0.25 and 0.75 are the 2nd and 4th
    assert (lo, hi) == pytest.approx((2.0, 10 / 3))
    assert percentile_interval(np.array([np.nan, 1.0, 1.0])) == (1.0, 1.0)
    assert all(math.isnan(v) for v in percentile_interval(np.array([np.nan])))
    with pytest.raises(ValueError, match="level"):
        percentile_interval(np.array([1.0]), level=1.5)


def test_wilcoxon_and_bootstrap_p_values_by_hand():
    # |d| ranks 1..5, the only negative is rank 2: W- = 2. Of the 32 sign patterns, W- <= 2 for {}, {1}, {2}: 3.
    # Two-sided exact p = 2 * 3/32.
    assert wilcoxon_p_value([1.0, -2.0, 3.0, 4.0, 5.0]) == pytest.approx(6 / 32)
    assert wilcoxon_p_value([0.0, 0.0]) == 1.0
    # one of four resampled differences is <= 0: p = 2 (1 + 1) / (4 + 1)
    assert bootstrap_p_value(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(0.8)
    assert bootstrap_p_value(np.array([1.0, 2.0])) == pytest.approx(2 / 3)


def test_a_paired_comparison_names_the_better_method_by_direction():
    a = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 0.55])
    c = compare_paired("A", "B", "IDS", a, a - 0.1, n_boot=200)
    assert c.difference == pytest.approx(0.1) and c.lower == pytest.approx(0.1) and c.upper == pytest.approx(0.1)
    assert c.winner() == "A"
    d = compare_paired("A", "B", "LMD", a, a - 0.1, n_boot=200, lower_better=True)
    assert d.winner() == "B"
    noise = compare_paired("A", "B", "x", [1.0, -1.0, 1.0, -1.0], [0.0] * 4, n_boot=500)
    assert noise.winner() is None and noise.p_bootstrap > 0.05
    with pytest.raises(ValueError, match="same non-empty set"):
        compare_paired("A", "B", "x", [1.0, 2.0], [1.0])


def test_a_set_measure_is_resampled_with_its_gt_rows_and_its_interval_holds_the_full_set_value():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(12, 3))
    gap = lambda f, r: float(np.abs(f - r).sum(axis=1).mean())  # noqa: E731 (row-wise: needs the pairing)
    # paired with itself, every resample gives 0; unpaired (the reference fixed), resamples differ
    assert set_interval(feats, feats.copy(), gap, paired_reference=True, n_boot=50) == (0.0, 0.0)
    lo, hi = set_interval(feats, feats.copy(), gap, paired_reference=False, n_boot=50)
    assert hi > lo
    spread = lambda f, r: float(np.var(f[:, 0]))  # noqa: E731 (shrinks on resamples with repeats: biased)
    lo, hi = set_interval(feats, feats, spread, paired_reference=False, n_boot=200)
    assert lo <= spread(feats, feats) <= hi


def test_the_fast_fid_of_the_resamples_equals_pytorch_fids_formula():
    import warnings

    from facereward.measures.fid import fid_from_features, fid_from_features_fast

    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few images for the dimension: singular covariances, as on toy sets
        for n, m, d in ((16, 16, 64), (12, 20, 32), (80, 90, 16)):  # fewer images than dimensions (the SVD), and more
            a, b = rng.normal(size=(n, d)), 1.3 * rng.normal(size=(m, d)) + 0.2
            assert fid_from_features_fast(a, b) == pytest.approx(fid_from_features(a, b), rel=1e-6)
    with pytest.raises(ValueError, match="feature sets"):
        fid_from_features_fast(np.zeros((1, 4)), np.zeros((3, 4)))


# ---- attributes


def test_an_attributes_csv_and_its_errors(tmp_path):
    f = tmp_path / "attrs.csv"
    f.write_text("# name,attr=value\n0001.png, skin=dark ,glasses=yes\n\n0002,skin=light\n")
    assert read_attributes_csv(f) == {"0001": {"skin": "dark", "glasses": "yes"}, "0002": {"skin": "light"}}
    for text, message in (("0001,skin\n", ":1: expected attr=value"), ("0001,a=1\n0001,a=2\n", ":2: image '0001' is listed twice"),
                          (",a=1\n", ":1: the line starts with an empty image name"), ("# nothing\n", "no attribute lines")):
        f.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_attributes_csv(f)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_attributes_csv(tmp_path / "nope.csv")


@pytest.fixture(scope="module")
def toy_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    testset = write_toy_testset(root / "set", n=8, size=32, seed=0)
    # two "methods" as output folders: the GT itself, and the GT with a dark band over the top rows
    for name, damage in (("gt", 0.0), ("banded", 0.5)):
        out = root / name
        out.mkdir()
        for p in sorted((testset / "hq").glob("*.png")):
            image = read_image(p)
            image[:4] *= 1 - damage
            write_image(out / p.name, image)
    return testset, root


def test_toy_traits_are_the_toy_worlds_own_record(toy_set):
    testset, _ = toy_set
    from facereward.data.toyfaces import ToyFaceWorld, identity_traits, read_toy_marker

    traits = toy_attributes(testset)
    assert sorted(traits) == [f"{i:04d}" for i in range(8)]
    info = read_toy_marker(testset)
    for i, identity in enumerate(info["identities"]):  # recomputed independently of the test set's images
        t = identity_traits(info["world_seed"], identity)
        assert traits[f"{i:04d}"]["skin_tone"] == t.skin_name
        assert traits[f"{i:04d}"]["glasses"] == ("yes" if t.glasses else "no")
    assert {v["pose"] for v in traits.values()} <= {"left", "frontal", "right"}
    world = ToyFaceWorld(info["world_seed"], info["n_identities"])
    face = world.sample(8, size=32, split="test", seed=0)[3]
    assert traits["0003"]["expression"] == face.spec.expression


def test_toy_traits_of_a_toyfaces_folder_degraded_by_hand(tmp_path):
    from facereward.data.testset import write_degraded_testset
    from facereward.data.toyfaces import identity_traits, write_toyfaces

    write_toyfaces(tmp_path / "toys", n=30, size=16, seed=2, n_identities=10, progress=False)
    write_degraded_testset(tmp_path / "toys" / "test" / "images", tmp_path / "toy-test", seed=1, progress=False)
    traits = toy_attributes(tmp_path / "toy-test")
    identities = json.loads((tmp_path / "toys" / "test" / "identities.json").read_text())  # toyfaces' own record
    assert sorted(traits) == sorted(identities)
    for name, identity in identities.items():
        assert traits[name]["skin_tone"] == identity_traits(2, identity).skin_name


def _config(toy_set, tmp_path, **kw):
    testset, root = toy_set
    base = dict(testset=str(testset), out_dir=str(tmp_path / "o"), images={"gt": str(root / "gt"), "banded": str(root / "banded")},
                measures=["psnr", "ids", "fid"], identity="toy", fid="auto", batch_size=8, progress=False, bootstrap=200,
                set_bootstrap=20)
    return EvaluateConfig(**{**base, **kw})


def test_ci_compare_and_slices_reach_every_file(toy_set, tmp_path):
    result = evaluate(_config(toy_set, tmp_path, ci=True, compare=[["banded", "LQ"]], slice_by=["glasses", "pose"]))
    out = tmp_path / "o"
    payload = json.loads((out / "results.json").read_text())
    columns = ["PSNR", "IDS (toy-id)", "FID (toy-id)"]
    for method in ("LQ", "banded"):
        for column in columns:  # every cell, FID included, has an interval around its value
            lo, hi = payload["intervals"][method][column]
            assert lo <= payload["rows"][method][column] <= hi and lo < hi, (method, column)
    header = next(csv.reader(open(out / "results.csv")))
    assert "PSNR lower" in header and "FID (toy-id) upper" in header
    text = (out / "results.md").read_text()
    assert "95% percentile-bootstrap" in text and "## Paired comparisons" in text and "## Slices" in text
    by_column = {c["column"]: c for c in payload["comparisons"]}
    assert set(by_column) == set(columns) and by_column["PSNR"]["better"] == "banded"  # banded is far closer than LQ
    diffs = np.subtract(result.per_image["banded"]["PSNR"], result.per_image["LQ"]["PSNR"])
    assert by_column["PSNR"]["difference"] == pytest.approx(diffs.mean())
    assert by_column["PSNR"]["p_wilcoxon"] == pytest.approx(wilcoxon_p_value(diffs))
    assert math.isnan(by_column["FID (toy-id)"]["p_wilcoxon"])
    # slices: the groups partition the images, the worst group's mean is the lowest of the groups that count
    groups = payload["slices"]["groups"]["glasses"]
    assert sum(g["n"] for g in groups.values()) == 8
    traits = toy_attributes(toy_set[0])
    for value, g in groups.items():
        idx = [i for i, n in enumerate(payload["names"]) if traits[n]["glasses"] == value]
        assert g["rows"]["LQ"]["PSNR"][0] == pytest.approx(np.mean(np.array(result.per_image["LQ"]["PSNR"])[idx]))
    worst = payload["slices"]["worst"]["glasses"]["LQ"]["PSNR"]
    eligible = {v: g["rows"]["LQ"]["PSNR"][0] for v, g in groups.items() if g["n"] >= 2}
    assert worst["value"] == min(eligible, key=eligible.get)
    # a per-image column is not sliced into set measures
    assert "FID (toy-id)" not in next(iter(groups.values()))["rows"]["LQ"]
    # the HTML report shows the intervals, the comparisons and the worst groups
    from facereward.evaluate.outputs import format_cell
    from facereward.report import build_report

    page = build_report([out], tmp_path / "report.html").read_text()
    cell = format_cell(payload["rows"]["LQ"]["PSNR"], payload["intervals"]["LQ"]["PSNR"])
    assert cell in page and "Paired comparisons" in page and "banded - LQ: PSNR" in page
    assert "Worst glasses group per method" in page


def test_provenance_records_each_columns_options_and_weight_hashes(toy_set, tmp_path):
    evaluate(_config(toy_set, tmp_path, measures=["psnr", "ssim-y"], crop_border=2, ci=False))
    payload = json.loads((tmp_path / "o" / "results.json").read_text())
    assert payload["provenance"]["PSNR"]["options"]["crop_border"] == 2
    assert payload["provenance"]["SSIM-Y"]["options"]["y_channel"] is True
    assert "intervals" not in payload and "How each column was computed" in (tmp_path / "o" / "results.md").read_text()


def test_a_measure_built_from_a_file_records_its_sha256(tmp_path):
    import hashlib

    from facereward.measures import create_measure, register_measure, unregister_measure

    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    register_measure("test-file-measure", lambda env, path=None: (lambda x, gt, c: x.mean(dim=(1, 2, 3))), kind="NR")
    try:
        m = create_measure("test-file-measure", path=str(weights))
    finally:
        unregister_measure("test-file-measure")
    assert m.provenance["files"]["path"]["sha256"] == hashlib.sha256(b"weights").hexdigest()


def test_bad_analysis_options_fail_before_anything_runs(toy_set, tmp_path):
    for kw, message in ((dict(compare=[["gt", "nobody"]]), "'nobody' is not an evaluated method"),
                        (dict(compare=[["gt", "gt"]]), "two different method names"),
                        (dict(slice_by=["wings"]), "no attribute 'wings'"),
                        (dict(ci_level=1.0), "ci_level"),
                        (dict(attributes=str(tmp_path / "a.csv")), "nothing to slice by")):
        with pytest.raises(ValueError, match=message):
            evaluate(_config(toy_set, tmp_path, **kw))
    plain = tmp_path / "plain"
    shutil.copytree(toy_set[0], plain)
    (plain / "toyworld.json").unlink()
    with pytest.raises(ValueError, match="not a toy test set"):
        evaluate(_config(toy_set, tmp_path, testset=str(plain), identity="none", measures=["psnr"], slice_by=["pose"]))


# ---- published tables


def test_check_published_passes_within_tolerance_and_names_what_differs(toy_set, tmp_path):
    result = evaluate(_config(toy_set, tmp_path, measures=["psnr", "ids"]))
    psnr = result.rows["banded"]["PSNR"]
    table = {"source": "ours", "rows": {"banded": {"psnr": round(psnr, 2)}}, "tolerance": {"default": 0.01},
             "provenance": {"psnr": {"options": {"crop_border": 0}}}, "settings": {"seed": 0}}
    provenance = json.loads((tmp_path / "o" / "results.json").read_text())["provenance"]
    check = check_published(table, result.rows, provenance, {"seed": 0})
    assert check["ok"] and check["cells"][0]["ok"]
    table["rows"]["banded"]["psnr"] = psnr + 0.5
    table["rows"]["nobody"] = {"ids": 0.9}
    table["provenance"]["psnr"]["options"]["crop_border"] = 4
    table["provenance"]["ids"] = {"sha256": "abc"}
    check = check_published(table, result.rows, provenance, {"seed": 0})
    assert not check["ok"]
    assert [c["ok"] for c in check["cells"]] == [False, False] and check["cells"][1]["why"] == "method not evaluated"
    assert {(m["measure"], m["key"]) for m in check["provenance"]} == {("psnr", "options.crop_border"), ("ids", "sha256")}
    table = {"rows": {"banded": {"psnr": psnr * 1.01}}, "relative_tolerance": {"psnr": 0.02}}
    assert check_published(table, result.rows, provenance, {})["ok"]


def test_the_check_published_command_exits_1_when_the_run_does_not_reproduce(toy_set, tmp_path):
    testset, root = toy_set
    table = tmp_path / "published.json"
    args = ["evaluate", "--testset", str(testset), "--images", f"gt={root / 'gt'}", "--metrics", "psnr,ssim",
            "--out-dir", str(tmp_path / "o"), "--no-progress", "--check-published", str(table)]
    table.write_text(json.dumps({"rows": {"gt": {"ssim": 1.0}}, "tolerance": {"default": 1e-6}}))
    ok = CliRunner().invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "1 of 1 cells within tolerance" in ok.output
    table.write_text(json.dumps({"rows": {"LQ": {"ssim": 1.0}}, "tolerance": {"default": 1e-6}}))
    bad = CliRunner().invoke(app, args)
    assert bad.exit_code == 1 and "does not reproduce" in bad.output
    assert "NOT REPRODUCED" in (tmp_path / "o" / "results.md").read_text()


def test_a_malformed_published_table_is_one_line(tmp_path):
    f = tmp_path / "t.json"
    for text, message in (("[1]", "expected a JSON object"), ('{"rows": {}}', "'rows' must map"),
                          ('{"rows": {"a": {"psnr": "x"}}}', "rows.a.psnr must be a number"),
                          ('{"rows": {"a": {"psnr": 1}}, "tol": 1}', "unknown key 'tol'"),
                          ('{"rows": {"a": {"psnr": 1}}, "tolerance": {"psnr": -1}}', "tolerance.psnr"), ("{", "not JSON")):
        f.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_published(f)
