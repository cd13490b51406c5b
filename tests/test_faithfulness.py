"""The details where the seeds' code and ours differed (docs/methods.md section 4): each fix, and each option that
reproduces the original, does what it says."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facereward.data import degradation as degradation_module
from facereward.data.datasets import InMemoryHQDataset
from facereward.data.degradation import DegradationPreset, degrade, sample_degradation_params
from facereward.measures import create_measure, register_measure, unregister_measure
from facereward.models.frm import FaceRewardModel, FRMConfig, bradley_terry_loss
from facereward.models.restorer import Restorer
from facereward.train.groups import epoch_input_indices, group_batch
from facereward.train.lrpo import kept_rows_first, pad_zero_advantage
from facereward.train.refl import DynamicFRMConfig, frm_preference_step, frm_update_due
from facereward.weights import default_frm_path

# ---- ReFL: the dynamic FRM's update --------------------------------------------------------------


@pytest.fixture
def tiny_frm():
    torch.manual_seed(1)
    return FaceRewardModel(FRMConfig(backbone="cnn", input_size=32, cnn_widths=[8, 16], cnn_depth=1)).eval()


def test_frm_update_schedule_ours_and_the_originals():
    """Ours: after generator steps 10, 20, ...; the original (offset 1): after 1, 11, 21, ... (RT:280-281); 350 each in 3,500."""
    ours, original = DynamicFRMConfig(), DynamicFRMConfig(offset=1)
    assert [s for s in range(1, 32) if frm_update_due(s, ours)] == [10, 20, 30]
    assert [s for s in range(1, 32) if frm_update_due(s, original)] == [1, 11, 21, 31]
    assert sum(frm_update_due(s, ours) for s in range(1, 3501)) == sum(frm_update_due(s, original) for s in range(1, 3501)) == 350
    assert not any(frm_update_due(s, DynamicFRMConfig(every=0)) for s in range(1, 50))


def test_bradley_terry_sum_and_an_unclamped_logit_scale_by_hand():
    """RU:81-95: -log sigmoid(tau (s_w - s_l)) summed over the batch, tau = exp(logit_scale) not clamped (RT:303-306)."""
    s_w, s_l = torch.tensor([0.5, 0.1]), torch.tensor([0.2, 0.3])
    log_tau = math.log(200.0)
    by_hand = [-math.log(1 / (1 + math.exp(-200.0 * d))) for d in (0.3, -0.2)]
    got = bradley_terry_loss(s_w, s_l, log_tau, max_logit_scale=None, reduction="sum")
    assert got.item() == pytest.approx(sum(by_hand), rel=1e-5)
    clamped = [-math.log(1 / (1 + math.exp(-100.0 * d))) for d in (0.3, -0.2)]
    assert bradley_terry_loss(s_w, s_l, log_tau).item() == pytest.approx(sum(clamped) / 2, rel=1e-5)  # ours: mean, tau <= 100
    with pytest.raises(ValueError, match="reduction"):
        bradley_terry_loss(s_w, s_l, 0.0, reduction="max")


def test_the_frm_gradient_is_divided_by_the_accumulation_steps_before_the_clip(tiny_frm):
    """RT:313: accelerate's backward divides the FRM loss by 4 before clip_grad_norm_: with plain SGD the step is 1/4."""
    g = torch.Generator().manual_seed(4)
    chosen, rejected = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    start = {n: p.detach().clone() for n, p in tiny_frm.named_parameters()}
    moves = []
    for divisor in (1.0, 4.0):
        tiny_frm.load_state_dict(start, strict=False)
        opt = torch.optim.SGD([p for p in tiny_frm.parameters() if p.requires_grad], lr=0.1)
        frm_preference_step(tiny_frm, opt, chosen, rejected, None, grad_clip=0.0, divisor=divisor)
        moves.append(torch.cat([(p.detach() - start[n]).flatten() for n, p in tiny_frm.named_parameters()]))
    assert moves[0].abs().max() > 0
    assert torch.allclose(moves[1] * 4, moves[0], rtol=1e-3, atol=1e-6)  # p - p0 cancels to ~1e-7 near |p| = 1


# ---- the FRM's resize ----------------------------------------------------------------------------------


