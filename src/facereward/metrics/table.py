"""The metric table (like pyiqa's DEFAULT_CONFIGS): name -> factory, type, lower-is-better, what it needs (docs/methods.md 3).

`facereward evaluate --metrics a,b,c` picks from it, `--list-metrics` prints it, and `register_metric` adds your own:

    from facereward.metrics.table import register_metric

    def laplacian_energy(images, gt=None, captions=None):          # (B, 3, H, W) in [0, 1] -> (B,)
        k = torch.tensor([[0., 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
        return torch.nn.functional.conv2d(images, k.to(images), groups=3).pow(2).mean(dim=(1, 2, 3))

    register_metric("sharpness", lambda ctx: laplacian_energy, kind="NR", lower_better=False)

A factory takes the `MetricContext` (the evaluate config, the device, the shared judges) and returns a per-image
metric `fn(images, gt, captions) -> (B,)` (the reward protocol's call, so a differentiable reward can be a metric
as it is), a `PerImageMetric` to name its column, a `SetMetric` (scores of a whole set against a reference, as
FID), or None when what it needs was not given (then the default set skips it and `--metrics NAME` is an error
naming `needs`). Types: "FR" full-reference (needs the GT), "NR" no-reference, "set" a distribution against a
reference set. Columns carry their judge, e.g. "IDS (dlib-resnet128)".
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from facereward.registry import Registry

Kind = Literal["FR", "NR", "set"]
KINDS = ("FR", "NR", "set")

# what `evaluate` computes when no --metrics is given, in column order; each only when what it needs is there
DEFAULT_METRICS: tuple[str, ...] = ("psnr", "ssim", "psnr-y", "ssim-y", "lpips", "ids", "deg", "lmd", "toy-quality", "frm",
                                    "reward", "clipiqa", "niqe", "fid", "kid")


@dataclass(frozen=True)
class MetricSpec:
    """One row of the table. `needs`: the weights/judges it uses and the option that gives them ("" if none);
    `reward`: the reward (facereward.rewards) built on the same implementation, if any."""

    name: str
    factory: Callable[[MetricContext], Any]
    kind: Kind
    lower_better: bool
    needs: str = ""
    description: str = ""
    reward: str = ""


@dataclass
class PerImageMetric:
    """A built per-image metric: its column header (with its judge) and `fn(images, gt, captions) -> (B,)`."""

    column: str
    fn: Callable[..., Tensor]

    def __call__(self, images: Tensor, gt: Tensor | None = None, captions: Any = None) -> Tensor:
        return self.fn(images, gt, captions)


@dataclass
class SetMetric:
    """A built set metric: its column, a feature extractor (`.name`, `.features(images)`; metrics on the same
    extractor share its features) and `compute(features (N, D), reference (M, D)) -> float`."""

    column: str
    extractor: Any
    compute: Callable[[np.ndarray, np.ndarray], float]


_REGISTRY: Registry[MetricSpec] = Registry(
    "metric", hint="see `facereward evaluate --list-metrics`; register your own with facereward.metrics.table.register_metric"
)


def register_metric(name: str, factory: Callable[[MetricContext], Any], kind: Kind = "NR", lower_better: bool = False,
                    needs: str = "", description: str = "", reward: str = "", overwrite: bool = False) -> None:
    """Add `name` to the table: `factory(ctx)` -> a metric fn, PerImageMetric, SetMetric, or None (needs not given)."""
    if kind not in KINDS:
        raise ValueError(f"metric {name!r}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not callable(factory):
        raise TypeError(f"metric {name!r}: factory must be callable, got {type(factory).__name__}")
    if not name or "," in name:
        raise ValueError(f"metric name must be non-empty and without commas, got {name!r}")
    _REGISTRY.register(name, MetricSpec(name, factory, kind, bool(lower_better), needs, description, reward), overwrite)


def unregister_metric(name: str) -> None:
    """Remove `name` from the table (for tests and interactive sessions)."""
    _REGISTRY.unregister(name)


def get_metric(name: str) -> MetricSpec:
    """The table row of `name`; ValueError listing the known names otherwise."""
    return _REGISTRY.get(name)


def list_metrics() -> list[MetricSpec]:
    """Every row: the defaults in their column order, then the rest by name."""
    names = [n for n in DEFAULT_METRICS if n in _REGISTRY] + [n for n in _REGISTRY.names() if n not in DEFAULT_METRICS]
    return [_REGISTRY.get(n) for n in names]


def format_metric_table(specs: Sequence[MetricSpec] | None = None) -> str:
    """The table as markdown: name, type, lower is better, needs, reward (what `--list-metrics` prints)."""
    lines = ["| name | type | lower is better | needs | reward |", "|---|---|---|---|---|"]
    for s in specs if specs is not None else list_metrics():
        lines.append(f"| {s.name} | {s.kind} | {'yes' if s.lower_better else 'no'} | {s.needs or '-'} | {s.reward or '-'} |")
    return "\n".join(lines)


def parse_metric_names(text: str | Sequence[str]) -> list[str]:
    """"psnr, ssim" or ["psnr", "ssim"] -> ["psnr", "ssim"]; unknown names and repeats are one-line errors."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n and n.strip()]
    if not names:
        raise ValueError("metrics: no metric names given (see --list-metrics)")
    for n in names:
        get_metric(n)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"metrics: {repeated[0]!r} is given twice")
    return names


