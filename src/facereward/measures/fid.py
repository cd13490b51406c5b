"""FID and KID with a pluggable feature extractor (docs/methods.md section 3).

What is computed, and how it matches the reference implementations:

* ``fid_from_stats`` / ``fid_from_features``: the Frechet distance between Gaussians fitted to two
  feature sets, ``||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2))``, with ``mu`` the mean and
  ``S`` ``np.cov(rowvar=False)`` (unbiased, N-1), all in float64. This is pytorch-fid's
  ``calculate_frechet_distance``, including its fix for a singular product (retry with ``eps * I``
  added to both covariances when ``sqrtm`` is not finite) and its handling of complex output
  (take the real part when the diagonal's imaginary part is below 1e-3, raise otherwise).
* ``kid_from_features``: the Kernel Inception Distance of torch-fidelity / clean-fid: the unbiased
  MMD^2 estimate with the polynomial kernel ``k(x, y) = (gamma x.y + coef0)^degree`` (defaults
  ``gamma = 1/D``, ``coef0 = 1``, ``degree = 3``), averaged over ``subsets`` random subsets of
  ``subset_size`` rows drawn without replacement from each set; returns (mean, std) over subsets
  (``np.std``, ddof 0, as torch-fidelity). The estimator per subset of size m is
  ``sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(m(m-1)) - 2 sum_{i,j} k(x_i,y_j)/m^2``.
  ``subset_size`` is clipped to the smaller set's size (clean-fid does the same; torch-fidelity
  raises instead).
* ``InceptionV3Features``: the TF-FID Inception-v3 (``inception-2015-12-05``) as pytorch-fid
  runs it (``InceptionV3(use_fid_inception=True)``, block 3): the ``FIDInceptionA/C/E_1/E_2``
  variant of torchvision's ``Inception3`` (average pools with ``count_include_pad=False``, a max
  pool in ``Mixed_7c``'s pool branch), input resized to 299x299 bilinearly
  (``align_corners=False``) and mapped from [0, 1] to [-1, 1], 2048-d pool3 features. Written in
  plain torch (no torchvision); parameter names are torchvision's, so pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth`` loads directly. No weights ship with facereward: the user
  names the file.

Any ``FeatureExtractor`` can stand in for Inception (e.g. an identity embedder, for a face-specific
"FID"); its ``name`` is what tables show, so scores computed with different extractors are never
mistaken for one another.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facereward.measures.weightfile import read_state_dict

__all__ = [
    "FeatureExtractor",
    "CallableFeatures",
    "InceptionV3Features",
    "FIDInceptionV3",
    "load_fid_inception_state_dict",
    "compute_features",
    "feature_stats",
    "save_stats",
    "load_stats",
    "fid_from_stats",
    "fid_from_features",
    "kid_from_features",
    "fid",
    "kid",
]

INCEPTION_NAME = "inception-v3 (pytorch-fid)"
INCEPTION_DIMS = 2048
# pytorch-fid's FID weights come from the TF graph, whose classifier has 1008 outputs.
FID_INCEPTION_NUM_CLASSES = 1008


# ----------------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------------
@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps a batch of images to one feature vector per image.

    ``name``: an honest label shown in tables ("inception-v3 (pytorch-fid)", "dlib-resnet128", ...).
    ``features(images)``: ``images`` is a ``(B, C, H, W)`` float tensor on [0, 1] (RGB); returns a
    ``(B, D)`` float64 tensor (or array).
    """

    name: str

    def features(self, images: Tensor) -> Tensor: ...


class CallableFeatures:
    """Wraps a plain function ``fn(images) -> (B, D)`` as a :class:`FeatureExtractor`."""

    def __init__(self, name: str, fn: Callable[[Tensor], Tensor]) -> None:
        if not name:
            raise ValueError("CallableFeatures: name must be a non-empty string (it is shown in tables)")
        self.name = str(name)
        self._fn = fn

    def features(self, images: Tensor) -> Tensor:
        out = self._fn(images)
        return torch.as_tensor(out).to(torch.float64)

    def __repr__(self) -> str:
        return f"CallableFeatures(name={self.name!r})"