def test_the_original_recipes_frm_resize_is_bilinear_without_antialias():
    """RT:254 and RI:88-94 resize tensors with torchvision 0.15/0.16: bilinear, no antialias. The run option reaches the FRM."""
    folder = default_frm_path()
    frm = FaceRewardModel.from_pretrained(folder, resize="bilinear")
    assert frm.config.resize == "bilinear" and FaceRewardModel.from_pretrained(folder).config.resize == "antialias"
    x = torch.rand(2, 3, 2 * frm.config.input_size + 3, 2 * frm.config.input_size + 3, generator=torch.Generator().manual_seed(0))
    size = frm.config.input_size
    plain = F.interpolate(x, size=(size, size), mode="bilinear", antialias=False, align_corners=False)
    assert torch.allclose(frm.preprocess(x), (plain - frm.mean) / frm.std)
    measure = create_measure("frm", path=str(folder), resize="bilinear")
    antialiased = create_measure("frm", path=str(folder))
    assert not torch.allclose(measure(x), antialiased(x))
    with pytest.raises(ValueError, match="resize must be antialias, bilinear or hpsv2"):
        FaceRewardModel.from_pretrained(folder, resize="nearest")


# ---- stage 1 ---------------------------------------------------------------------------------------


def test_stage_one_output_clamped_or_not(pixel_restorer):
    """DiffBIR conditions on SwinIR's raw output (T:284-285, RT:212-215); the toy bases clamp (config.clamp_clean)."""
    pixel_restorer.cleaner = torch.nn.Conv2d(3, 3, 1)  # a stage 1 with no clamp of its own, like SwinIR
    with torch.no_grad():
        pixel_restorer.cleaner.weight.copy_(3 * torch.eye(3).reshape(3, 3, 1, 1))
        pixel_restorer.cleaner.bias.fill_(-1.0)  # C(lq) = 3 lq - 1: both sides of [0, 1]
        lq = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        raw = pixel_restorer.cleaner(lq)
        assert raw.max() > 1 and raw.min() < 0 and torch.equal(pixel_restorer.clean(lq), raw.clamp(0, 1))
        pixel_restorer.config.clamp_clean = False
        assert torch.equal(pixel_restorer.clean(lq), raw)
        out = pixel_restorer.restore(lq, steps=2, generator=torch.Generator().manual_seed(1))
    assert out["clean"].max() <= 1  # the image written out is clamped either way


# ---- LRPO ---------------------------------------------------------------------------------------


def _dataset(n: int = 4, size: int = 32, **kw) -> InMemoryHQDataset:
    rng = np.random.default_rng(0)
    return InMemoryHQDataset([rng.random((size, size, 3), dtype=np.float32) for _ in range(n)], seed=3, **kw)


def test_own_noise_groups_share_the_parameters_and_differ_in_the_noise():
    """codeformer.py:88-166: a group's copies share the cached degradation parameters; each draws its own noise."""
    noisy = DegradationPreset("noisy", noise_sigma=(10.0, 10.0))
    ds = _dataset(preset=noisy)
    batch = group_batch(ds, [2, 0], 3, 0, 0, 1, own_noise=True)
    assert torch.equal(batch.lq[0], ds[2]["lq"]) and torch.equal(batch.lq[3], ds[0]["lq"])  # copy 0 is the item itself
    assert not torch.equal(batch.lq[0], batch.lq[1]) and not torch.equal(batch.lq[1], batch.lq[2])
    assert all(torch.equal(batch.hq[i], batch.hq[0]) for i in (1, 2))
    split = [group_batch(ds, [2, 0], 3, 0, rank, 2, own_noise=True) for rank in (0, 1)]  # the same rows on 2 processes
    assert torch.equal(torch.cat([b.lq for b in split]), batch.lq)
    quiet = _dataset(preset=DegradationPreset("quiet", noise_sigma=(0.0, 0.0)))
    same = group_batch(quiet, [1], 3, 0, 0, 1, own_noise=True)  # without noise the copies are one image: same parameters
    assert all(torch.equal(same.lq[i], same.lq[0]) for i in (1, 2))


def test_sequential_data_order_continues_across_epochs():
    """T:106-118: a pointer through the file list, never reset."""
    assert [epoch_input_indices(10, 4, 0, e, "sequential").tolist() for e in range(3)] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    shuffled = epoch_input_indices(10, 4, 0, 0)
    assert len(set(shuffled.tolist())) == 4 and shuffled.tolist() != [0, 1, 2, 3]


class _OneProcess:
    device = torch.device("cpu")

    @staticmethod
    def reduce(tensor, reduction="sum"):
        return tensor


