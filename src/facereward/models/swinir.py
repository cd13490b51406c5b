"""SwinIR stage-1 cleaner in plain torch, laid out like DiffBIR's face SwinIR (docs/methods.md 0).

The face model pixel-unshuffles the image by 8, runs 8 residual Swin stages (6 blocks each, window 8,
shifted windows on every other block) at 1/8 resolution and brings the features back to full size with
three nearest-neighbour x2 + conv steps. Module and buffer names follow DiffBIR's `diffbir/model/swinir.py`
exactly, so the released `face_swinir_v1.ckpt` loads with a strict `load_state_dict`
(`swinir_from_checkpoint`). `facereward.models.cleaner` registers it as the cleaner "swinir".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from facereward.models.checkpoint_io import read_state_dict

_RGB_MEAN = (0.4488, 0.4371, 0.4040)
_NUM_FEAT = 64  # width of DiffBIR's reconstruction convs, fixed there too


def _to_windows(x: Tensor, ws: int) -> Tensor:
    """(B, H, W, C) -> (B * nW, ws * ws, C); windows in row-major order within each image."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def _from_windows(win: Tensor, ws: int, h: int, w: int) -> Tensor:
    """Inverse of `_to_windows`: (B * nW, ws * ws, C) -> (B, H, W, C)."""
    c = win.shape[-1]
    x = win.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> Tensor:
    """(nW, N, N) additive mask for an (h, w) map shifted by `shift`: -100 between tokens of different regions.

    After the cyclic shift, the last window row/column mixes tokens from opposite borders; each axis splits
    into [0, n - window), [n - window, n - shift) and [n - shift, n), as in SwinIR.
    """

    def bands(n: int) -> Tensor:
        band = torch.zeros(n)
        band[n - window :] = 1
        band[n - shift :] = 2
        return band

    region = bands(h)[:, None] * 3 + bands(w)[None, :]
    win = _to_windows(region[None, :, :, None], window).squeeze(-1)  # nW, N
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def relative_position_index(window: int) -> Tensor:
    """(N, N) index into the (2 * window - 1) ** 2 bias table for every pair of tokens in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # 2, N, N, each in [0, 2 * window - 2]
    return rel[0] * (2 * window - 1) + rel[1]


class _DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside square windows, with a learned relative position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Persistent, as in DiffBIR: the released checkpoint stores it.
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B * nW, N, C); mask: (nW, N, N) additive, or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]).view(bw, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c)))


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP over a (B, H * W, C) token map."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int,
                 shift_size: int, mlp_ratio: float, qkv_bias: bool, qk_scale: float | None,
                 drop: float, attn_drop: float, drop_path: float):
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size = window_size
        # A map no larger than one window is never shifted (SwinIR's rule, decided by img_size, not the input).
        self.shift_size = 0 if min(input_resolution) <= window_size else shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = _DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        # Persistent for shifted blocks (the checkpoint holds it, for img_size); absent for the others.
        mask = shifted_window_mask(*input_resolution, window_size, self.shift_size) if self.shift_size else None
        self.register_buffer("attn_mask", mask)

    def _mask(self, x_size: tuple[int, int], like: Tensor) -> Tensor | None:
        if not self.shift_size:
            return None
        if x_size == self.input_resolution:
            return self.attn_mask
        return shifted_window_mask(*x_size, self.window_size, self.shift_size).to(like)

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        h, w = x_size
        b, _, c = x.shape
        s, ws = self.shift_size, self.window_size
        y = self.norm1(x).view(b, h, w, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = _from_windows(self.attn(_to_windows(y, ws), self._mask(x_size, y)), ws, h, w)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + self.drop_path(y.reshape(b, h * w, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BasicLayer(nn.Module):
    """`depth` Swin blocks, alternating plain and half-window-shifted attention."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int,
                 window_size: int, mlp_ratio: float, qkv_bias: bool, qk_scale: float | None, drop: float,
                 attn_drop: float, drop_path: Sequence[float], use_checkpoint: bool):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, input_resolution, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2,
                                 mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path[i])
            for i in range(depth)
        )

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(blk, x, x_size, use_reentrant=False)
            else:
                x = blk(x, x_size)
        return x


