"""LPIPS perceptual distance (Zhang et al. 2018, ``lpips`` package v0.1) in plain torch (docs/methods.md section 3).

No torchvision and no ``lpips`` package: the VGG16 / AlexNet feature extractors are rebuilt here with
torchvision's exact module layout, so the original weight files load unchanged. Nothing is downloaded;
both files come from local paths the user names.

Computation (identical to ``lpips.LPIPS(net=..., version="0.1")(x, y, normalize=True)``):

1. Inputs ``x, y``: ``(B, 3, H, W)`` float tensors, RGB on ``[0, 1]``; mapped to ``[-1, 1]`` by ``2x - 1``.
2. Scaling layer: ``(z - shift) / scale`` with ``shift = [-.030, -.088, -.188]``,
   ``scale = [.458, .448, .450]`` per RGB channel.
3. Backbone features at five taps: VGG16 ``relu1_2, relu2_2, relu3_3, relu4_3, relu5_3``
   (``features`` indices 3, 8, 15, 22, 29; 64, 128, 256, 512, 512 channels) or AlexNet
   ``relu1 .. relu5`` (``features`` indices 1, 4, 7, 9, 11; 64, 192, 384, 256, 256 channels).
4. Per tap: unit-normalise along channels, ``f / (sqrt(sum_c f^2) + 1e-10)``; squared difference;
   1x1 convolution with that tap's linear head (no bias); mean over H, W. Sum over the five taps.
5. Result: one distance per image, shape ``(B,)``. Differentiable in ``x`` and ``y`` (usable as a loss);
   all weights are frozen (``requires_grad=False``) and the module is in eval mode.

Minimum image size: 16x16 for VGG, 31x31 for AlexNet (the last tap must be at least 1x1).

Accepted files
--------------
Read by :mod:`facereward.measures.weightfile` (``.safetensors`` or ``torch.load(weights_only=True)``; pickled
code refused): a flat ``{name: tensor}`` dict, no wrapper (no ``{"state_dict": ...}``) and no key prefix stripped.
Tensors of any floating dtype are accepted and stored as float32.

Backbone (``backbone_path``): torchvision's ImageNet weights,
``vgg16-397923af.pth`` (``torchvision.models.vgg16(weights="IMAGENET1K_V1")``) or
``alexnet-owt-7be5be79.pth`` (``torchvision.models.alexnet(weights="IMAGENET1K_V1")``), or the same
tensors re-saved as ``.safetensors``. Two key layouts are accepted:

* full model: ``features.N.weight`` / ``features.N.bias`` plus any other top-level keys
  (``classifier.*``), which are ignored;
* features only (``model.features.state_dict()``): ``N.weight`` / ``N.bias``.

with ``N`` and shapes (weight ``(out, in, k, k)``, bias ``(out,)``):

* ``vgg``: N = 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28; out channels 64, 64, 128, 128, 256,
  256, 256, 512, 512, 512, 512, 512, 512; all 3x3 (stride 1, padding 1); 2x2 max-pools at 4, 9, 16, 23.
* ``alex``: N = 0, 3, 6, 8, 10; ``(64, 3, 11, 11)`` (stride 4, padding 2), ``(192, 64, 5, 5)``
  (padding 2), ``(384, 192, 3, 3)``, ``(256, 384, 3, 3)``, ``(256, 256, 3, 3)`` (padding 1);
  3x3 stride-2 max-pools at 2, 5.

Every one of these keys must be present with exactly that shape; any other key inside the
features namespace (e.g. a BatchNorm entry of ``vgg16_bn``) is an error.

Linear heads (``heads_path``): the ``lpips`` package's ``lpips/weights/v0.1/vgg.pth`` or
``alex.pth`` (or the same tensors as ``.safetensors``): keys ``lin0.model.1.weight`` ..
``lin4.model.1.weight``, each of shape ``(1, C, 1, 1)`` with C the tap's channel count above
(``model.0`` is the Dropout, which has no weights). Other keys in the file (e.g. ``net.*`` or
``scaling_layer.*`` of a full ``lpips.LPIPS`` state dict) are ignored.

Errors are one line and name the file: ``FileNotFoundError`` for a missing file; ``ValueError`` for an
unknown net, an unreadable / non-dict / pickle-unsafe file, a missing key, an unexpected features key,
or a wrong shape (naming the key, its shape and the expected one).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from facereward.measures.weightfile import check_layout, file_label, read_state_dict

__all__ = ["LPIPS", "load_lpips", "backbone_layout", "heads_layout", "NETS"]

# lpips v0.1 ScalingLayer constants, applied to inputs in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10

# torchvision `features` layouts: ("conv", out, in, k, stride, pad) | ("relu",) | ("pool", k, stride).
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
_ALEX_SPEC = [
    ("conv", 64, 3, 11, 4, 2),
    ("relu",),
    ("pool", 3, 2),
    ("conv", 192, 64, 5, 1, 2),
    ("relu",),
    ("pool", 3, 2),
    ("conv", 384, 192, 3, 1, 1),
    ("relu",),
    ("conv", 256, 384, 3, 1, 1),
    ("relu",),
    ("conv", 256, 256, 3, 1, 1),
    ("relu",),
    ("pool", 3, 2),
]


def _vgg16_spec() -> list[tuple]:
    spec: list[tuple] = []
    cin = 3
    for v in _VGG16_CFG:
        if v == "M":
            spec.append(("pool", 2, 2))
        else:
            spec += [("conv", v, cin, 3, 1, 1), ("relu",)]
            cin = v
    return spec


# net name -> (features spec, tap indices (outputs of these modules), tap channels, minimum H/W)
NETS: dict[str, tuple[list[tuple], tuple[int, ...], tuple[int, ...], int]] = {
    "vgg": (_vgg16_spec(), (3, 8, 15, 22, 29), (64, 128, 256, 512, 512), 16),
    "alex": (_ALEX_SPEC, (1, 4, 7, 9, 11), (64, 192, 384, 256, 256), 31),
}
_ALIASES = {"vgg": "vgg", "vgg16": "vgg", "alex": "alex", "alexnet": "alex"}


def _canonical_net(net: str) -> str:
    key = str(net).lower()
    if key not in _ALIASES:
        raise ValueError(f"LPIPS: unknown net {net!r}; choose 'vgg' or 'alex'")
    return _ALIASES[key]


def backbone_layout(net: str) -> dict[str, tuple[int, ...]]:
    """Features-only key -> shape expected in a torchvision ``features`` state dict (``'0.weight'``...)."""
    spec = NETS[_canonical_net(net)][0]
    layout: dict[str, tuple[int, ...]] = {}
    for i, layer in enumerate(spec):
        if layer[0] == "conv":
            _, cout, cin, k, _, _ = layer
            layout[f"{i}.weight"] = (cout, cin, k, k)
            layout[f"{i}.bias"] = (cout,)
    return layout


def heads_layout(net: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape expected in an lpips v0.1 heads file (``'lin0.model.1.weight'``...)."""
    chns = NETS[_canonical_net(net)][2]
    return {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(chns)}


