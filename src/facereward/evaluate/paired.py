"""Paired test sets (lq/ and, where present, hq/): every method's restorations scored by the measures table.

Methods are restorers run on the test set's LQ images (`models`), folders of existing outputs matched by name
(`images`), and the LQ input itself. The columns come from the measures table (`facereward.evaluate.columns`). By
default, with GT: PSNR/SSIM (RGB and Y), LPIPS (when its weights are given), identity (IDS, Deg), landmark distance
(LMD) and FID/KID against the GT set. Without GT: FID/KID against a reference folder only. The FRM score, CLIPIQA
and NIQE (docs/methods.md 3), when given, need no GT. Judges are named in the column headers.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from facereward.data.datasets import PairedFolderDataset, collate_batch
from facereward.data.imageio import list_images, read_image, write_image
from facereward.data.toyfaces import TOY_MARKER, is_toy_folder
from facereward.measures import MeasureEnv, SetMeasure
from facereward.models.families import AnyRestorer, load_restorer
from facereward.models.seeded import restore_batch

from .analysis import SetScores, plan_analysis, run_analysis
from .columns import build_columns
from .config import EvaluateConfig, sampler_options
from .outputs import EvaluateResult, OutputFolder, markdown_table, slug, write_outputs


def evaluate_paired(config: EvaluateConfig) -> EvaluateResult:
    """Run every method over the test set, write OUT/results.{md,csv,json} and OUT/grid.png."""
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
    restorers: dict[str, AnyRestorer] = {}
    for name, folder in config.models.items():
        restorers[name] = load_restorer(folder).to(device)
        if restorers[name].config.size != size[0]:
            raise ValueError(f"{folder}: model size {restorers[name].config.size} differs from the test set's {size[0]} px")
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def run_model(name: str, stage: str):
        def fn(batch: dict[str, Any], idx: list[int]) -> torch.Tensor:
            key = f"{name}:{idx[0]}"
            if key not in cache:
                cache.clear()
                out = restore_batch(restorers[name], batch["lq"].to(device), idx, steps=config.sample_steps, eta=config.eta,
                                    seed=config.seed, sampler=sampler_options(config))
                cache[key] = {k: v.cpu() for k, v in out.items()}
            return cache[key][stage]
        return fn

    stage1 = config.include_stage1
    if isinstance(stage1, list) and (unknown := sorted(set(stage1) - set(config.models))):
        raise ValueError(f"include_stage1: {unknown[0]!r} is not one of the models ({', '.join(config.models)})")
    for name in config.models:
        if stage1 is True or (isinstance(stage1, list) and name in stage1):
            if restorers[name].family != "multi-step":
                raise ValueError(f"include_stage1: {name!r} ({config.models[name]}) is a one-step restorer, which has no stage 1")
            methods[f"{name} (stage 1)"] = run_model(name, "clean")
        methods[name] = run_model(name, "restored")
    for name, folder in config.images.items():
        source = OutputFolder(name, folder, names, size)
        methods[name] = lambda batch, idx, s=source: s.batch(batch["name"])
    if not methods:
        raise ValueError("nothing to evaluate: give --model NAME=DIR or --images NAME=DIR (or keep the LQ row)")
    plan = plan_analysis(config, list(methods), names, toy)  # bad compare/slice/check options fail before any restoring

    env = MeasureEnv(device, toy=toy, identity=config.identity, landmarks=config.landmarks, features=config.fid)
    built = build_columns(config, env, has_gt, has_reference=has_gt or config.fid_reference is not None)
    _warn_dlib_on_small_faces(config, env.used, size)
    per_image_metrics = [m for m in built if not isinstance(m, SetMeasure)]
    set_metrics = [m for m in built if isinstance(m, SetMeasure)]
    extractors = list({id(m.extractor): m.extractor for m in set_metrics}.values())  # FID and KID share features
    judges = {"identity": "none", "landmarks": "none", "fid_features": "none", "lpips": "none", "frm": "none",
              "clipiqa": "none", **env.used}

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
        env.new_batch()
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
                    write_image(out_dir / "outputs" / slug(method) / f"{name}.png", out[j].permute(1, 2, 0).cpu().numpy())
            if len(grid_images[method]) < config.grid_rows:
                take = config.grid_rows - len(grid_images[method])
                grid_images[method] += [img.permute(1, 2, 0).cpu().numpy() for img in out[:take]]
            bar.update(n)
        if has_gt and len(grid_images["GT"]) < config.grid_rows:
            grid_images["GT"] += [img.permute(1, 2, 0).cpu().numpy() for img in gt[: config.grid_rows - len(grid_images["GT"])]]
        start += n
    bar.close()

    rows: dict[str, dict[str, float]] = {m: {k: float(np.mean(v)) for k, v in per_image[m].items()} for m in methods}
    set_scores = []
    for e in extractors:
        ref = _reference_features(config, e, reference_features[id(e)])
        for metric in (m for m in set_metrics if m.extractor is e and ref is not None):
            feats = {method: torch.cat(features[id(e)][method]).numpy() for method in methods}
            for method in methods:
                rows[method][metric.column] = metric.compute(feats[method], ref)
            set_scores.append(SetScores(metric.column, metric.resample or metric.compute, feats, ref,
                                        config.fid_reference is None, metric.lower_better))
    sampling = {name: {"eta": r.config.eta if config.eta is None else config.eta, **sampler_options(config).resolved(r)}
                for name, r in restorers.items()}
    provenance = {m.column: m.provenance for m in built}
    analysis, sections = run_analysis(config, plan, rows, per_image, set_scores, provenance)
    table = markdown_table(rows, analysis.get("intervals"))
    write_outputs(config, out_dir, rows, per_image, judges, table, grid_images, names, len(dataset), sampling,
                  provenance, analysis, sections)
    return EvaluateResult(rows=rows, per_image={m: dict(v) for m, v in per_image.items()}, table=table, out_dir=out_dir,
                          judges=judges, analysis=analysis, sections=sections)


DLIB_MIN_FACE = 128  # px; dlib's judges are trained on faces about 150 px wide: on smaller ones they misfire


def _warn_dlib_on_small_faces(config: EvaluateConfig, judges: dict[str, str], size: tuple[int, int]) -> None:
    """Warn (one line) when `auto` resolved to a dlib judge on a test set of at most DLIB_MIN_FACE px images."""
    auto_dlib = [judges[k] for k in ("identity", "landmarks")
                 if getattr(config, k) == "auto" and judges.get(k, "").startswith("dlib")]
    if auto_dlib and max(size) <= DLIB_MIN_FACE:
        warnings.warn(f"{' and '.join(auto_dlib)} on {size[1]}x{size[0]} px faces are unreliable; for toy faces pass "
                      f"--identity toy --landmarks toy, or put {TOY_MARKER} beside lq/ and hq/ (facereward degrade "
                      f"copies it from a toyfaces folder)", stacklevel=3)


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


