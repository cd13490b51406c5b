"""`facereward evaluate`: the BFR benchmark table (docs/methods.md section 3) for several methods side by side.

Methods are restorers run on the test set's LQ images (`models`), folders of existing outputs matched
by name (`images`), and the LQ input itself. The columns come from the metric table
(`facereward.metrics.table`; `metrics` picks from it). By default, with GT: PSNR/SSIM (RGB and Y), LPIPS (when
its weights are given), identity (IDS, Deg), landmark distance (LMD) and FID/KID against the GT set. Without GT:
FID/KID against a reference folder only. The FRM score, CLIPIQA and NIQE (docs/methods.md 3), when given, need
no GT. Judges are named in the column headers.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from facereward.data.datasets import PairedFolderDataset, collate_batch
from facereward.data.imageio import image_grid, list_images, read_image, write_image
from facereward.data.toyfaces import TOY_MARKER, is_toy_folder
from facereward.metrics.table import MetricContext, PerImageMetric, SetMetric, build_metrics, fid_extractor, landmark_judge
from facereward.metrics.table import identity_judge as identity_judge  # re-exported: facereward.train.heldout uses it


def sampler_options(config: "EvaluateConfig"):
    """The evaluation's overrides of each model's sampling defaults (a `SamplerOptions`)."""
    from facereward.models.restorer import SamplerOptions

    return SamplerOptions(spacing=config.spacing, final_alpha_bar=config.final_alpha_bar, colour_fix=config.colour_fix)


@dataclass
class EvaluateConfig:
    testset: str = ""
    photos: str = ""  # instead of a test set: whole photos (a file or folder), no GT; see facereward.evaluate_photos
    photo_detector: str = "cnn"  # photos: face detector cnn | hog | haar
    photo_crop_size: int = 512  # photos: the aligned face crops the no-reference metrics score
    out_dir: str = "eval_out"
    models: dict[str, str] = field(default_factory=dict)  # name -> restorer folder
    images: dict[str, str] = field(default_factory=dict)  # name -> folder of outputs named like the LQ files
    include_lq: bool = True
    include_stage1: bool | list[str] = False  # also a "NAME (stage 1)" row: per model (true) or for the models named
    steps: int = 50
    eta: float | None = None  # None: each model's default (0 for the toy model, 1 for imported DiffBIR)
    spacing: str | None = None  # timestep spacing: leading | linspace | trailing; None: each model's
    final_alpha_bar: str | None = None  # one | first; None: each model's
    colour_fix: bool | None = None  # DiffBIR's wavelet colour fix; None: each model's
    seed: int = 0
    batch_size: int = 16
    device: str | None = None
    crop_border: int = 0
    lpips_net: str = "vgg"
    lpips_backbone: str | None = None  # LPIPS runs only when both weight files are given
    lpips_heads: str | None = None
    identity: str = "auto"  # auto | toy | dlib | arcface:PATH.onnx | none
    landmarks: str = "auto"  # auto | toy | dlib | none
    fid: str = "auto"  # auto (the identity embedder's features) | identity | inception:PATH | none
    fid_reference: str | None = None  # HQ folder for FID/KID; default: the test set's hq/
    frm: str | None = None  # a Face Reward Model folder: adds its score (no reference needed)
    clipiqa: str | None = None  # a local CLIP folder (or OpenCLIP checkpoint): adds CLIPIQA (no reference needed)
    reward_weights: dict[str, float] = field(default_factory=dict)  # a composite reward column, e.g. {"frm": 0.3, "wavelet": 0.3}
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per reward, as lrpo's rewards.options
    niqe_model: str | None = None  # a NIQE pristine model (modelparameters.mat, or `facereward fit-niqe`): adds NIQE
    metrics: list[str] | None = None  # names from the metric table (--list-metrics); None: the default set, each where it applies
    metric_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per metric, e.g. {"niqe": {"block_size": 64}}
    imports: list[str] = field(default_factory=list)  # modules or .py files that register metrics (register_metric)
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    grid_rows: int = 8
    save_outputs: bool = True
    progress: bool = True


@dataclass
class EvaluateResult:
    rows: dict[str, dict[str, float]]
    per_image: dict[str, dict[str, list[float]]]
    table: str
    out_dir: Path
    judges: dict[str, str]


def format_value(v: float | None) -> str:
    """A table cell: 4 decimals up to 1, else 2 (PSNR of identical images is inf); None and NaN as "-"."""
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.4f}" if abs(v) <= 1 else f"{v:.2f}"


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """{row: {column: value}} as a markdown table; 4 decimals up to 1, else 2; NaN as "-"."""
    columns = list(dict.fromkeys(c for values in rows.values() for c in values))
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(format_value(values.get(c)) for c in columns) + " |")
    return "\n".join(lines)


_landmark_judge = landmark_judge  # the judge helpers live in facereward.metrics.table (shared with the metric table)
_fid_extractor = fid_extractor


class _OutputFolder:
    """Existing outputs in a folder, looked up by the LQ file's stem."""

    def __init__(self, name: str, folder: str, names: list[str], size: tuple[int, int]):
        self.folder = Path(folder)
        by_stem = {p.stem: p for p in list_images(self.folder)}
        missing = [n for n in names if n not in by_stem]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise FileNotFoundError(f"{self.folder}: {len(missing)} outputs for '{name}' are missing ({shown})")
        self.paths = by_stem
        self.size = size

    def batch(self, names: list[str]) -> torch.Tensor:
        images = [read_image(self.paths[n], size=self.size) for n in names]
        return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())