def _conv_block(dim: int, kind: str) -> nn.Module:
    """The conv closing a residual group: one 3x3 conv, or DiffBIR's cheaper 3x3 -> 1x1 -> 3x3 bottleneck."""
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    return nn.Sequential(
        nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(dim // 4, dim, 3, 1, 1),
    )


class RSTB(nn.Module):
    """Residual Swin Transformer Block: Swin blocks, then a conv on the 2-D map, plus a skip."""

    def __init__(self, dim: int, resi_connection: str, **layer_kwargs):
        super().__init__()
        self.residual_group = BasicLayer(dim=dim, **layer_kwargs)
        self.conv = _conv_block(dim, resi_connection)

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        b, _, c = x.shape
        y = self.residual_group(x, x_size).transpose(1, 2).reshape(b, c, *x_size)
        return self.conv(y).flatten(2).transpose(1, 2) + x


class _PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H * W, C), optionally layer-normed (DiffBIR's patch_embed; patch size 1 in practice)."""

    def __init__(self, dim: int, patch_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if patch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x


class SwinIR(nn.Module):
    """DiffBIR's stage-1 SwinIR; the defaults are its face config (embed 180, 8 x 6 blocks, unshuffle 8)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 64,
        patch_size: int = 1,
        in_chans: int = 3,
        embed_dim: int = 180,
        depths: Sequence[int] = (6, 6, 6, 6, 6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6, 6, 6, 6, 6),
        window_size: int = 8,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        sf: int = 8,
        img_range: float = 1.0,
        upsampler: str = "nearest+conv",
        resi_connection: str = "1conv",
        unshuffle: bool = True,
        unshuffle_scale: int | None = 8,
    ):
        super().__init__()
        depths, num_heads = list(depths), list(num_heads)
        if upsampler != "nearest+conv":
            raise ValueError(f"SwinIR upsampler {upsampler!r} is not supported (only 'nearest+conv')")
        if resi_connection not in ("1conv", "3conv"):
            raise ValueError(f"SwinIR resi_connection must be '1conv' or '3conv', got {resi_connection!r}")
        if len(depths) != len(num_heads):
            raise ValueError(f"SwinIR depths {depths} and num_heads {num_heads} must have the same length")
        if any(embed_dim % h for h in num_heads):
            raise ValueError(f"SwinIR embed_dim {embed_dim} must be divisible by every num_heads entry {num_heads}")
        if sf not in (2, 4, 8) or not unshuffle or unshuffle_scale != sf:
            raise ValueError(
                f"SwinIR cleaner needs unshuffle=True and unshuffle_scale == sf in (2, 4, 8) so the output keeps "
                f"the input size; got sf={sf}, unshuffle={unshuffle}, unshuffle_scale={unshuffle_scale}"
            )
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        resolution = (img_hw[0] // patch_size, img_hw[1] // patch_size)
        if min(resolution) < window_size:
            raise ValueError(f"SwinIR img_size // patch_size {resolution} must be at least window_size {window_size}")

        self.img_range = img_range
        self.window_size = window_size
        self.unshuffle_scale = unshuffle_scale
        self.upscale = sf
        self.patches_resolution = resolution
        self.ape = ape
        mean = torch.tensor(_RGB_MEAN).view(1, 3, 1, 1) if in_chans == 3 else torch.zeros(1, 1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)  # a plain attribute in DiffBIR: not in the checkpoint

        # Shallow features at 1/sf resolution (index 1 in the key names: conv_first.1.weight).
        self.conv_first = nn.Sequential(nn.PixelUnshuffle(sf), nn.Conv2d(in_chans * sf**2, embed_dim, 3, 1, 1))

        # Deep features.
        self.patch_embed = _PatchEmbed(embed_dim, patch_norm)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, resolution[0] * resolution[1], embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            start = sum(depths[:i])
            self.layers.append(RSTB(
                embed_dim, resi_connection, input_resolution=resolution, depth=depth, num_heads=heads,
                window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[start:start + depth],
                use_checkpoint=use_checkpoint,
            ))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = _conv_block(embed_dim, resi_connection)

        # Reconstruction: log2(sf) nearest x2 + conv steps back to the input size.
        # DiffBIR's LeakyReLU here has the default slope 0.01; self.lrelu below uses 0.2.
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, _NUM_FEAT, 3, 1, 1), nn.LeakyReLU(inplace=True))
        self.conv_up1 = nn.Conv2d(_NUM_FEAT, _NUM_FEAT, 3, 1, 1)
        if sf >= 4:
            self.conv_up2 = nn.Conv2d(_NUM_FEAT, _NUM_FEAT, 3, 1, 1)
        if sf == 8:
            self.conv_up3 = nn.Conv2d(_NUM_FEAT, _NUM_FEAT, 3, 1, 1)
        self.conv_hr = nn.Conv2d(_NUM_FEAT, _NUM_FEAT, 3, 1, 1)
        self.conv_last = nn.Conv2d(_NUM_FEAT, in_chans, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.patch_embed(x)
        if self.ape:
            t = t + self.absolute_pos_embed
        t = self.pos_drop(t)
        for layer in self.layers:
            t = layer(t, (h, w))
        return self.norm(t).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, lq: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> cleaned (B, 3, H, W), not clamped; any H, W (zero-padded inside, then cropped)."""
        h, w = lq.shape[-2:]
        # Zero padding to a multiple of 64 at the bottom/right is what DiffBIR's SwinIRPipeline does before
        # stage 1; the model's own reflect padding (to a multiple of 8 only) never applies with unshuffle 8.
        m = self.window_size * self.unshuffle_scale
        x = F.pad(lq, (0, (-w) % m, 0, (-h) % m))
        x = (x - self.mean) * self.img_range
        feat = self.conv_first(x)
        feat = self.conv_after_body(self.forward_features(feat)) + feat
        x = self.conv_before_upsample(feat)
        for name in ("conv_up1", "conv_up2", "conv_up3")[: self.upscale.bit_length() - 1]:
            x = self.lrelu(getattr(self, name)(F.interpolate(x, scale_factor=2, mode="nearest")))
        x = self.conv_last(self.lrelu(self.conv_hr(x)))
        return (x / self.img_range + self.mean)[..., :h, :w]


def load_swinir_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state dict in a `.safetensors` or pickled `.ckpt`/`.pth` file (weights_only), unwrapped and unprefixed.

    A top-level "state_dict" (Lightning), "params_ema" or "params" (BasicSR) entry is taken if present, and a
    "module." prefix is stripped. Any unreadable file is a one-line ValueError naming it.
    """
    return read_state_dict(path, what="SwinIR checkpoint")


def swinir_config_from_state_dict(sd: Mapping[str, Tensor], path: str | Path = "state dict") -> dict:
    """SwinIR's constructor arguments read from a state dict's shapes (img_size from the stored shift masks)."""
    try:
        embed, in_ch = sd["conv_first.1.weight"].shape[:2]
        layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.")})
        depths = [len({k.split(".")[4] for k in sd if k.startswith(f"layers.{i}.residual_group.blocks.")}) for i in layers]
        block = "layers.0.residual_group.blocks.0."
        table = sd[block + "attn.relative_position_bias_table"]
        window = (int(round(table.shape[0] ** 0.5)) + 1) // 2
        heads = [sd[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1] for i in layers]
        hidden = sd[block + "mlp.fc1.weight"].shape[0]
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{path}: not a DiffBIR SwinIR state dict (no {err})") from None
    scale = int(round((in_ch / 3) ** 0.5))
    masks = [v for k, v in sd.items() if k.endswith(".attn_mask")]
    img_size = window * int(round(masks[0].shape[0] ** 0.5)) if masks else 64
    return {
        "img_size": img_size, "embed_dim": int(embed), "depths": depths, "num_heads": heads, "window_size": window,
        "mlp_ratio": hidden / embed, "qkv_bias": block + "attn.qkv.bias" in sd, "ape": "absolute_pos_embed" in sd,
        "patch_norm": "patch_embed.norm.weight" in sd, "sf": scale, "unshuffle_scale": scale,
        "resi_connection": "3conv" if "layers.0.conv.0.weight" in sd else "1conv",
    }


def swinir_from_checkpoint(path: str | Path, **config) -> SwinIR:
    """`SwinIR(**config)` with the weights in `path`, loaded strictly, in eval mode; no config: read from the shapes."""
    return swinir_from_state_dict(load_swinir_checkpoint(path), path, **config)


def swinir_from_state_dict(sd: Mapping[str, Tensor], path: str | Path = "state dict", **config) -> SwinIR:
    """`swinir_from_checkpoint` for a state dict already read; `path` names it in errors."""
    model = SwinIR(**(config or swinir_config_from_state_dict(sd, path)))
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in expected]
    problems += [
        f"{k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if problems:
        more = f", ... ({len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{path}: not a SwinIR checkpoint for this config: {', '.join(problems[:3])}{more}")
    model.load_state_dict(sd, strict=True)
    return model.eval()