def test_pad_removes_the_unkept_rows_and_readmits_none_when_too_few():
    """T:399-409: pad to a multiple with random zero-advantage rows, only if there are enough; the rest leave (T:418-439)."""
    keep = torch.tensor([True, False, True, True, True, True, True, False])  # 6 kept, 2 dropped
    assert bool(pad_zero_advantage(keep, 4, np.random.default_rng(0)).all())  # 2 missing, 2 dropped: both re-admitted
    keep5 = torch.tensor([True, False, True, True, True, False, True, False])  # 5 kept, 3 dropped: 12 - 5 = 7 missing
    assert torch.equal(pad_zero_advantage(keep5, 12, np.random.default_rng(0)), keep5)  # too few: none (ours re-admitted all)
    padded = pad_zero_advantage(keep5, 4, np.random.default_rng(0))
    assert int(padded.sum()) == 8 and padded[keep5].all()
    order = torch.tensor([7, 1, 0, 5, 2, 3, 4, 6])
    assert kept_rows_first(order, keep5, _OneProcess()).tolist() == [0, 2, 3, 4, 6]


def test_lrpo_rewards_see_the_raw_decoder_output_when_asked(monkeypatch, tmp_path, pixel_restorer):
    """RI:161-166: LRPO's LPIPS term scores the unclamped output: clamp_x_hat false hands the raw images to the rewards."""
    seen: list[float] = []

    def spy(images, gt, captions):
        seen.append(float(images.max()))
        return -((images.clamp(0, 1) - gt) ** 2).mean(dim=(1, 2, 3))

    register_measure("test-range-spy", fn=spy, kind="FR", overwrite=True)
    try:
        _run_lrpo_with_spy(monkeypatch, tmp_path, pixel_restorer, seen)
    finally:
        unregister_measure("test-range-spy")


def _run_lrpo_with_spy(monkeypatch, tmp_path, pixel_restorer, seen):
    from facereward.data.training_data import DataConfig
    from facereward.train.accelerator import RunConfig
    from facereward.train.heldout import HeldOutConfig
    from facereward.train.lrpo import LRPOConfig, train_lrpo

    decode = Restorer.decode
    monkeypatch.setattr(Restorer, "decode", lambda self, z: 3 * decode(self, z))
    pixel_restorer.save_pretrained(tmp_path / "pixel")
    for clamp in (True, False):
        seen.clear()
        config = LRPOConfig(run=RunConfig(output_dir=str(tmp_path / f"run{clamp}"), progress=False), init_from=str(tmp_path / "pixel"),
                            data=DataConfig(toy_faces=4, size=32, toy_identities=10), group_size=2, inputs_per_batch=1,
                            batches_per_epoch=1, epochs=1, sample_steps=2, micro_batch=2, reg_steps=1, clamp_x_hat=clamp,
                            held_out=HeldOutConfig(every=0))
        config.rewards.weights = {"test-range-spy": 1.0}
        train_lrpo(config)
        assert (max(seen) <= 1) == clamp


# ---- degradation ----------------------------------------------------------------------------------


def test_jpeg_quality_is_drawn_from_lo_to_hi_exclusive():
    """randint(30, 100) (codeformer.py) gives 30..99; so do ours."""
    preset = DegradationPreset("q", jpeg_quality=(30, 100))
    rng = np.random.default_rng(0)
    qualities = {sample_degradation_params(preset, rng)["jpeg_quality"] for _ in range(3000)}
    assert min(qualities) == 30 and max(qualities) == 99
    assert {sample_degradation_params(DegradationPreset("one", jpeg_quality=(70, 70)), rng)["jpeg_quality"]} == {70}


def test_the_downsampled_size_is_int_w_floordiv_f(monkeypatch):
    """codeformer.py: cv2.resize(img, (int(w // scale), int(h // scale))): 64 / 2.6 = 24.6 gives 24 (round would give 25)."""
    sizes = []
    real = cv2.resize
    monkeypatch.setattr(degradation_module.cv2, "resize", lambda img, dsize, **kw: sizes.append(dsize) or real(img, dsize, **kw))
    preset = DegradationPreset("f", downsample=(2.6, 2.6), noise_sigma=(0.0, 0.0))
    degrade(np.full((64, 64, 3), 0.5, np.float32), preset)
    assert sizes[0] == (24, 24) and sizes[1] == (64, 64)


def test_quantize_rounds_to_8_bit_levels_only_when_asked():
    image = np.random.default_rng(1).random((32, 32, 3), dtype=np.float32)
    rounded, _ = degrade(image, "diffbir", seed=0, index=2)
    raw, _ = degrade(image, "diffbir", seed=0, index=2, quantize=False)
    assert np.array_equal(np.round(rounded * 255), rounded * 255)
    assert not np.allclose(np.round(raw * 255), raw * 255) and np.abs(raw - rounded).max() <= 0.5 / 255 + 1e-6
    ds_raw = _dataset(quantize=False)
    assert torch.allclose(ds_raw[1]["lq"], _dataset()[1]["lq"], atol=0.5 / 255 + 1e-6)
    with pytest.raises(ValueError, match="per-copy noise"):
        degrade(image, lambda img, rng: (img, {}), noise_variant=1)
