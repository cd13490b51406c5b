"""The SwinIR stage-1 cleaner: DiffBIR's face key layout, an independent loop-based reference, padding, loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from facereward.models.swinir import SwinIR, load_swinir_checkpoint, swinir_from_checkpoint

# Same structure (and so the same 732 key names) as the face model, 12 wide so heads are 2 wide.
TINY = {"embed_dim": 12}
# img_size 16: a 128x128 input has the 16x16 feature map the stored attn_mask buffers were made for.
TINY_16 = {"embed_dim": 12, "img_size": 16}


def _randomised(model: SwinIR, seed: int = 0) -> SwinIR:
    """Every float parameter redrawn (bias tables at unit scale) so the comparison is not trivial.

    Weights are scaled by 1/sqrt(fan-in) so activations stay O(1) through the 48 blocks and float32 agrees to 1e-5.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("relative_position_bias_table"):
                p.copy_(noise)
            elif p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# An independent reference: a function of the state dict, with windows, masks and indices built by loops.
# ----------------------------------------------------------------------------------------------------------

_MASKS: dict[tuple[int, int, int, int], list[torch.Tensor]] = {}
_INDEX: dict[int, torch.Tensor] = {}


def _ref_index(ws: int) -> torch.Tensor:
    if ws not in _INDEX:
        idx = torch.empty(ws * ws, ws * ws, dtype=torch.long)
        for p in range(ws * ws):
            pi, pj = divmod(p, ws)
            for q in range(ws * ws):
                qi, qj = divmod(q, ws)
                idx[p, q] = (pi - qi + ws - 1) * (2 * ws - 1) + (pj - qj + ws - 1)
        _INDEX[ws] = idx
    return _INDEX[ws]