def evaluate(config: EvaluateConfig) -> EvaluateResult:
    """Run every method over the test set, write OUT/results.{md,csv,json} and OUT/grid.png."""
    from facereward.inference import restore_batch
    from facereward.models.restorer import Restorer

    if config.photos:
        from facereward.evaluate_photos import evaluate_photos

        return evaluate_photos(config)
    testset = Path(config.testset)
    out_dir = Path(config.out_dir)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = PairedFolderDataset(testset)
    has_gt = dataset.has_hq
    names = [p.stem for p in dataset.lq_files]
    first = dataset[0]["lq"]
    size = (first.shape[1], first.shape[2])
    toy = is_toy_folder(testset)  # toyworld.json beside lq/ and hq/: the toy judges

    # the methods: name -> fn(batch, indices) -> outputs in [0, 1]
    methods: dict[str, Callable[[dict[str, Any], list[int]], torch.Tensor]] = {}
    if config.include_lq:
        methods["LQ"] = lambda batch, idx: batch["lq"]
    restorers: dict[str, Restorer] = {}
    for name, folder in config.models.items():
        restorers[name] = Restorer.from_pretrained(folder).to(device)
        if restorers[name].config.size != size[0]:
            raise ValueError(f"{folder}: model size {restorers[name].config.size} differs from the test set's {size[0]} px")
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def run_model(name: str, stage: str):
        def fn(batch: dict[str, Any], idx: list[int]) -> torch.Tensor:
            key = f"{name}:{idx[0]}"
            if key not in cache:
                cache.clear()
                out = restore_batch(restorers[name], batch["lq"].to(device), idx, steps=config.steps, eta=config.eta,
                                    seed=config.seed, sampler=sampler_options(config))
                cache[key] = {k: v.cpu() for k, v in out.items()}
            return cache[key][stage]
        return fn

    stage1 = config.include_stage1
    if isinstance(stage1, list) and (unknown := sorted(set(stage1) - set(config.models))):
        raise ValueError(f"include_stage1: {unknown[0]!r} is not one of the models ({', '.join(config.models)})")
    for name in config.models:
        if stage1 is True or (isinstance(stage1, list) and name in stage1):
            methods[f"{name} (stage 1)"] = run_model(name, "clean")
        methods[name] = run_model(name, "restored")
    for name, folder in config.images.items():
        source = _OutputFolder(name, folder, names, size)
        methods[name] = lambda batch, idx, s=source: s.batch(batch["name"])
    if not methods:
        raise ValueError("nothing to evaluate: give --model NAME=DIR or --images NAME=DIR (or keep the LQ row)")

    if config.imports:
        from facereward.plugins import import_plugins

        import_plugins(config.imports, option="imports")  # their register_metric calls
    ctx = MetricContext(config, device, has_gt=has_gt, toy=toy)
    built = build_metrics(config.metrics, ctx)
    _warn_dlib_on_small_faces(config, ctx.judges, size)
    per_image_metrics = [m for _, m in built if isinstance(m, PerImageMetric)]
    set_metrics = [m for _, m in built if isinstance(m, SetMetric)]
    extractors = list({id(m.extractor): m.extractor for m in set_metrics}.values())  # FID and KID share features
    judges = {"identity": "none", "landmarks": "none", "fid_features": "none", "lpips": "none", "frm": "none",
              "clipiqa": "none", **ctx.judges}

    per_image: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in methods}
    features: dict[int, dict[str, list[torch.Tensor]]] = {id(e): {m: [] for m in methods} for e in extractors}
    reference_features: dict[int, list[torch.Tensor]] = {id(e): [] for e in extractors}
    grid_images: dict[str, list[np.ndarray]] = defaultdict(list)
    loader = DataLoader(dataset, batch_size=config.batch_size, collate_fn=collate_batch)
    bar = tqdm(total=len(dataset) * len(methods), desc="evaluate", disable=not config.progress, dynamic_ncols=True)
    start = 0
    for batch in loader:
        n = batch["lq"].shape[0]
        idx = list(range(start, start + n))
        gt = batch["hq"].to(device) if has_gt else None
        ctx.new_batch()
        if has_gt and config.fid_reference is None:
            for e in extractors:
                reference_features[id(e)].append(torch.as_tensor(e.features(gt)).double().cpu())
        for method, fn in methods.items():
            out = fn(batch, idx).to(device).clamp(0, 1)
            scores = per_image[method]
            with torch.no_grad():
                for metric in per_image_metrics:
                    scores[metric.column] += torch.as_tensor(metric(out, gt, batch.get("caption"))).reshape(-1).tolist()
                for e in extractors:
                    features[id(e)][method].append(torch.as_tensor(e.features(out)).double().cpu())
            if config.save_outputs and method != "LQ" and method not in config.images:
                for j, name in enumerate(batch["name"]):
                    write_image(out_dir / "outputs" / _slug(method) / f"{name}.png", out[j].permute(1, 2, 0).cpu().numpy())
            if len(grid_images[method]) < config.grid_rows:
                take = config.grid_rows - len(grid_images[method])
                grid_images[method] += [img.permute(1, 2, 0).cpu().numpy() for img in out[:take]]
            bar.update(n)
        if has_gt and len(grid_images["GT"]) < config.grid_rows:
            grid_images["GT"] += [img.permute(1, 2, 0).cpu().numpy() for img in gt[: config.grid_rows - len(grid_images["GT"])]]
        start += n
    bar.close()

    rows: dict[str, dict[str, float]] = {m: {k: float(np.mean(v)) for k, v in per_image[m].items()} for m in methods}
    for e in extractors:
        ref = _reference_features(config, e, reference_features[id(e)])
        for metric in (m for m in set_metrics if m.extractor is e and ref is not None):
            for method in methods:
                rows[method][metric.column] = metric.compute(torch.cat(features[id(e)][method]).numpy(), ref)
    table = markdown_table(rows)
    sampling = {name: {"eta": r.config.eta if config.eta is None else config.eta, **sampler_options(config).resolved(r)}
                for name, r in restorers.items()}
    _write_outputs(config, out_dir, rows, per_image, judges, table, grid_images, names, len(dataset), sampling)
    return EvaluateResult(rows=rows, per_image={m: dict(v) for m, v in per_image.items()}, table=table, out_dir=out_dir, judges=judges)