# ---------------------------------------------------------------------------------------------------- judges


def identity_judge(spec: str, toy: bool):
    """The identity embedder a spec names: auto (toy judge on toy sets, else dlib), toy, dlib, arcface:PATH, or none."""
    from facereward.metrics.identity import get_identity_embedder

    if spec == "none":
        return None
    if spec == "auto":
        spec = "toy" if toy else "dlib"
    if spec.startswith("arcface:"):
        return get_identity_embedder("arcface", path=spec.split(":", 1)[1])
    return get_identity_embedder(spec)


def landmark_judge(spec: str, toy: bool):
    """The landmark detector a spec names: auto (toy on toy sets, else dlib), toy, dlib, or none."""
    from facereward.metrics.landmarks import get_landmark_detector

    if spec == "none":
        return None
    return get_landmark_detector("toy" if spec == "auto" and toy else ("dlib" if spec == "auto" else spec))


def fid_extractor(spec: str, identity):
    """FID/KID features: auto/identity (the identity judge's embeddings), inception:PATH (pytorch-fid), or none."""
    from facereward.metrics.fid import CallableFeatures, InceptionV3Features

    if spec == "none":
        return None
    if spec in ("auto", "identity"):
        if identity is None:
            if spec == "identity":
                raise ValueError("fid=identity needs an identity judge (identity is 'none')")
            return None
        return CallableFeatures(identity.name, identity.embed)
    if spec.startswith("inception:"):
        return InceptionV3Features(spec.split(":", 1)[1])
    raise ValueError(f"fid must be auto, identity, inception:PATH or none, got {spec!r}")


_UNSET = object()