def _ref_masks(h: int, w: int, ws: int, shift: int) -> list[torch.Tensor]:
    """One (N, N) mask per window (row-major): tokens from different regions of the rolled map never attend."""
    key = (h, w, ws, shift)
    if key not in _MASKS:

        def region(n: int, i: int) -> int:
            return 0 if i < n - ws else (1 if i < n - shift else 2)

        masks = []
        for wy in range(h // ws):
            for wx in range(w // ws):
                labels = [3 * region(h, wy * ws + i) + region(w, wx * ws + j) for i in range(ws) for j in range(ws)]
                masks.append(torch.tensor([[0.0 if a == b else -100.0 for b in labels] for a in labels]))
        _MASKS[key] = masks
    return _MASKS[key]


def _ln(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def _linear(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def _conv(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    weight = sd[prefix + ".weight"]
    return F.conv2d(x, weight, sd[prefix + ".bias"], padding=weight.shape[-1] // 2)


def _leaky(x: torch.Tensor, slope: float) -> torch.Tensor:
    return torch.where(x > 0, x, slope * x)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _ref_block(x: torch.Tensor, sd: dict, p: str, heads: int, ws: int, shift: int) -> torch.Tensor:
    """x: (B, H, W, C) map; one Swin block, window by window and head by head."""
    b, h, w, c = x.shape
    hd = c // heads
    y = _ln(x, sd, p + "norm1")
    if shift:
        rows, cols = (torch.arange(h) + shift) % h, (torch.arange(w) + shift) % w
        y = y[:, rows][:, :, cols]
    table, index = sd[p + "attn.relative_position_bias_table"], _ref_index(ws)
    masks = _ref_masks(h, w, ws, shift) if shift else None
    out = torch.zeros_like(y)
    n_win = 0
    for wy in range(h // ws):
        for wx in range(w // ws):
            tokens = y[:, wy * ws : (wy + 1) * ws, wx * ws : (wx + 1) * ws].reshape(b, ws * ws, c)
            qkv = _linear(tokens, sd, p + "attn.qkv")
            head_out = []
            for k in range(heads):
                q = qkv[..., k * hd : (k + 1) * hd]
                key = qkv[..., c + k * hd : c + (k + 1) * hd]
                v = qkv[..., 2 * c + k * hd : 2 * c + (k + 1) * hd]
                scores = q @ key.transpose(1, 2) / math.sqrt(hd) + table[index, k]
                if masks is not None:
                    scores = scores + masks[n_win]
                e = torch.exp(scores - scores.max(-1, keepdim=True).values)
                head_out.append((e / e.sum(-1, keepdim=True)) @ v)
            att = _linear(torch.cat(head_out, -1), sd, p + "attn.proj")
            out[:, wy * ws : (wy + 1) * ws, wx * ws : (wx + 1) * ws] = att.reshape(b, ws, ws, c)
            n_win += 1
    if shift:
        rows, cols = (torch.arange(h) - shift) % h, (torch.arange(w) - shift) % w
        out = out[:, rows][:, :, cols]
    x = x + out
    hidden = _gelu(_linear(_ln(x, sd, p + "norm2"), sd, p + "mlp.fc1"))
    return x + _linear(hidden, sd, p + "mlp.fc2")


def reference_swinir(lq: torch.Tensor, sd: dict, img_size: int = 64, ws: int = 8, r: int = 8) -> torch.Tensor:
    """The face SwinIR's forward (1conv, nearest+conv, sf = unshuffle = r), written from the paper/DiffBIR layout."""
    b, _, h, w = lq.shape
    m = ws * r
    ph, pw = -(-h // m) * m, -(-w // m) * m
    x = torch.zeros(b, 3, ph, pw, dtype=lq.dtype)
    x[:, :, :h, :w] = lq
    mean = torch.tensor([0.4488, 0.4371, 0.4040], dtype=lq.dtype).view(1, 3, 1, 1)
    x = x - mean
    # pixel unshuffle: channel c * r * r + i * r + j holds pixel (i, j) of each r x r cell of channel c
    x = torch.stack([x[:, c, i::r, j::r] for c in range(3) for i in range(r) for j in range(r)], 1)
    feat = _conv(x, sd, "conv_first.1")
    fh, fw = feat.shape[-2:]
    shift = ws // 2 if img_size > ws else 0
    t = _ln(feat.permute(0, 2, 3, 1), sd, "patch_embed.norm")  # (B, H, W, C)
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for li in range(n_layers):
        start = t
        n_blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith(f"layers.{li}.residual_group.blocks."))
        for bi in range(n_blocks):
            p = f"layers.{li}.residual_group.blocks.{bi}."
            heads = sd[p + "attn.relative_position_bias_table"].shape[1]
            t = _ref_block(t, sd, p, heads, ws, shift if bi % 2 else 0)
        t = _conv(t.permute(0, 3, 1, 2), sd, f"layers.{li}.conv").permute(0, 2, 3, 1) + start
    body = _ln(t, sd, "norm").permute(0, 3, 1, 2)
    assert body.shape[-2:] == (fh, fw)
    y = _leaky(_conv(_conv(body, sd, "conv_after_body") + feat, sd, "conv_before_upsample.0"), 0.01)
    for name in ("conv_up1", "conv_up2", "conv_up3"):
        y = _leaky(_conv(y.repeat_interleave(2, 2).repeat_interleave(2, 3), sd, name), 0.2)
    y = _conv(_leaky(_conv(y, sd, "conv_hr"), 0.2), sd, "conv_last")
    return (y + mean)[:, :, :h, :w]


# ----------------------------------------------------------------------------------------------------------


def test_face_config_key_names_and_shapes():
    model = SwinIR()
    sd = model.state_dict()
    assert len(sd) == 732
    assert sum(p.numel() for p in model.parameters()) == 15_792_587
    expected = {
        "conv_first.1.weight": (180, 192, 3, 3),  # conv_first is Sequential(PixelUnshuffle(8), Conv2d)
        "patch_embed.norm.weight": (180,),
        "layers.0.residual_group.blocks.0.attn.relative_position_bias_table": (225, 6),
        "layers.0.residual_group.blocks.0.attn.relative_position_index": (64, 64),
        "layers.0.residual_group.blocks.0.attn.qkv.weight": (540, 180),
        "layers.0.residual_group.blocks.1.attn_mask": (64, 64, 64),  # 64 windows of the 64x64 feature map
        "layers.3.residual_group.blocks.5.mlp.fc1.weight": (360, 180),
        "layers.7.conv.weight": (180, 180, 3, 3),
        "norm.bias": (180,),
        "conv_after_body.weight": (180, 180, 3, 3),
        "conv_before_upsample.0.weight": (64, 180, 3, 3),
        "conv_up3.weight": (64, 64, 3, 3),
        "conv_hr.bias": (64,),
        "conv_last.weight": (3, 64, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    # non-shifted blocks have no mask; the RGB mean and the patch (un)embedding hold no state
    assert "layers.0.residual_group.blocks.0.attn_mask" not in sd
    assert sum(k.endswith("attn_mask") for k in sd) == 24
    assert not {"mean", "conv_first.weight", "layers.0.patch_embed.norm.weight"} & set(sd)
    assert sd["layers.0.residual_group.blocks.0.attn.relative_position_index"].dtype == torch.long


@pytest.mark.parametrize(
    "kwargs",
    [
        {"upsampler": "pixelshuffle"},
        {"resi_connection": "2conv"},
        {"depths": [6, 6], "num_heads": [6]},
        {"embed_dim": 10},
        {"unshuffle": False},
        {"sf": 4},
    ],
)
def test_bad_config_is_one_line_value_error(kwargs):
    with pytest.raises(ValueError) as err:
        SwinIR(**{**TINY, **kwargs})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("config", "size"),
    [(TINY, (64, 64)), (TINY, (72, 40)), (TINY_16, (128, 128))],
    ids=["64x64", "72x40-padded", "stored-mask"],
)
def test_matches_loop_reference(config, size):
    torch.manual_seed(1)
    model = _randomised(SwinIR(**config))
    sd = model.state_dict()
    assert len(sd) == 732
    lq = torch.rand(1, 3, *size)
    with torch.no_grad():
        out = model(lq)
        ref = reference_swinir(lq, sd, img_size=config.get("img_size", 64))
    assert out.shape == lq.shape
    assert out.abs().max() > 0.1  # not a degenerate all-zero comparison
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_output_keeps_odd_sizes_and_matches_explicit_padding():
    model = _randomised(SwinIR(**TINY))
    with torch.no_grad():
        for h, w in [(37, 53), (65, 9)]:
            assert model(torch.rand(2, 3, h, w)).shape == (2, 3, h, w)
        lq = torch.rand(1, 3, 40, 72)
        padded = F.pad(lq, (0, 128 - 72, 0, 64 - 40))  # zeros to a multiple of 64, as DiffBIR before stage 1
        torch.testing.assert_close(model(lq), model(padded)[..., :40, :72], atol=0, rtol=0)


def test_output_is_not_clamped():
    model = _randomised(SwinIR(**TINY))
    with torch.no_grad():
        model.conv_last.bias.copy_(torch.tensor([2.0, -2.0, 0.0]))
        out = model(torch.rand(1, 3, 64, 64))
    assert out[:, 0].min() > 1 and out[:, 1].max() < 0


@pytest.fixture
def tiny_model_and_sd():
    model = _randomised(SwinIR(**TINY), seed=3)
    return model, model.state_dict()


def test_checkpoint_round_trips(tmp_path: Path, tiny_model_and_sd):
    from safetensors.torch import save_file

    model, sd = tiny_model_and_sd
    lq = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = model(lq)
    st = tmp_path / "face_swinir.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    ckpt = tmp_path / "face_swinir_v1.ckpt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, ckpt)
    pth = tmp_path / "basicsr.pth"
    torch.save({"params_ema": sd, "params": {k: torch.zeros_like(v) for k, v in sd.items()}}, pth)
    for path in (st, ckpt, pth):
        assert set(load_swinir_checkpoint(path)) == set(sd)
        loaded = swinir_from_checkpoint(path, **TINY)
        assert not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(lq), want, atol=0, rtol=0)


class _NotATensor:
    pass


def _bad_files(tmp_path: Path, sd: dict) -> dict[str, Path]:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": sd}, good)
    data = good.read_bytes()
    files = {}
    files["truncated"] = tmp_path / "truncated.ckpt"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"] = tmp_path / "empty.pth"
    files["empty"].write_bytes(b"")
    files["bad_safetensors"] = tmp_path / "broken.safetensors"
    files["bad_safetensors"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    files["pickled_object"] = tmp_path / "object.ckpt"
    torch.save({"state_dict": sd, "hparams": _NotATensor()}, files["pickled_object"])
    files["missing_file"] = tmp_path / "nowhere.ckpt"
    edits = {
        "missing_key": lambda d: d.pop("layers.0.residual_group.blocks.0.attn.qkv.weight"),
        "extra_key": lambda d: d.__setitem__("layers.8.conv.weight", torch.zeros(1)),
        "misshaped_key": lambda d: d.__setitem__("conv_last.weight", torch.zeros(3, 64, 1, 1)),
    }
    for name, edit in edits.items():
        d = dict(sd)
        edit(d)
        files[name] = tmp_path / f"{name}.ckpt"
        torch.save(d, files[name])
    return files


@pytest.mark.parametrize(
    "case",
    ["truncated", "empty", "bad_safetensors", "pickled_object", "missing_file", "missing_key", "extra_key", "misshaped_key"],
)
def test_bad_checkpoint_is_one_line_value_error(tmp_path: Path, tiny_model_and_sd, case):
    path = _bad_files(tmp_path, tiny_model_and_sd[1])[case]
    with pytest.raises(ValueError) as err:
        swinir_from_checkpoint(path, **TINY)
    msg = str(err.value)
    assert "\n" not in msg and path.name in msg, msg
    if case.endswith("_key"):
        assert "not a SwinIR checkpoint" in msg
        key = {"missing_key": "missing layers.0.residual_group.blocks.0.attn.qkv.weight",
               "extra_key": "unexpected layers.8.conv.weight", "misshaped_key": "conv_last.weight has shape"}[case]
        assert key in msg, msg


def test_wrong_config_for_checkpoint_names_first_keys(tmp_path: Path, tiny_model_and_sd):
    path = tmp_path / "tiny.ckpt"
    torch.save(tiny_model_and_sd[1], path)
    with pytest.raises(ValueError, match=r"more\)$") as err:
        swinir_from_checkpoint(path, embed_dim=12, depths=[6] * 4, num_heads=[6] * 4)
    assert "\n" not in str(err.value)


def test_registered_as_cleaner():
    import facereward.models.cleaner as cleaner

    model = cleaner.build_cleaner("swinir", {"embed_dim": 12, "depths": [2, 2], "num_heads": [2, 2]})
    assert isinstance(model, SwinIR)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 24, 70)).shape == (1, 3, 24, 70)
