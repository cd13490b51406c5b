"""`facereward evaluate`: the BFR benchmark table (docs/methods.md section 3) for several methods side by side.

Methods are restorers run on the test set's LQ images (`models`), folders of existing outputs matched
by name (`images`), and the LQ input itself. With GT: PSNR/SSIM (RGB and Y), LPIPS (when its weights
are given), identity (IDS, Deg), landmark distance (LMD) and FID/KID against the GT set. Without GT:
FID/KID against a reference folder only. The FRM score and CLIPIQA (docs/methods.md 3), when given, need no GT.
Judges are named in the column headers.
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
from facereward.metrics.fullref import psnr, ssim

TOY_MARKER = "toyworld.json"  # written beside lq/ and hq/ by toy test sets: selects the toy judges


@dataclass
class EvaluateConfig:
    testset: str = ""
    out_dir: str = "eval_out"
    models: dict[str, str] = field(default_factory=dict)  # name -> restorer folder
    images: dict[str, str] = field(default_factory=dict)  # name -> folder of outputs named like the LQ files
    include_lq: bool = True
    include_stage1: bool = False  # also a "NAME (stage 1)" row per model
    steps: int = 50
    eta: float = 0.0
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


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """{row: {column: value}} as a markdown table; 4 decimals up to 1, else 2; NaN as "-"."""
    columns = list(dict.fromkeys(c for values in rows.values() for c in values))

    def fmt(v: float | None) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.4f}" if abs(v) <= 1 else f"{v:.2f}"

    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(values.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _is_toy(testset: Path) -> bool:
    return (testset / TOY_MARKER).is_file()


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


def _landmark_judge(spec: str, toy: bool):
    from facereward.metrics.landmarks import get_landmark_detector

    if spec == "none":
        return None
    return get_landmark_detector("toy" if spec == "auto" and toy else ("dlib" if spec == "auto" else spec))


def _fid_extractor(spec: str, identity_judge):
    from facereward.metrics.fid import CallableFeatures, InceptionV3Features

    if spec == "none":
        return None
    if spec in ("auto", "identity"):
        if identity_judge is None:
            if spec == "identity":
                raise ValueError("fid=identity needs an identity judge (identity is 'none')")
            return None
        return CallableFeatures(identity_judge.name, identity_judge.embed)
    if spec.startswith("inception:"):
        return InceptionV3Features(spec.split(":", 1)[1])
    raise ValueError(f"fid must be auto, identity, inception:PATH or none, got {spec!r}")


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

    testset = Path(config.testset)
    out_dir = Path(config.out_dir)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = PairedFolderDataset(testset)
    has_gt = dataset.has_hq
    names = [p.stem for p in dataset.lq_files]
    first = dataset[0]["lq"]
    size = (first.shape[1], first.shape[2])
    toy = _is_toy(testset)

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
                out = restore_batch(restorers[name], batch["lq"].to(device), idx, steps=config.steps, eta=config.eta, seed=config.seed)
                cache[key] = {k: v.cpu() for k, v in out.items()}
            return cache[key][stage]
        return fn

    for name in config.models:
        if config.include_stage1:
            methods[f"{name} (stage 1)"] = run_model(name, "clean")
        methods[name] = run_model(name, "restored")
    for name, folder in config.images.items():
        source = _OutputFolder(name, folder, names, size)
        methods[name] = lambda batch, idx, s=source: s.batch(batch["name"])
    if not methods:
        raise ValueError("nothing to evaluate: give --model NAME=DIR or --images NAME=DIR (or keep the LQ row)")

    id_judge = identity_judge(config.identity, toy) if has_gt else None
    lmk_judge = _landmark_judge(config.landmarks, toy) if has_gt else None
    fid_judge = _fid_extractor(config.fid, id_judge if has_gt else identity_judge(config.identity, toy))
    lpips = None
    if has_gt and config.lpips_backbone and config.lpips_heads:
        from facereward.metrics.lpips import LPIPS

        lpips = LPIPS(config.lpips_net, config.lpips_backbone, config.lpips_heads).to(device)
    elif bool(config.lpips_backbone) != bool(config.lpips_heads):
        raise ValueError("LPIPS needs both lpips_backbone and lpips_heads")
    frm = None
    if config.frm:
        from facereward.models.frm import FaceRewardModel

        frm = FaceRewardModel.from_pretrained(config.frm).to(device)
    frm_column = f"FRM ({Path(config.frm).name})" if config.frm else ""
    clipiqa = None
    if config.clipiqa:
        from facereward.metrics.clipiqa import CLIPIQA

        clipiqa = CLIPIQA.from_pretrained(config.clipiqa, option="--clipiqa PATH",
                                          tokenizer_hint="put the CLIP tokenizer files beside the checkpoint").to(device)
    clipiqa_column = f"CLIPIQA ({Path(config.clipiqa).name})" if config.clipiqa else ""
    judges = {"identity": getattr(id_judge, "name", "none"), "landmarks": getattr(lmk_judge, "name", "none"),
              "fid_features": getattr(fid_judge, "name", "none"), "lpips": f"lpips-{config.lpips_net}" if lpips else "none",
              "frm": config.frm or "none", "clipiqa": config.clipiqa or "none"}

    per_image: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in methods}
    features: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    reference_features: list[torch.Tensor] = []
    grid_images: dict[str, list[np.ndarray]] = defaultdict(list)
    loader = DataLoader(dataset, batch_size=config.batch_size, collate_fn=collate_batch)
    bar = tqdm(total=len(dataset) * len(methods), desc="evaluate", disable=not config.progress, dynamic_ncols=True)
    start = 0
    for batch in loader:
        n = batch["lq"].shape[0]
        idx = list(range(start, start + n))
        gt = batch["hq"].to(device) if has_gt else None
        gt_emb = id_judge.embed(gt) if id_judge is not None else None
        gt_lmk = lmk_judge.detect(gt) if lmk_judge is not None else None
        if fid_judge is not None and has_gt and config.fid_reference is None:
            reference_features.append(torch.as_tensor(fid_judge.features(gt)).double().cpu())
        for method, fn in methods.items():
            out = fn(batch, idx).to(device).clamp(0, 1)
            scores = per_image[method]
            if has_gt:
                c = config.crop_border
                scores["PSNR"] += psnr(out, gt, crop_border=c).tolist()
                scores["SSIM"] += ssim(out, gt, crop_border=c).tolist()
                scores["PSNR-Y"] += psnr(out, gt, crop_border=c, y_channel=True).tolist()
                scores["SSIM-Y"] += ssim(out, gt, crop_border=c, y_channel=True).tolist()
                if lpips is not None:
                    with torch.no_grad():
                        scores[judges["lpips"]] += lpips(out, gt).tolist()
                if id_judge is not None:
                    from facereward.metrics.identity import (
                        identity_degrees,
                        identity_similarity,
                    )

                    emb = id_judge.embed(out)
                    scores[f"IDS ({id_judge.name})"] += identity_similarity(emb, gt_emb).tolist()
                    scores[f"Deg ({id_judge.name})"] += identity_degrees(emb, gt_emb).tolist()
                if lmk_judge is not None:
                    from facereward.metrics.landmarks import landmark_distance

                    scores[f"LMD ({lmk_judge.name})"] += landmark_distance(lmk_judge.detect(out), gt_lmk).tolist()
            if frm is not None:
                with torch.no_grad():
                    scores[frm_column] += frm.score(out, batch["caption"]).tolist()
            if clipiqa is not None:
                with torch.no_grad():
                    scores[clipiqa_column] += clipiqa(out).tolist()
            if fid_judge is not None:
                features[method].append(torch.as_tensor(fid_judge.features(out)).double().cpu())
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
    if fid_judge is not None:
        _add_fid(config, fid_judge, features, reference_features, rows, testset, size)
    table = markdown_table(rows)
    _write_outputs(config, out_dir, rows, per_image, judges, table, grid_images, names, len(dataset))
    return EvaluateResult(rows=rows, per_image={m: dict(v) for m, v in per_image.items()}, table=table, out_dir=out_dir, judges=judges)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("_")


def _add_fid(config: EvaluateConfig, extractor, features, reference_features, rows, testset: Path, size) -> None:
    from facereward.metrics.fid import fid_from_features, kid_from_features

    if config.fid_reference is not None:
        ref_files = list_images(config.fid_reference)
        if len(ref_files) < 2:
            raise ValueError(f"{config.fid_reference}: FID needs at least 2 reference images")
        for start in range(0, len(ref_files), config.batch_size):
            chunk = [read_image(p) for p in ref_files[start : start + config.batch_size]]
            reference_features.append(torch.as_tensor(extractor.features(torch.from_numpy(np.stack(chunk).transpose(0, 3, 1, 2).copy()))).double())
    if not reference_features:
        return
    ref = torch.cat(reference_features).numpy()
    if len(ref) < 2:
        return
    if min(len(ref), len(dataset_feats := torch.cat(next(iter(features.values()))))) <= ref.shape[1]:
        warnings.warn(f"FID from {len(dataset_feats)} vs {len(ref)} images of {ref.shape[1]}-d features ({extractor.name}): "
                      "the covariances are singular, so FID is biased and only comparable at equal N")
    for method, feats in features.items():
        f = torch.cat(feats).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the small-N warning is given once above
            rows[method][f"FID ({extractor.name})"] = float(fid_from_features(f, ref))
        kid_mean, _ = kid_from_features(f, ref, subsets=config.kid_subsets, subset_size=config.kid_subset_size, seed=config.seed)
        rows[method][f"KID ({extractor.name})"] = float(kid_mean)


def _write_outputs(config, out_dir: Path, rows, per_image, judges, table: str, grid_images, names, n_images: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    header = (f"{n_images} images from {config.testset}; {config.steps} DDIM steps, eta {config.eta}, seed {config.seed}; "
              f"judges: " + ", ".join(f"{k} = {v}" for k, v in judges.items()) + "\n\n")
    (out_dir / "results.md").write_text(header + table + "\n")
    columns = list(dict.fromkeys(c for values in rows.values() for c in values))
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", *columns])
        for method, values in rows.items():
            writer.writerow([method, *[values.get(c, "") for c in columns]])
    payload = {"config": asdict(config), "judges": judges, "rows": rows, "names": names,
               "per_image": {m: dict(v) for m, v in per_image.items()}}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1, default=float))
    order = ["LQ"] + [m for m in grid_images if m not in ("LQ", "GT")] + ["GT"]
    order = [m for m in order if m in grid_images]
    n_rows = min(len(v) for v in grid_images.values()) if grid_images else 0
    if n_rows:
        grid = image_grid([[grid_images[m][r] for m in order] for r in range(n_rows)], column_titles=order,
                          scale=2 if grid_images[order[0]][0].shape[0] <= 64 else 1)
        write_image(out_dir / "grid.png", grid)