class MetricContext:
    """What factories build from: `config` (an EvaluateConfig or any object with its fields), `device`, `has_gt`,
    `toy` (a toy-world test set), the judges (built once and shared), a per-batch memo, and `judges` (name -> what
    was used, written to results.json)."""

    def __init__(self, config: Any, device: torch.device | str = "cpu", has_gt: bool = True, toy: bool = False):
        self.config = config
        self.device = torch.device(device)
        self.has_gt = has_gt
        self.toy = toy
        self.judges: dict[str, str] = {}
        self._judges: dict[str, Any] = {}
        self._memo: dict[tuple, tuple[Tensor, Any]] = {}

    def get(self, field: str, default: Any = None) -> Any:
        """A config field (None when the config has no such field)."""
        return getattr(self.config, field, default)

    def options(self, metric: str) -> dict[str, Any]:
        """`metric_options[metric]` of the config (e.g. {"niqe": {"block_size": 64}}), {} if none."""
        options = (self.get("metric_options") or {}).get(metric) or {}
        if not isinstance(options, dict):
            raise ValueError(f"metric_options.{metric}: expected a mapping, got {options!r}")
        return dict(options)

    def _judge(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._judges:
            self._judges[key] = build()
        return self._judges[key]

    def identity(self):
        """The identity judge of `config.identity` (None for "none")."""
        return self._judge("identity", lambda: identity_judge(self.get("identity", "auto"), self.toy))

    def landmarks(self):
        """The landmark judge of `config.landmarks` (None for "none")."""
        return self._judge("landmarks", lambda: landmark_judge(self.get("landmarks", "auto"), self.toy))

    def fid_features(self):
        """The FID/KID feature extractor of `config.fid` (None for "none", or "auto" without an identity judge)."""
        return self._judge("fid", lambda: fid_extractor(self.get("fid", "auto"), self.identity()))

    def memo(self, key: Any, images: Tensor, fn: Callable[[Tensor], Any]) -> Any:
        """`fn(images)`, computed once per images tensor until `new_batch` (e.g. GT embeddings shared by IDS and Deg)."""
        slot = (key, id(images))
        if slot not in self._memo:
            self._memo[slot] = (images, fn(images))  # holding the tensor keeps its id unique
        return self._memo[slot][1]

    def new_batch(self) -> None:
        self._memo.clear()


def build_metrics(names: Sequence[str] | None, ctx: MetricContext) -> list[tuple[MetricSpec, PerImageMetric | SetMetric]]:
    """Build the named metrics (None: DEFAULT_METRICS, each only where it applies) for `ctx`.

    Asked for by name, a full-reference metric without GT, a set metric without a reference set, or one whose
    needs were not given, is a ValueError.
    """
    explicit = names is not None
    if explicit:
        names = parse_metric_names(names)
    built = []
    for name in (names if explicit else [n for n in DEFAULT_METRICS if n in _REGISTRY]):
        spec = get_metric(name)
        if spec.kind == "FR" and not ctx.has_gt:
            if explicit:
                raise ValueError(f"metric {name!r} is full-reference and the test set has no hq/ folder")
            continue
        if spec.kind == "set" and not ctx.has_gt and not ctx.get("fid_reference"):
            if explicit:
                raise ValueError(f"metric {name!r} needs a reference set: the test set has no hq/ folder (give --fid-reference DIR)")
            continue
        metric = spec.factory(ctx)
        if metric is None:
            if explicit:
                raise ValueError(f"metric {name!r} needs {spec.needs or 'something that was not given'}")
            continue
        if not isinstance(metric, (PerImageMetric, SetMetric)):
            if not callable(metric):
                raise TypeError(f"metric {name!r}: its factory returned a {type(metric).__name__}, which is not callable")
            metric = PerImageMetric(name, metric)
        built.append((spec, metric))
    return built


# ---------------------------------------------------------------------------------------------------- built-ins


def _psnr(y_channel: bool):
    def factory(ctx: MetricContext):
        from facereward.metrics.fullref import psnr

        c = ctx.get("crop_border", 0) or 0
        return PerImageMetric("PSNR-Y" if y_channel else "PSNR", lambda x, gt, _: psnr(x, gt, crop_border=c, y_channel=y_channel))
    return factory


def _ssim(y_channel: bool):
    def factory(ctx: MetricContext):
        from facereward.metrics.fullref import ssim

        c = ctx.get("crop_border", 0) or 0
        return PerImageMetric("SSIM-Y" if y_channel else "SSIM", lambda x, gt, _: ssim(x, gt, crop_border=c, y_channel=y_channel))
    return factory


def _lpips(ctx: MetricContext):
    backbone, heads, net = ctx.get("lpips_backbone"), ctx.get("lpips_heads"), ctx.get("lpips_net") or "vgg"
    if bool(backbone) != bool(heads):
        raise ValueError("LPIPS needs both lpips_backbone and lpips_heads")
    if not backbone:
        return None
    from facereward.metrics.lpips import LPIPS

    model = LPIPS(net, backbone, heads).to(ctx.device)
    ctx.judges["lpips"] = f"lpips-{net}"
    return PerImageMetric(f"lpips-{net}", lambda x, gt, _: model(x, gt))


def _identity_metric(column: str):
    def factory(ctx: MetricContext):
        from facereward.metrics.identity import identity_degrees, identity_similarity

        judge = ctx.identity()
        if judge is None:
            return None
        ctx.judges["identity"] = judge.name
        score = identity_similarity if column == "IDS" else identity_degrees

        def fn(x, gt, _):
            return score(ctx.memo(("identity",), x, judge.embed), ctx.memo(("identity",), gt, judge.embed))
        return PerImageMetric(f"{column} ({judge.name})", fn)
    return factory


def _lmd(ctx: MetricContext):
    from facereward.metrics.landmarks import landmark_distance

    judge = ctx.landmarks()
    if judge is None:
        return None
    ctx.judges["landmarks"] = judge.name
    return PerImageMetric(f"LMD ({judge.name})",
                          lambda x, gt, _: landmark_distance(judge.detect(x), ctx.memo(("landmarks",), gt, judge.detect)))


def _toy_quality(ctx: MetricContext):
    if not ctx.toy:
        return None
    from facereward.labelling.oracle import toy_quality

    ctx.judges["toy-quality"] = "toy oracle (toy-id, toy-lmk)"
    return PerImageMetric("oracle (toy)", lambda x, gt, _: toy_quality(x, gt).to(torch.float32))


def _frm(ctx: MetricContext):
    path = ctx.get("frm")
    if not path:
        return None
    from facereward.models.frm import FaceRewardModel

    model = FaceRewardModel.from_pretrained(path).to(ctx.device)
    ctx.judges["frm"] = str(path)
    return PerImageMetric(f"FRM ({Path(path).name})", lambda x, gt, captions: model.score(x, captions))


def _reward(ctx: MetricContext):
    weights = ctx.get("reward_weights") or {}
    if not weights:
        return None
    from facereward.rewards import CompositeReward, RewardsConfig

    composite = CompositeReward.from_config(RewardsConfig(weights=dict(weights), options=dict(ctx.get("reward_options") or {}),
                                                          imports=list(ctx.get("imports") or [])), ctx.device)
    ctx.judges["reward"] = " + ".join(f"{w:g} {name}" for name, w in composite.weights.items())
    return PerImageMetric("reward (composite)", lambda x, gt, captions: composite(x, gt, captions).total)


def _clipiqa(ctx: MetricContext):
    path = ctx.get("clipiqa")
    if not path:
        return None
    from facereward.metrics.clipiqa import CLIPIQA

    model = CLIPIQA.from_pretrained(path, option="--clipiqa PATH",
                                    tokenizer_hint="put the CLIP tokenizer files beside the checkpoint").to(ctx.device)
    ctx.judges["clipiqa"] = str(path)
    return PerImageMetric(f"CLIPIQA ({Path(path).name})", lambda x, gt, _: model(x))


def _niqe(ctx: MetricContext):
    path = ctx.get("niqe_model")
    if not path:
        return None
    from facereward.metrics.niqe import NIQE

    options = ctx.options("niqe")
    options.setdefault("crop_border", ctx.get("crop_border", 0) or 0)
    try:
        model = NIQE(path, **options)
    except TypeError as err:
        raise ValueError(f"metric_options.niqe: bad options {sorted(options)} ({err})") from None
    ctx.judges["niqe"] = str(path)
    return PerImageMetric(f"NIQE ({Path(path).stem})", lambda x, gt, _: model(x))


def _fid(ctx: MetricContext):
    from facereward.metrics.fid import fid_from_features

    extractor = ctx.fid_features()
    if extractor is None:
        return None
    ctx.judges["fid_features"] = extractor.name
    warned = []

    def compute(features: np.ndarray, reference: np.ndarray) -> float:
        if not warned and min(len(features), len(reference)) <= reference.shape[1]:
            warnings.warn(f"FID from {len(features)} vs {len(reference)} images of {reference.shape[1]}-d features "
                          f"({extractor.name}): the covariances are singular, so FID is biased and only comparable at equal N",
                          stacklevel=2)
        warned.append(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the small-N warning is given once above
            return float(fid_from_features(features, reference))
    return SetMetric(f"FID ({extractor.name})", extractor, compute)


def _kid(ctx: MetricContext):
    from facereward.metrics.fid import kid_from_features

    extractor = ctx.fid_features()
    if extractor is None:
        return None
    ctx.judges["fid_features"] = extractor.name
    subsets, subset_size, seed = ctx.get("kid_subsets", 100), ctx.get("kid_subset_size", 1000), ctx.get("seed", 0)
    return SetMetric(f"KID ({extractor.name})", extractor,
                     lambda f, ref: float(kid_from_features(f, ref, subsets=subsets, subset_size=subset_size, seed=seed)[0]))


_IDENTITY_NEEDS = "an identity judge (--identity auto, toy, dlib or arcface:FILE.onnx)"
_FID_NEEDS = "features (--fid auto, identity or inception:FILE) and a reference set (hq/ or --fid-reference DIR)"

for _row in (
    ("psnr", _psnr(False), "FR", False, "", "PSNR in dB, RGB, BasicSR (--crop-border)", "psnr"),
    ("ssim", _ssim(False), "FR", False, "", "SSIM, RGB, BasicSR (--crop-border)", "ssim"),
    ("psnr-y", _psnr(True), "FR", False, "", "PSNR on the Y channel, BasicSR", ""),
    ("ssim-y", _ssim(True), "FR", False, "", "SSIM on the Y channel, BasicSR", ""),
    ("lpips", _lpips, "FR", True, "--lpips-backbone FILE and --lpips-heads FILE (--lpips-net vgg or alex)", "LPIPS", "lpips"),
    ("ids", _identity_metric("IDS"), "FR", False, _IDENTITY_NEEDS, "identity cosine similarity to the GT", "identity"),
    ("deg", _identity_metric("Deg"), "FR", True, _IDENTITY_NEEDS, "identity angle to the GT in degrees", ""),
    ("lmd", _lmd, "FR", True, "a landmark judge (--landmarks auto, toy or dlib)", "mean landmark distance to the GT in px", ""),
    ("toy-quality", _toy_quality, "FR", False, "a toy-world test set (toyworld.json beside lq/ and hq/)",
     "the toy world's hidden quality (labelling.oracle.toy_quality): its stand-in for a person", ""),
    ("frm", _frm, "NR", False, "--frm DIR (a Face Reward Model folder)", "Face Reward Model score", "frm"),
    ("reward", _reward, "FR", False, "--reward NAME=WEIGHT (reward_weights; options in reward_options, as lrpo's rewards)",
     "the weighted composite reward (docs/methods.md 2.2), e.g. LRPO's", ""),
    ("clipiqa", _clipiqa, "NR", False, "--clipiqa PATH (a local CLIP folder or OpenCLIP checkpoint)", "CLIPIQA in [0, 1]",
     "clipiqa"),
    ("niqe", _niqe, "NR", True, "--niqe-model FILE (the MATLAB release's modelparameters.mat, or `facereward fit-niqe`)",
     "NIQE (MATLAB release)", ""),
    ("fid", _fid, "set", True, _FID_NEEDS, "Frechet distance of the features to the reference set's", ""),
    ("kid", _kid, "set", True, _FID_NEEDS, "kernel inception distance (unbiased MMD^2, polynomial kernel)", ""),
):
    register_metric(*_row[:4], needs=_row[4], description=_row[5], reward=_row[6], overwrite=True)
del _row

__all__ = [
    "DEFAULT_METRICS",
    "MetricContext",
    "MetricSpec",
    "PerImageMetric",
    "SetMetric",
    "build_metrics",
    "fid_extractor",
    "format_metric_table",
    "get_metric",
    "identity_judge",
    "landmark_judge",
    "list_metrics",
    "parse_metric_names",
    "register_metric",
    "unregister_metric",
]
