"""Every built-in measure's value on a fixed toy batch equals the value recorded before the measures table existed
(tests/golden_measures.json: the old metric table, reward registry, oracle and auto-labeller): bit for bit on the
kernels it was recorded with (AVX-512), and to rtol 1e-4 elsewhere (AVX2 kernels move the networks' last bits)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from facereward.labelling.auto import FullReferenceFeatures
from facereward.measures import MeasureEnv, MeasuresConfig, WeightedSum, create_measure
from facereward.measures.toy_quality import toy_quality
from facereward.measures.wavelet import lowpass_l1
from facereward.weights import default_frm_path
from golden_inputs import GOLDEN, encode, golden_batch, golden_lpips_files

RECORDED = json.loads(GOLDEN.read_text())
SAME_KERNELS = (torch.backends.cpu.get_cpu_capability() == RECORDED["recorded_on"]["cpu_capability"]
                and torch.__version__.split("+")[0] == RECORDED["recorded_on"]["torch"])


def assert_golden(value, recorded: list[str]) -> None:
    """Bit for bit on the recording kernels; to rtol 1e-4 (atol 1e-7) on others."""
    if SAME_KERNELS:
        assert encode(value) == recorded
    else:
        old = torch.tensor([float.fromhex(v) for v in recorded], dtype=torch.float64)
        new = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
        assert torch.allclose(new, old, rtol=1e-4, atol=1e-7), (new, old)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    torch.set_num_threads(1)
    x, gt, captions = golden_batch()
    backbone, heads = golden_lpips_files(tmp_path_factory.mktemp("lpips"))
    return x, gt, captions, {"backbone_path": backbone, "heads_path": heads, "net": "alex"}


METRIC_OPTIONS = {"kid": {"subsets": 10, "subset_size": 3}, "ids": {"judge": "toy"}, "deg": {"judge": "toy"},
                  "lmd": {"judge": "toy"}, "fid": {}, "frm": {}, "lpips": {}}


@pytest.mark.parametrize("name", sorted(RECORDED["metric"]))
def test_metric_forms_are_unchanged(batch, name):
    x, gt, captions, lpips = batch
    options = dict(METRIC_OPTIONS.get(name, {}))
    options.update(lpips if name == "lpips" else {"path": str(default_frm_path())} if name == "frm" else {})
    env = MeasureEnv("cpu", toy=True, identity="toy", landmarks="toy")
    measure = create_measure(name, env=env, **options)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name in ("fid", "kid"):
            value = [measure.compute(measure.extractor.features(x).double().numpy(), measure.extractor.features(gt).double().numpy())]
        else:
            value = measure(x, gt, captions)
    assert_golden(value, RECORDED["metric"][name])


REWARD_OPTIONS = {"frm": {}, "frm@0.5": {"scale": 0.5}, "lpips": {}, "wavelet": {}, "wavelet@haar": {"wavelet": "haar", "levels": 2},
                  "identity": {"judge": "toy"}, "psnr": {}, "ssim": {}}


@pytest.mark.parametrize("key", sorted(RECORDED["reward"]))
def test_reward_forms_are_unchanged(batch, key):
    x, gt, captions, lpips = batch
    name = {"identity": "ids"}.get(key.split("@")[0], key.split("@")[0])
    options = dict(REWARD_OPTIONS[key])
    options.update(lpips if name == "lpips" else {"path": str(default_frm_path())} if name == "frm" else {})
    value = create_measure(name, as_reward=True, **options)(x, gt, captions).detach()
    assert_golden(value, RECORDED["reward"][key])


def test_composites_oracle_and_features_are_unchanged(batch):
    x, gt, captions, lpips = batch
    frm = str(default_frm_path())
    composite = WeightedSum.from_config(MeasuresConfig(weights={"frm": 0.3, "wavelet": 0.3, "ids": 0.2, "ssim": 0.2},
                                                       options={"frm": {"path": frm, "scale": 0.1}, "ids": {"judge": "toy"}}))
    assert_golden(composite(x, gt, captions).total.detach(), RECORDED["other"]["composite"])
    assert_golden(toy_quality(x, gt), RECORDED["other"]["toy_quality"])
    assert encode(create_measure("wavelet")(x, gt)) == RECORDED["other"]["lowpass_l1"] == encode(lowpass_l1(x, gt))
    features = FullReferenceFeatures(identity="toy", lpips=(lpips["net"], lpips["backbone_path"], lpips["heads_path"]), detail=True)
    assert_golden(torch.from_numpy(features(x, gt)), RECORDED["other"]["features"])