DLIB_MIN_FACE = 128  # px; dlib's judges are trained on faces about 150 px wide: on smaller ones they misfire


def _warn_dlib_on_small_faces(config: EvaluateConfig, judges: dict[str, str], size: tuple[int, int]) -> None:
    """Warn (one line) when `auto` resolved to a dlib judge on a test set of at most DLIB_MIN_FACE px images."""
    auto_dlib = [judges[k] for k in ("identity", "landmarks")
                 if getattr(config, k) == "auto" and judges.get(k, "").startswith("dlib")]
    if auto_dlib and max(size) <= DLIB_MIN_FACE:
        warnings.warn(f"{' and '.join(auto_dlib)} on {size[1]}x{size[0]} px faces are unreliable; for toy faces pass "
                      f"--identity toy --landmarks toy, or put {TOY_MARKER} beside lq/ and hq/ (facereward degrade "
                      f"copies it from a toyfaces folder)", stacklevel=3)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("_")


def _reference_features(config: EvaluateConfig, extractor, from_gt: list[torch.Tensor]) -> np.ndarray | None:
    """The set metrics' reference features: `fid_reference`'s images, else the GT's; None when fewer than 2."""
    if config.fid_reference is not None:
        ref_files = list_images(config.fid_reference)
        if len(ref_files) < 2:
            raise ValueError(f"{config.fid_reference}: FID needs at least 2 reference images")
        for start in range(0, len(ref_files), config.batch_size):
            chunk = [read_image(p) for p in ref_files[start : start + config.batch_size]]
            from_gt.append(torch.as_tensor(extractor.features(torch.from_numpy(np.stack(chunk).transpose(0, 3, 1, 2).copy()))).double())
    if not from_gt:
        return None
    ref = torch.cat(from_gt).numpy()
    return ref if len(ref) >= 2 else None