def _load_backbone_tensors(net: str, path: str | Path, who: str = "LPIPS") -> dict[str, Tensor]:
    """Read a torchvision vgg16/alexnet file (full or features-only) -> features-only ``{'0.weight': ...}``.

    ``who`` labels the errors (DISTS loads its VGG16 through here).
    """
    sd = read_state_dict(path, who, "backbone")
    prefix = "features." if any(k.startswith("features.") for k in sd) else ""
    if prefix:  # a full model: only the features namespace is checked, classifier.* is ignored
        sd = {k: v for k, v in sd.items() if k.startswith(prefix)}
    tv_name = "vgg16" if _canonical_net(net) == "vgg" else "alexnet"
    checked = check_layout(
        sd,
        {prefix + k: shape for k, shape in backbone_layout(net).items()},
        file_label(who, "backbone", path),
        layout_name=f"torchvision's {tv_name} features",
        hint=lambda key, got: "a _bn variant or another network?" if key in got else "",
    )
    return {k[len(prefix):]: t for k, t in checked.items()}


def _load_head_tensors(net: str, path: str | Path) -> dict[str, Tensor]:
    layout = heads_layout(net)
    sd = read_state_dict(path, "LPIPS", "heads")
    sd = {k: v for k, v in sd.items() if k in layout}  # net.* / scaling_layer.* of a full lpips.LPIPS: ignored
    return check_layout(sd, layout, file_label("LPIPS", "heads", path), layout_name=f"lpips v0.1 {net} heads")