# ----------------------------------------------------------------------------------------------
# FID Inception-v3 (pytorch-fid's fid_inception_v3, torchvision Inception3 parameter names)
# ----------------------------------------------------------------------------------------------
class _BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BatchNorm(eps=0.001) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    # TF's average pool ignores the zero padding: pytorch-fid's FIDInception* patch.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _FIDInceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = _BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = _BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class _InceptionB(nn.Module):  # Mixed_6a, unpatched
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = _BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class _FIDInceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = _BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = _BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = _BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(bd))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class _InceptionD(nn.Module):  # Mixed_7a, unpatched
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = _BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = _BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = _BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class _FIDInceptionE(nn.Module):
    """``pool="avg"``: pytorch-fid's FIDInceptionE_1 (Mixed_7b); ``pool="max"``: FIDInceptionE_2
    (Mixed_7c), whose pool branch max-pools (stride 1, padding 1) as the TF graph does."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = _BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = _BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = _BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _tf_avg_pool(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 trunk up to pool3: ``(B, 3, H, W)`` in [-1, 1] -> ``(B, 2048)``.

    Module and parameter names are torchvision ``Inception3``'s (``aux_logits=False``), so the keys
    of pytorch-fid's weight file match, minus ``fc.weight``/``fc.bias`` (the 1008-way classifier is
    not needed for features). Expects 299x299 input for the reference features; any size >= 75 runs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = _BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = _FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = _FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = _FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = _FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = _FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = _FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = _FIDInceptionE(2048, pool="max")

    def forward(self, x: Tensor) -> Tensor:
        # pytorch-fid InceptionV3 blocks 0..3
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)


def load_fid_inception_state_dict(path: str | Path, model: FIDInceptionV3 | None = None) -> dict[str, Tensor]:
    """Read and check pytorch-fid's FID Inception weights (``.pth``/``.pt`` or ``.safetensors``).

    Read by :mod:`facereward.measures.weightfile` (pickled code refused), bare or under a ``"state_dict"`` key.

    Returns the state dict restricted to ``FIDInceptionV3``'s keys. Raises ``FileNotFoundError`` for
    a missing file and ``ValueError`` (one line, naming the file) for missing, mis-shaped or foreign
    keys. ``fc.*`` is accepted and dropped (shape-checked when present: the FID graph's classifier is
    1008-way; a 1000-way one means torchvision's ImageNet Inception, whose FIDs are not comparable).
    ``*.num_batches_tracked`` is optional.
    """
    path = Path(path).expanduser()
    raw = read_state_dict(
        path, "FID Inception", "weights", unwrap=("state_dict",),
        expected="pytorch-fid's pt_inception-2015-12-05-6726825d.pth or the same tensors as .safetensors",
    )
    if model is None:
        with torch.device("meta"):  # shapes only, no init cost
            model = FIDInceptionV3()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    if any(k.startswith("AuxLogits.") for k in raw):
        raise ValueError(
            f"{path}: has AuxLogits.* keys, so it looks like torchvision's ImageNet Inception-v3, not pytorch-fid's "
            "FID Inception (pt_inception-2015-12-05); FIDs from it are not comparable"
        )
    if "fc.weight" in raw and tuple(raw["fc.weight"].shape) != (FID_INCEPTION_NUM_CLASSES, INCEPTION_DIMS):
        raise ValueError(
            f"{path}: fc.weight has shape {tuple(raw['fc.weight'].shape)}, expected "
            f"({FID_INCEPTION_NUM_CLASSES}, {INCEPTION_DIMS}) as in pytorch-fid's FID Inception; a 1000-way fc is "
            "torchvision's ImageNet Inception, whose FIDs are not comparable"
        )
    required = [k for k in expected if not k.endswith("num_batches_tracked")]
    missing = [k for k in required if k not in raw]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(f"{path}: not a pytorch-fid FID Inception state dict: {len(missing)} missing keys ({shown})")
    unexpected = [k for k in raw if k not in expected and not k.startswith("fc.")]
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (", ..." if len(unexpected) > 3 else "")
        raise ValueError(
            f"{path}: not a pytorch-fid FID Inception state dict: {len(unexpected)} unexpected keys ({shown})"
        )
    for k in required:
        if tuple(raw[k].shape) != expected[k]:
            raise ValueError(f"{path}: key {k} has shape {tuple(raw[k].shape)}, expected {expected[k]}")
        if not torch.is_floating_point(raw[k]):
            raise ValueError(f"{path}: key {k} has dtype {raw[k].dtype}, expected a floating point tensor")
    sd = {k: raw[k].to(torch.float32) for k in required}
    for k in expected:
        if k.endswith("num_batches_tracked"):
            sd[k] = raw[k] if k in raw else torch.zeros((), dtype=torch.long)
    return sd


class InceptionV3Features:
    """pytorch-fid's FID feature extractor: 2048-d pool3 features of the TF-FID Inception-v3.

    ``weights_path``: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (from its GitHub release
    ``fid_weights``), or the same tensors saved as ``.safetensors``. Input ``(B, 3, H, W)`` on [0, 1]
    (``C == 1`` is repeated to RGB); it is resized to 299x299 (bilinear, ``align_corners=False``,
    no antialias: pytorch-fid's ``resize_input``) and mapped to [-1, 1] (``normalize_input``).
    """

    name = INCEPTION_NAME
    dims = INCEPTION_DIMS

    def __init__(
        self,
        weights_path: str | Path,
        device: str | torch.device = "cpu",
        resize_input: bool = True,
        normalize_input: bool = True,
    ) -> None:
        self.weights_path = Path(weights_path).expanduser()
        self.device = torch.device(device)
        self.resize_input = resize_input
        self.normalize_input = normalize_input
        with torch.device("meta"):  # no random init: every tensor comes from the file
            model = FIDInceptionV3()
        model.load_state_dict(load_fid_inception_state_dict(self.weights_path, model), strict=True, assign=True)
        self.model = model.eval().requires_grad_(False).to(self.device)

    def __repr__(self) -> str:
        return f"InceptionV3Features(weights_path={str(self.weights_path)!r}, device={str(self.device)!r})"

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"InceptionV3Features: expected a (B, C, H, W) tensor, got {shape}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise ValueError(f"InceptionV3Features: expected 1 or 3 channels, got {images.shape[1]}")
        x = images.to(self.device, torch.float32)
        lo, hi = float(x.min()), float(x.max())
        if lo < -0.05 or hi > 1.05:
            raise ValueError(f"InceptionV3Features: images must be on [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
        x = x.clamp(0.0, 1.0)
        if self.resize_input:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        if self.normalize_input:
            x = 2 * x - 1
        return self.model(x).to("cpu", torch.float64)


# ----------------------------------------------------------------------------------------------
# Feature computation
# ----------------------------------------------------------------------------------------------
def _batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterable[Tensor]:
    """Yield ``(B, C, H, W)`` batches from a tensor, or from an iterable of batches / single images."""
    if isinstance(images, Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4:
            raise ValueError(f"compute_features: expected (N, C, H, W) images, got shape {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    buf: list[Tensor] = []
    for item in images:
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(item)
        if not isinstance(item, Tensor):
            raise ValueError(f"compute_features: expected tensors, got {type(item).__name__}")
        if item.ndim == 4:
            if buf:
                yield torch.stack(buf)
                buf = []
            yield from item.split(batch_size)
        elif item.ndim == 3:
            if buf and item.shape != buf[0].shape:  # sizes differ: flush, batch like with like
                yield torch.stack(buf)
                buf = []
            buf.append(item)
            if len(buf) == batch_size:
                yield torch.stack(buf)
                buf = []
        else:
            raise ValueError(f"compute_features: expected (C, H, W) or (B, C, H, W) tensors, got {tuple(item.shape)}")
    if buf:
        yield torch.stack(buf)


def compute_features(
    extractor: FeatureExtractor,
    images: Tensor | Iterable[Tensor],
    batch_size: int = 50,
    progress: bool = False,
) -> np.ndarray:
    """Run ``extractor`` over all images; returns ``(N, D)`` float64.

    ``images``: an ``(N, C, H, W)`` tensor on [0, 1], or an iterable of ``(C, H, W)`` images and/or
    ``(B, C, H, W)`` batches (a DataLoader, a generator reading files...).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = None
    if isinstance(images, Tensor):
        total = images.shape[0] if images.ndim == 4 else 1
    from tqdm.auto import tqdm

    feats: list[np.ndarray] = []
    dim = None
    bar = tqdm(total=total, desc=f"features [{extractor.name}]", unit="img", disable=not progress, dynamic_ncols=True)
    with bar:
        for batch in _batches(images, batch_size):
            if batch.shape[0] == 0:
                continue
            f = extractor.features(batch)
            f = f.detach().cpu().numpy() if isinstance(f, Tensor) else np.asarray(f)
            f = np.asarray(f, dtype=np.float64)
            if f.ndim != 2 or f.shape[0] != batch.shape[0]:
                raise ValueError(
                    f"extractor {extractor.name!r} returned shape {f.shape} for a batch of {batch.shape[0]}, "
                    "expected (B, D)"
                )
            if dim is not None and f.shape[1] != dim:
                raise ValueError(f"extractor {extractor.name!r} returned D={f.shape[1]} after D={dim}")
            dim = f.shape[1]
            feats.append(f)
            bar.update(batch.shape[0])
    if not feats:
        raise ValueError("compute_features: no images")
    return np.concatenate(feats, axis=0)


# ----------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------
def _as_features(f, what: str) -> np.ndarray:
    a = f.detach().cpu().numpy() if isinstance(f, Tensor) else np.asarray(f)
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{what}: expected (N, D) features, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: features contain NaN or inf")
    return a


def feature_stats(features, what: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov(rowvar=False)``, N-1) of ``(N, D)`` features, as pytorch-fid.

    Raises for N < 2 (FID is undefined); warns when N <= D (the covariance, of rank <= N-1, is then
    singular and FID is strongly biased; FID papers use >= D images, 2048 for Inception).
    """
    f = _as_features(features, what)
    n, d = f.shape
    if n < 2:
        raise ValueError(f"{what}: FID needs at least 2 images to estimate a covariance, got {n}")
    if n <= d:
        warnings.warn(
            f"{what}: {n} samples for {d}-d features: the covariance (rank <= {n - 1}) is singular, so FID is "
            f"strongly biased and only comparable at equal N; use more than {d} images for a standard FID",
            stacklevel=2,
        )
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(d, d)


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write ``mu``/``sigma`` as an ``.npz`` with pytorch-fid's key names (``--save-stats`` format)."""
    np.savez_compressed(Path(path), mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an ``.npz`` with ``mu`` and ``sigma`` (pytorch-fid's stats files load too)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID stats file not found: {path}")
    with np.load(path) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"{path}: FID stats need 'mu' and 'sigma' arrays, found {sorted(z.files)}")
        return z["mu"].astype(np.float64), z["sigma"].astype(np.float64)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's LinAlgWarning/RuntimeWarning on near-singular input
        return scipy.linalg.sqrtm(a)


def fid_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (pytorch-fid's formula and fixes)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"fid: mean vectors differ in shape, {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"fid: covariances {sigma1.shape} / {sigma2.shape} do not match means of shape {mu1.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid: singular product of covariances; adding {eps} to their diagonals", stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("fid: sqrtm of the covariance product is not finite even with the eps offset")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = float(np.max(np.abs(covmean.imag)))
            raise ValueError(f"fid: sqrtm of the covariance product has a significant imaginary component ({m:.3g})")
        covmean = covmean.real
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    return float(value)


def fid_from_features_fast(features1, features2) -> float:
    """FID between two ``(N, D)`` feature sets by an exact shortcut, the same value as `fid_from_features` up to
    rounding and much faster on few images (evaluate's bootstrap resamples use it).

    With A_i the centred features over sqrt(N_i - 1), S_i = A_i^T A_i, and the nonzero eigenvalues of S1 S2 are the
    squared singular values of C = A1 A2^T, so tr sqrt(S1 S2) is C's nuclear norm (an N1 x N2 SVD instead of a D x D
    matrix square root). With more images than dimensions it is `fid_from_features`.
    """
    x1 = np.asarray(features1.detach().cpu() if hasattr(features1, "detach") else features1, np.float64)
    x2 = np.asarray(features2.detach().cpu() if hasattr(features2, "detach") else features2, np.float64)
    if x1.ndim != 2 or x2.ndim != 2 or x1.shape[1] != x2.shape[1] or min(len(x1), len(x2)) < 2:
        raise ValueError(f"fid: expected two (N >= 2, D) feature sets of one D, got {x1.shape} and {x2.shape}")
    mu1, mu2 = x1.mean(axis=0), x2.mean(axis=0)
    a1, a2 = (x1 - mu1) / np.sqrt(len(x1) - 1), (x2 - mu2) / np.sqrt(len(x2) - 1)
    if min(len(x1), len(x2)) >= x1.shape[1]:
        return fid_from_features(x1, x2)  # more images than dimensions: the SVD is no shortcut
    cross = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2 * cross)


def fid_from_features(features1, features2, eps: float = 1e-6) -> float:
    """FID between two ``(N, D)`` feature sets (numpy or torch)."""
    mu1, s1 = feature_stats(features1, "fid features1")
    mu2, s2 = feature_stats(features2, "fid features2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"fid: feature dimensions differ, {mu1.shape[0]} vs {mu2.shape[0]}")
    return fid_from_stats(mu1, s1, mu2, s2, eps=eps)


# ----------------------------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------------------------
def _poly_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (x @ y.T * gamma + coef0) ** degree


def _mmd2_unbiased(kxx: np.ndarray, kxy: np.ndarray, kyy: np.ndarray) -> float:
    # torch-fidelity mmd2(mmd_est="unbiased"): diagonals of K_XX/K_YY left out, K_XY kept whole.
    m = kxx.shape[0]
    sum_xx = kxx.sum() - np.trace(kxx)
    sum_yy = kyy.sum() - np.trace(kyy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * kxy.sum() / (m * m))


def kid_from_features(
    features1,
    features2,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std over subsets) between two ``(N, D)`` feature sets, as torch-fidelity.

    ``subset_size`` is clipped to ``min(N1, N2)``; at least 2 rows per set are needed.
    """
    f1 = _as_features(features1, "kid features1")
    f2 = _as_features(features2, "kid features2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"kid: feature dimensions differ, {f1.shape[1]} vs {f2.shape[1]}")
    if subsets < 1:
        raise ValueError(f"kid: subsets must be >= 1, got {subsets}")
    m = min(int(subset_size), f1.shape[0], f2.shape[0])
    if m < 2:
        raise ValueError(
            f"kid: needs at least 2 samples per set (got {f1.shape[0]} and {f2.shape[0]}, subset_size={subset_size})"
        )
    d = f1.shape[1]
    g = 1.0 / d if gamma is None else float(gamma)
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets, dtype=np.float64)
    for i in range(subsets):
        x = f1[rng.choice(f1.shape[0], m, replace=False)]
        y = f2[rng.choice(f2.shape[0], m, replace=False)]
        kxx = _poly_kernel(x, x, degree, g, coef0)
        kxy = _poly_kernel(x, y, degree, g, coef0)
        kyy = _poly_kernel(y, y, degree, g, coef0)
        mmds[i] = _mmd2_unbiased(kxx, kxy, kyy)
    return float(mmds.mean()), float(mmds.std())


# ----------------------------------------------------------------------------------------------
# Conveniences
# ----------------------------------------------------------------------------------------------
def fid(
    extractor: FeatureExtractor,
    images_a: Tensor | Iterable[Tensor],
    images_b: Tensor | Iterable[Tensor],
    batch_size: int = 50,
    progress: bool = False,
) -> float:
    """FID between two image sets under ``extractor`` (report it with ``extractor.name``)."""
    fa = compute_features(extractor, images_a, batch_size=batch_size, progress=progress)
    fb = compute_features(extractor, images_b, batch_size=batch_size, progress=progress)
    return fid_from_features(fa, fb)


def kid(
    extractor: FeatureExtractor,
    images_a: Tensor | Iterable[Tensor],
    images_b: Tensor | Iterable[Tensor],
    batch_size: int = 50,
    progress: bool = False,
    **kid_kwargs,
) -> tuple[float, float]:
    """KID (mean, std) between two image sets under ``extractor``; ``kid_kwargs`` go to ``kid_from_features``."""
    fa = compute_features(extractor, images_a, batch_size=batch_size, progress=progress)
    fb = compute_features(extractor, images_b, batch_size=batch_size, progress=progress)
    return kid_from_features(fa, fb, **kid_kwargs)
