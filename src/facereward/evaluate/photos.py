"""`facereward evaluate --photos`: whole-photo test sets without GT, scored by the table's no-reference measures.

Every photo's faces are detected once (on the input); each method's output photo (the input itself as "LQ",
each `--model` run through `restore_photo`, each `--images` folder of restored photos named like the inputs) is
cut at those faces into FFHQ-aligned crops of `photo_crop_size` px, and the no-reference measures of the measures
table (docs/methods.md 3: CLIPIQA, NIQE, the FRM score, your own) score the crops, as real-world BFR tables score
aligned faces. A row's value is the mean over all faces. Photos with no face count in the header, not in the rows.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from facereward.data.faces import FaceDetector, alignment_affine, warp_face
from facereward.data.imageio import ImageError, list_images, read_photo, write_image
from facereward.inference import collect_inputs
from facereward.measures import Measure, MeasureEnv, get_measure
from facereward.models.families import load_restorer
from facereward.photos import restore_photo

from .columns import build_columns
from .config import EvaluateConfig, sampler_options
from .analysis import plan_analysis, run_analysis
from .outputs import EvaluateResult, markdown_table, slug, write_outputs

__all__ = ["evaluate_photos", "face_crops"]


def face_crops(photo: np.ndarray, landmarks: list[np.ndarray], input_size: tuple[int, int], size: int) -> torch.Tensor:
    """(F, 3, size, size) aligned crops of `photo` at faces whose five points were found on an input of (h, w) `input_size`.

    `photo` may be the input upscaled by any factor: the points are scaled by its size over `input_size`.
    """
    h, w = photo.shape[:2]
    sy, sx = h / input_size[0], w / input_size[1]
    crops = []
    for lm in landmarks:
        matrix = alignment_affine(np.asarray(lm) * np.array([sx, sy], dtype=np.float32), size)
        if matrix is not None:
            crops.append(warp_face(photo, matrix, size))
    if not crops:
        return torch.zeros(0, 3, size, size)
    return torch.from_numpy(np.stack(crops).transpose(0, 3, 1, 2).copy())


def _thumbnail(image: np.ndarray, side: int = 192) -> np.ndarray:
    """A float [0, 1] `side` x `side` tile: the photo fitted inside on white."""
    h, w = image.shape[:2]
    s = side / max(h, w)
    small = cv2.resize(np.ascontiguousarray(image[..., :3]), (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    tile = np.ones((side, side, 3), dtype=np.float32)
    y, x = (side - small.shape[0]) // 2, (side - small.shape[1]) // 2
    tile[y : y + small.shape[0], x : x + small.shape[1]] = small.astype(np.float32) / 255.0
    return tile


def _no_reference_measures(config: EvaluateConfig, device: torch.device) -> tuple[list[Measure], dict[str, str]]:
    # no GT and no reference set: the default set skips full-reference and set measures
    env = MeasureEnv(device, toy=False, identity=config.identity, landmarks=config.landmarks, features="none")
    for name in config.measures or []:
        if get_measure(name).kind != "NR":
            raise ValueError(f"evaluate --photos has no GT and no reference set: measure {name!r} is {get_measure(name).kind}, "
                             "pick no-reference ones (--list-metrics, type NR)")
    built = build_columns(config, env, has_gt=False, has_reference=False)
    if not built:
        raise ValueError("evaluate --photos scores no-reference measures: give one of --clipiqa PATH, --niqe-model FILE, "
                         "--frm DIR (or --metrics with your own registered NR measure)")
    return built, env.used


def evaluate_photos(config: EvaluateConfig) -> EvaluateResult:
    """Restore every photo of `config.photos` with each method; write OUT/results.{md,csv,json}, OUT/grid.png, OUT/outputs/."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(config.out_dir)
    files = collect_inputs(config.photos)
    metrics, judges = _no_reference_measures(config, device)
    detector = FaceDetector(config.photo_detector)
    judges = {"detector": detector.name, **judges}
    restorers = {name: load_restorer(folder).to(device) for name, folder in config.models.items()}
    folders = {name: {p.stem: p for p in list_images(folder)} for name, folder in config.images.items()}
    methods = (["LQ"] if config.include_lq else []) + list(restorers) + list(folders)
    if not methods:
        raise ValueError("nothing to evaluate: give --model NAME=DIR or --images NAME=DIR (or keep the LQ row)")
    if config.slice_by:
        raise ValueError("slice_by applies to paired test sets (--testset), not to --photos")
    plan = plan_analysis(config, methods, [], toy=False)

    per_image: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in methods}
    grid_images: dict[str, list[np.ndarray]] = defaultdict(list)
    names, skipped, no_face, n_faces = [], [], [], 0
    seconds = dict.fromkeys(restorers, 0.0)
    bar = tqdm(files, desc="evaluate photos", unit="photo", disable=not config.progress, dynamic_ncols=True)
    for i, path in enumerate(bar):
        try:
            photo = read_photo(path).rgb
        except ImageError as err:
            skipped.append(str(err))
            continue
        faces = detector.detect(photo)
        names.append(path.stem)
        n_faces += len(faces)
        if not faces:
            no_face.append(path.name)
        landmarks = [f.landmarks for f in faces]
        for method in methods:
            if method == "LQ":
                out = photo
            elif method in restorers:
                tick = time.perf_counter()
                out, _ = restore_photo(restorers[method], photo, detector, steps=config.sample_steps, eta=config.eta, seed=config.seed,
                                       sampler=sampler_options(config), batch_size=config.batch_size, photo_index=i, faces=faces)
                seconds[method] += time.perf_counter() - tick
                if config.save_outputs:
                    write_image(out_dir / "outputs" / slug(method) / f"{path.stem}.png", out)
            else:
                if path.stem not in folders[method]:
                    raise FileNotFoundError(f"{config.images[method]}: no output named {path.stem}.* for '{method}'")
                out = read_photo(folders[method][path.stem]).rgb
            crops = face_crops(out, landmarks, photo.shape[:2], config.photo_crop_size).to(device)
            if len(crops):
                with torch.no_grad():
                    for metric in metrics:
                        per_image[method][metric.column] += metric(crops).float().cpu().tolist()
            if len(grid_images[method]) < config.grid_rows:
                grid_images[method].append(_thumbnail(out))
    bar.close()
    for reason in skipped:
        warnings.warn(f"skipped {reason}", stacklevel=2)
    if not names:
        raise ValueError(f"{config.photos}: no readable photos")
    rows = {m: {k: float(np.mean(v)) for k, v in per_image[m].items()} for m in methods}
    provenance = {m.column: m.provenance for m in metrics}
    analysis, sections = run_analysis(config, plan, rows, per_image, [], provenance)  # per face: the same faces for every method
    for name, s in seconds.items():
        rows[name]["s/photo"] = s / len(names)
    table = markdown_table(rows, analysis.get("intervals"))
    judges["photos"] = (f"{len(names)} photos, {n_faces} faces, {len(no_face)} with no face"
                        + (f" ({', '.join(no_face[:5])}{', ...' if len(no_face) > 5 else ''})" if no_face else "")
                        + (f", {len(skipped)} unreadable" if skipped else ""))
    header_config = dataclasses.replace(config, testset=config.photos)
    sampling = {name: {"eta": r.config.eta if config.eta is None else config.eta, **sampler_options(config).resolved(r)}
                for name, r in restorers.items()}
    write_outputs(header_config, out_dir, rows, per_image, judges, table, grid_images, names, len(names), sampling,
                  provenance, analysis, sections)
    return EvaluateResult(rows=rows, per_image={m: dict(v) for m, v in per_image.items()}, table=table, out_dir=out_dir,
                          judges=judges, analysis=analysis, sections=sections)
