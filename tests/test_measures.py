"""The measures table: the API, its errors, and one plugin registration serving every consumer."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from facereward.measures import MeasuresConfig, WeightedSum, create_measure, get_measure, list_measures, register_measure, unregister_measure


def _images(b: int = 2, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(b, 3, size, size, generator=g)
    return (gt + 0.1 * torch.randn(b, 3, size, size, generator=g)).clamp(0, 1), gt


def test_the_table_has_every_built_in():
    names = {s.name for s in list_measures()}
    assert {"psnr", "ssim", "lpips", "ids", "lmd", "fid", "kid", "niqe", "clipiqa", "frm", "wavelet", "toy-quality"} <= names
    assert get_measure("lpips").lower_better and get_measure("lpips").reward is not None
    assert get_measure("lmd").reward is None and get_measure("fid").kind == "set"


def test_reward_forms_are_the_documented_transforms():
    x, gt = _images()
    d = create_measure("wavelet")(x, gt)
    assert torch.allclose(create_measure("wavelet", as_reward=True, c=2.0)(x, gt), torch.exp(-2.0 * d.float()))
    psnr = create_measure("psnr")(x, gt)  # BasicSR: 8-bit, float64
    assert psnr.dtype == torch.float64
    assert create_measure("psnr", as_reward=True)(gt, gt).tolist() == [60.0, 60.0]  # capped, float32
    assert create_measure("ssim", as_reward=True)(x, gt).dtype == torch.float32


def test_bad_input_is_a_one_line_error():
    x, gt = _images()
    with pytest.raises(ValueError, match="unknown measure 'nope'; known: .*psnr"):
        create_measure("nope")
    with pytest.raises(ValueError, match="'identity' was renamed: use 'ids'"):
        create_measure("identity")
    with pytest.raises(ValueError, match="'lmd' has no reward form"):
        create_measure("lmd", as_reward=True)
    with pytest.raises(ValueError, match="option 'c' applies only to its reward form"):
        create_measure("wavelet", c=3.0)
    with pytest.raises(ValueError, match="measure 'lpips' needs options backbone_path and heads_path"):
        create_measure("lpips")
    with pytest.raises(ValueError, match="full-reference and needs the ground truth"):
        create_measure("psnr")(x)
    with pytest.raises(ValueError, match=r"bad options \['blur'\]"):
        create_measure("ssim", blur=3)
    with pytest.raises(ValueError, match=r"losses.weights.lmd: 'lmd' is not differentiable"):
        WeightedSum.from_config(MeasuresConfig(weights={"lmd": 1.0}, options={"lmd": {"judge": "toy"}}), as_reward=False,
                                where="losses", require_differentiable="ReFL backpropagates its losses")


def test_a_registered_function_is_a_metric_and_a_reward():
    def brightness(images, gt=None, captions=None):
        return images.mean(dim=(1, 2, 3))

    register_measure("test-brightness", fn=brightness, kind="NR", differentiable=True)
    try:
        x, _ = _images()
        x.requires_grad_(True)
        r = create_measure("test-brightness", as_reward=True)
        assert r.differentiable and not r.needs_gt
        r(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
    finally:
        unregister_measure("test-brightness")


PLUGIN = '''
    import torch
    from facereward.measures import register_measure

    def sharpness(images, gt=None, captions=None):
        """Mean squared horizontal gradient of the image (higher: sharper)."""
        return (images[..., 1:] - images[..., :-1]).pow(2).mean(dim=(1, 2, 3)) * 100.0

    register_measure("plugin-sharpness", fn=sharpness, kind="NR", lower_better=False, differentiable=True,
                     description="a test plugin")
'''


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "sharp_plugin.py"
    path.write_text(textwrap.dedent(PLUGIN))
    yield str(path)
    unregister_measure("plugin-sharpness")


def test_one_plugin_file_serves_evaluate_held_out_lrpo_and_refl(plugin, tmp_path):
    """Registered once, the measure is an evaluate column, a held-out judge of both trainers, an LRPO reward and a
    ReFL reward: no second registration."""
    from facereward.data.testset import write_toy_testset
    from facereward.data.training_data import DataConfig
    from facereward.evaluate import EvaluateConfig, evaluate
    from facereward.train.accelerator import RunConfig
    from facereward.train.heldout import HeldOutConfig
    from facereward.train.lrpo import LRPOConfig, train_lrpo
    from facereward.train.refl import DynamicFRMConfig, ReFLConfig, train_refl
    from facereward.weights import default_restorer_path

    testset = write_toy_testset(tmp_path / "set", 2, size=64)
    result = evaluate(EvaluateConfig(testset=str(testset), out_dir=str(tmp_path / "eval"), imports=[plugin], measures=["psnr", "plugin-sharpness"],
                                     progress=False, save_outputs=False, sample_steps=2))
    assert "plugin-sharpness" in result.rows["LQ"] and result.rows["LQ"]["plugin-sharpness"] > 0

    held_out = HeldOutConfig(every=1, toy_faces=2, sample_steps=2, measures=["psnr", "plugin-sharpness"], identity="none")
    data = DataConfig(toy_faces=4, size=64)
    run = lambda name: RunConfig(output_dir=str(tmp_path / name), progress=False, save_every=100)  # noqa: E731
    lrpo = LRPOConfig(run=run("lrpo"), data=data, imports=[plugin], rewards=MeasuresConfig(weights={"plugin-sharpness": 1.0}),
                      group_size=2, inputs_per_batch=1, batches_per_epoch=1, epochs=1, sample_steps=3, micro_batch=2,
                      train_batch_size=2, reg_steps=1, held_out=held_out)
    train_lrpo(lrpo)
    epochs = json.loads((tmp_path / "lrpo" / "metrics.json").read_text())["train_log"]
    assert "reward/plugin-sharpness" in epochs[-1] and "held_out/plugin-sharpness" in epochs[-1]

    refl = ReFLConfig(run=run("refl"), data=data, imports=[plugin], init_from=None, train_steps=1, batch_size=1, sample_steps=2,
                      rewards=MeasuresConfig(weights={"frm": 1.0, "plugin-sharpness": 0.5}), losses=MeasuresConfig(weights={}),
                      dynamic_frm=DynamicFRMConfig(every=0), held_out=held_out)
    assert default_restorer_path().is_dir()
    train_refl(refl)
    metrics = json.loads((tmp_path / "refl" / "metrics.json").read_text())
    assert "plugin-sharpness" in metrics["held_out"][-1]
    assert "refl/reward/plugin-sharpness" in metrics["train_log"][-1]
