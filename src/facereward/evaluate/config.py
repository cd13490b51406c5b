"""EvaluateConfig: every setting of `facereward evaluate`, and the sampler overrides it applies to each model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from facereward.measures import MeasuresConfig


@dataclass
class EvaluateConfig:
    """What `facereward evaluate` scores: the test set (or photos), the methods, the sampler, and the measures
    (names from the measures table with their options, the judges they share, and a weighted reward column)."""

    testset: str = ""
    photos: str = ""  # instead of a test set: whole photos (a file or folder), no GT; see facereward.evaluate.photos
    photo_detector: str = "cnn"  # photos: face detector cnn | hog | haar
    photo_crop_size: int = 512  # photos: the aligned face crops the no-reference measures score
    out_dir: str = "eval_out"
    models: dict[str, str] = field(default_factory=dict)  # name -> restorer folder
    images: dict[str, str] = field(default_factory=dict)  # name -> folder of outputs named like the LQ files
    include_lq: bool = True
    include_stage1: bool | list[str] = False  # also a "NAME (stage 1)" row: per model (true) or for the models named
    sample_steps: int = 50  # DDIM steps of each model's restorations
    eta: float | str | None = None  # None: each model's default (0 for the toy model, 1 for imported DiffBIR)
    spacing: str | None = None  # timestep spacing: leading | linspace | trailing; None: each model's
    final_alpha_bar: str | None = None  # one | first; None: each model's
    colour_fix: bool | None = None  # DiffBIR's wavelet colour fix; None: each model's
    seed: int = 0
    batch_size: int = 16
    device: str | None = None
    # the measures (facereward.measures; --list-metrics): names, or None for the default set, each where it applies
    measures: list[str] | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per measure, e.g. {"lpips": {"backbone_path": ...}}
    reward: MeasuresConfig = field(default_factory=lambda: MeasuresConfig(weights={}))  # a weighted reward column, as lrpo's rewards
    crop_border: int = 0  # pixels cropped at each border by psnr, ssim and niqe (BasicSR's crop_border), unless their options say
    identity: str = "auto"  # the identity judge of ids, deg and fid: auto | toy | dlib | arcface:PATH.onnx | none
    landmarks: str = "auto"  # the landmark judge of lmd: auto | toy | dlib | none
    fid: str = "auto"  # FID/KID features: auto (the identity judge's features) | identity | inception:PATH | none
    fid_reference: str | None = None  # HQ folder for FID/KID; default: the test set's hq/
    imports: list[str] = field(default_factory=list)  # plugin modules or .py files imported first (register_measure)
    # uncertainty and slices (docs/methods.md 3.1)
    ci: bool = False  # a percentile-bootstrap interval over images for every cell
    ci_level: float = 0.95
    bootstrap: int = 1000  # resamples for per-image columns (and comparisons, slices)
    set_bootstrap: int = 100  # resamples for FID/KID (each recomputes the set measure)
    compare: list[list[str]] = field(default_factory=list)  # [A, B] pairs: paired bootstrap and Wilcoxon per column
    slice_by: list[str] = field(default_factory=list)  # attributes to slice by (toy traits, or the attributes CSV's)
    attributes: str = ""  # attributes CSV (name,attr=value,...) for slice_by on real test sets
    min_slice: int = 2  # smallest group that can be named the worst
    check_published: str = ""  # a published table (JSON) to compare the run with, within its tolerances
    grid_rows: int = 8
    save_outputs: bool = True
    progress: bool = True


def sampler_options(config: EvaluateConfig):
    """The evaluation's overrides of each model's sampling defaults (a `SamplerOptions`)."""
    from facereward.models.restorer import SamplerOptions

    return SamplerOptions(spacing=config.spacing, final_alpha_bar=config.final_alpha_bar, colour_fix=config.colour_fix)


__all__ = ["EvaluateConfig", "sampler_options"]