def _write_outputs(config, out_dir: Path, rows, per_image, judges, table: str, grid_images, names, n_images: int,
                   sampling: dict[str, dict] | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    sampling = sampling or {}
    how = "; ".join(f"{m}: eta {s['eta']}, {s['spacing']} spacing, final alpha-bar {s['final_alpha_bar']}"
                    + (", colour fix" if s["colour_fix"] else "") for m, s in sampling.items())
    header = (f"{n_images} images from {config.testset}; {config.steps} DDIM steps, seed {config.seed}"
              + (f" ({how})" if how else "") + "; judges: " + ", ".join(f"{k} = {v}" for k, v in judges.items()) + "\n\n")
    (out_dir / "results.md").write_text(header + table + "\n")
    columns = list(dict.fromkeys(c for values in rows.values() for c in values))
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", *columns])
        for method, values in rows.items():
            writer.writerow([method, *[values.get(c, "") for c in columns]])
    payload = {"config": asdict(config), "judges": judges, "sampling": sampling, "rows": rows, "names": names,
               "per_image": {m: dict(v) for m, v in per_image.items()}}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1, default=float))
    grid = evaluation_grid(grid_images)
    if grid is not None:
        write_image(out_dir / "grid.png", grid)


def evaluation_grid(grid_images: dict[str, list[np.ndarray]]) -> np.ndarray | None:
    """evaluate's grid.png: a titled column per method (LQ first, GT last), a row per image, 2x for <= 64 px; None if empty."""
    order = ["LQ"] + [m for m in grid_images if m not in ("LQ", "GT")] + ["GT"]
    order = [m for m in order if m in grid_images]
    n_rows = min(len(v) for v in grid_images.values()) if grid_images else 0
    if not n_rows:
        return None
    return image_grid([[grid_images[m][r] for m in order] for r in range(n_rows)], column_titles=order,
                      scale=2 if grid_images[order[0]][0].shape[0] <= 64 else 1)


def redraw_grid(out_dir: str | Path, testset: str | Path | None = None) -> Path:
    """Draw OUT/grid.png of a finished evaluate run again from its files, restoring nothing; returns its path.

    Reads OUT/results.json (methods, image names, config), the test set's lq/ and hq/ (`testset`, default the
    one results.json names), OUT/outputs/METHOD/ for restorer rows (so the run must have kept save_outputs) and
    the `images` folders. The same images and columns as the run's grid, drawn by the current `image_grid`.
    """
    out_dir = Path(out_dir)
    payload = json.loads((out_dir / "results.json").read_text())
    config = payload["config"]
    testset = Path(testset or config["testset"])
    names = payload["names"][: config["grid_rows"]]
    folders = {m: testset / "lq" if m == "LQ" else Path(config["images"].get(m) or out_dir / "outputs" / _slug(m))
               for m in payload["rows"]}
    if (testset / "hq").is_dir():
        folders["GT"] = testset / "hq"
    size = read_image(list_images(testset / "lq")[0]).shape[:2]
    grid_images = {m: list(_OutputFolder(m, str(f), names, size).batch(names).numpy().transpose(0, 2, 3, 1))
                   for m, f in folders.items()}
    grid = evaluation_grid(grid_images)
    if grid is None:
        raise ValueError(f"{out_dir}: no images to draw")
    write_image(out_dir / "grid.png", grid)
    return out_dir / "grid.png"