def _build_features(spec: list[tuple]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for layer in spec:
        if layer[0] == "conv":
            _, cout, cin, k, stride, pad = layer
            layers.append(nn.Conv2d(cin, cout, k, stride=stride, padding=pad))
        elif layer[0] == "relu":
            layers.append(nn.ReLU(inplace=False))
        else:
            layers.append(nn.MaxPool2d(kernel_size=layer[1], stride=layer[2]))
    return nn.Sequential(*layers)


class _Backbone(nn.Module):
    """torchvision-layout ``features`` stack that returns the activations at the LPIPS taps."""

    def __init__(self, net: str):
        super().__init__()
        spec, taps, _, _ = NETS[net]
        self.features = _build_features(spec)
        self.taps = taps

    def forward(self, x: Tensor) -> list[Tensor]:
        outs: list[Tensor] = []
        last = self.taps[-1]
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                outs.append(x)
            if i == last:
                break
        return outs


class _LinearHead(nn.Module):
    """lpips ``NetLinLayer`` with the same key (``model.1.weight``); ``model.0`` is Identity, not Dropout,
    so ``.train()`` can never change the metric."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance between ``(B, 3, H, W)`` images on ``[0, 1]``; ``forward(x, y) -> (B,)``.

    ``LPIPS("vgg", "vgg16-397923af.pth", "vgg.pth")`` or ``LPIPS("alex", "alexnet-owt-7be5be79.pth",
    "alex.pth")``; see the module docstring for the accepted files. Lower is more similar.
    """

    def __init__(
        self,
        net: str = "vgg",
        backbone_path: str | Path | None = None,
        heads_path: str | Path | None = None,
    ):
        super().__init__()
        net = _canonical_net(net)
        if backbone_path is None:
            tv_name = "vgg16" if net == "vgg" else "alexnet"
            raise ValueError(f"LPIPS('{net}') needs backbone_path (torchvision {tv_name} weights)")
        if heads_path is None:
            raise ValueError(f"LPIPS('{net}') needs heads_path (lpips weights/v0.1/{net}.pth)")
        self.net_name = net
        _, _, chns, self.min_size = NETS[net]
        backbone = _load_backbone_tensors(net, backbone_path)
        heads = _load_head_tensors(net, heads_path)

        self.net = _Backbone(net)
        self.net.features.load_state_dict(backbone, strict=True)
        for k, c in enumerate(chns):
            head = _LinearHead(c)
            head.model[1].weight.data.copy_(heads[f"lin{k}.model.1.weight"])
            setattr(self, f"lin{k}", head)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def heads(self) -> list[_LinearHead]:
        return [getattr(self, f"lin{k}") for k in range(5)]

    def _check_inputs(self, x: Tensor, y: Tensor) -> None:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise ValueError("LPIPS: x and y must be torch tensors")
        if x.ndim != 4 or x.shape != y.shape or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS: expected two (B, 3, H, W) tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"LPIPS ({self.net_name}): image {x.shape[-2]}x{x.shape[-1]} is too small, "
                f"need at least {self.min_size}x{self.min_size}"
            )

    def per_layer(self, x: Tensor, y: Tensor) -> Tensor:
        """The five per-tap terms, shape ``(B, 5)``; ``forward`` is their sum."""
        self._check_inputs(x, y)
        b = x.shape[0]
        dtype = self.shift.dtype
        z = torch.cat([x, y], dim=0).to(dtype)
        z = (z * 2 - 1 - self.shift) / self.scale  # [0,1] -> [-1,1] -> lpips ScalingLayer
        terms = []
        for f, head in zip(self.net(z), self.heads):
            f = f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + _EPS)  # lpips normalize_tensor
            d = (f[:b] - f[b:]) ** 2
            terms.append(head(d).mean(dim=(1, 2, 3)))  # 1x1 conv to one channel, spatial average
        return torch.stack(terms, dim=1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.per_layer(x, y).sum(dim=1)

    def extra_repr(self) -> str:
        return f"net={self.net_name!r}"


def load_lpips(net: str, backbone_path: str | Path, heads_path: str | Path) -> LPIPS:
    """Build a frozen, eval-mode :class:`LPIPS` (``'vgg'`` or ``'alex'``) from local weight files."""
    return LPIPS(net, backbone_path, heads_path)
