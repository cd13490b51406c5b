"""Whole photos in, whole photos out: every face found, aligned to the FFHQ template, restored in batches, pasted back.

`restore_photo(restorer, image)` is the library call; `restore_photo_files` is `facereward restore --photos`.
The background is upscaled by `upscale` (bicubic, or the restorer's stage-1 cleaner run in tiles), then the
restored faces are blended in through the inverse alignment under a feathered mask, the largest last.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from facereward.data.faces import (
    DetectedFace,
    FaceDetector,
    alignment_affine,
    paste_face,
    warp_face,
)
from facereward.data.imageio import ImageError, image_grid, read_photo, write_image
from facereward.models.seeded import restore_batch
from facereward.models.ddim import Eta
from facereward.models.restorer import Restorer, SamplerOptions

__all__ = ["PhotoFace", "restore_photo", "restore_photo_files", "PhotoReport", "upscale_background", "STAGES"]

Background = Literal["bicubic", "cleaner"]
STAGES = ("detect", "align", "restore", "background", "paste")
FACE_INDEX_STRIDE = 1000  # face j of photo i draws its initial noise from (seed, 1000 i + j)


@dataclass
class PhotoFace:
    """One face of a photo: where it is, how it was aligned, its crop and restoration (None when left as it is).

    `box` (x0, y0, x1, y1) and `landmarks` (5, 2; FFHQ order) are input-photo pixels; `affine` (2x3) maps the
    input photo onto the crop; crops are float [0, 1] at the restorer's size; `status` is "restored" or why the
    face was left ("30 px, smaller than --min-face 32", ...).
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray
    affine: np.ndarray | None = None
    crop: np.ndarray | None = None
    restored: np.ndarray | None = None
    clean: np.ndarray | None = None  # the stage-1 (cleaner) output of the crop
    status: str = "restored"

    @property
    def size(self) -> float:
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))

    def describe(self) -> str:
        x0, y0, x1, y1 = (int(round(v)) for v in self.box)
        return f"face at x={x0} y={y0} ({x1 - x0}x{y1 - y0} px)"

    def to_json(self) -> dict:
        return {"box": [round(v, 2) for v in self.box], "score": round(self.score, 4),
                "landmarks": np.round(self.landmarks, 2).tolist(), "status": self.status,
                "affine": None if self.affine is None else np.round(self.affine, 6).tolist()}


def _select(faces: list[DetectedFace], width: int, height: int, only_center_face: bool, min_face: float,
            max_faces: int | None) -> list[PhotoFace]:
    """Records for every detected face, largest first, with the ones to leave marked by their reason."""
    records = [PhotoFace(box=f.box, score=f.score, landmarks=f.landmarks) for f in sorted(faces, key=lambda f: -f.size)]
    if only_center_face and records:
        centre = np.array([width / 2, height / 2])
        dist = [np.linalg.norm(np.array([(r.box[0] + r.box[2]) / 2, (r.box[1] + r.box[3]) / 2]) - centre) for r in records]
        keep = int(np.argmin(dist))
        for i, r in enumerate(records):
            if i != keep:
                r.status = "not the centre face (--only-center-face)"
    kept = 0
    for r in records:
        if r.status != "restored":
            continue
        if r.size < min_face:
            r.status = f"{r.size:.0f} px, smaller than --min-face {min_face:g}"
        elif max_faces is not None and kept >= max_faces:
            r.status = f"over --max-faces {max_faces}"
        else:
            kept += 1
    return records


def _tiles(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    step = tile - 2 * overlap
    starts = list(range(0, length - tile, step)) + [length - tile]
    return sorted(set(starts))


@torch.no_grad()
def clean_photo(restorer: Restorer, image: np.ndarray, tile: int = 512, overlap: int = 32) -> np.ndarray:
    """The restorer's stage-1 cleaner over a whole uint8 RGB photo, in overlapping tiles (memory flat in photo size); uint8 out."""
    h, w = image.shape[:2]
    out = np.empty_like(image)
    pad = 8  # the cleaner's strided convs want sizes divisible by its downscale: reflect-pad each tile
    device = restorer.device
    for y in _tiles(h, tile, overlap):
        for x in _tiles(w, tile, overlap):
            y1, x1 = min(h, y + tile), min(w, x + tile)
            patch = image[y:y1, x:x1].astype(np.float32) / 255.0
            ph, pw = patch.shape[:2]
            th, tw = -(-ph // pad) * pad, -(-pw // pad) * pad
            if (th, tw) != (ph, pw):
                patch = cv2.copyMakeBorder(patch, 0, th - ph, 0, tw - pw, cv2.BORDER_REFLECT_101 if min(ph, pw) > 1 else cv2.BORDER_REPLICATE)
            t = torch.from_numpy(patch.transpose(2, 0, 1).copy()).unsqueeze(0).to(device)
            cleaned = restorer.clean(t).clamp(0, 1)[0, :, :ph, :pw].permute(1, 2, 0).cpu().numpy()
            # keep the tile's centre; its borders come from the neighbouring tiles
            cy0 = 0 if y == 0 else overlap
            cx0 = 0 if x == 0 else overlap
            cy1 = ph if y1 == h else ph - overlap
            cx1 = pw if x1 == w else pw - overlap
            out[y + cy0 : y + cy1, x + cx0 : x + cx1] = np.clip(np.round(cleaned[cy0:cy1, cx0:cx1] * 255.0), 0, 255).astype(np.uint8)
    return out


def _output_size(width: int, height: int, upscale: float) -> tuple[int, int]:
    return max(1, int(round(width * upscale))), max(1, int(round(height * upscale)))


def upscale_background(image: np.ndarray, upscale: float, background: Background = "bicubic",
                       restorer: Restorer | None = None) -> np.ndarray:
    """The photo (uint8 or float) resized by `upscale`: bicubic, or cleaned by the restorer's stage 1 first."""
    if background not in ("bicubic", "cleaner"):
        raise ValueError(f"background must be 'bicubic' or 'cleaner', got {background!r}")
    h, w = image.shape[:2]
    if background == "cleaner":
        if restorer is None:
            raise ValueError("background='cleaner' needs the restorer")
        was_float = image.dtype != np.uint8
        u8 = image if not was_float else np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
        image = clean_photo(restorer, np.ascontiguousarray(u8[..., :3]))
        if was_float:
            image = image.astype(np.float32) / 255.0
    out_w, out_h = _output_size(w, h, upscale)
    if (out_w, out_h) == (w, h):
        return np.array(image[..., :3], copy=True)
    out = cv2.resize(np.ascontiguousarray(image[..., :3]), (out_w, out_h), interpolation=cv2.INTER_CUBIC)
    return out if out.dtype == np.uint8 else np.clip(out, 0.0, 1.0)


def restore_photo(
    restorer: Restorer,
    image: np.ndarray,
    detector: FaceDetector | str = "cnn",
    steps: int = 50,
    eta: Eta | None = None,
    seed: int = 0,
    sampler: SamplerOptions | None = None,
    upscale: float = 1.0,
    background: Background = "bicubic",
    only_center_face: bool = False,
    min_face: float = 0,
    max_faces: int | None = None,
    batch_size: int = 8,
    photo_index: int = 0,
    faces: list[DetectedFace] | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[np.ndarray, list[PhotoFace]]:
    """Restore every face of an HxWx3 (or x4: alpha kept) uint8 or float [0, 1] photo: (photo upscaled, faces).

    The output has the input's dtype; `faces` lists every detection (largest first) with its status. Face j's
    initial noise comes from (seed, 1000 photo_index + j). `detector` is a FaceDetector (reuse one: it loads
    dlib's models) or its kind; `faces` given skips detection; `timings` gets each stage's seconds added.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"restore_photo expects an HxWx3 or HxWx4 image, got shape {image.shape}")
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"restore_photo expects uint8 or float [0, 1] pixels, got dtype {image.dtype}")
    if upscale <= 0:
        raise ValueError(f"upscale must be > 0, got {upscale}")
    if max_faces is not None and max_faces < 0:
        raise ValueError(f"max_faces must be >= 0, got {max_faces}")
    timings = timings if timings is not None else {}
    rgb = image[..., :3]
    alpha = image[..., 3] if image.shape[2] == 4 else None
    h, w = rgb.shape[:2]
    size = restorer.config.size

    tick = time.perf_counter()
    if faces is None:
        det = detector if isinstance(detector, FaceDetector) else FaceDetector(detector)
        faces = det.detect(rgb)
    records = _select(faces, w, h, only_center_face, min_face, max_faces)
    timings["detect"] = timings.get("detect", 0.0) + time.perf_counter() - tick

    tick = time.perf_counter()
    todo: list[PhotoFace] = []
    for r in records:
        if r.status != "restored":
            continue
        r.affine = alignment_affine(r.landmarks, size)
        if r.affine is None:
            r.status = "its landmarks give no alignment"
            continue
        r.crop = warp_face(rgb, r.affine, size)
        todo.append(r)
    timings["align"] = timings.get("align", 0.0) + time.perf_counter() - tick

    tick = time.perf_counter()
    device = restorer.device
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        lq = torch.from_numpy(np.stack([r.crop for r in chunk]).transpose(0, 3, 1, 2).copy()).to(device)
        indices = [FACE_INDEX_STRIDE * photo_index + records.index(r) for r in chunk]
        out = restore_batch(restorer, lq, indices, steps=steps, eta=eta, seed=seed, sampler=sampler)
        restored, clean = (out[k].permute(0, 2, 3, 1).cpu().numpy() for k in ("restored", "clean"))
        for j, r in enumerate(chunk):
            r.restored, r.clean = restored[j], clean[j]
    timings["restore"] = timings.get("restore", 0.0) + time.perf_counter() - tick

    tick = time.perf_counter()
    canvas = upscale_background(rgb, upscale, background, restorer)
    timings["background"] = timings.get("background", 0.0) + time.perf_counter() - tick

    tick = time.perf_counter()
    out_h, out_w = canvas.shape[:2]
    factor = 0.5 * (out_w / w + out_h / h)
    for r in sorted(todo, key=lambda r: r.size):  # the largest face last, so it wins where faces overlap
        paste_face(canvas, r.restored, r.affine, upscale=factor)
    if alpha is not None:
        a = alpha if (out_w, out_h) == (w, h) else cv2.resize(np.ascontiguousarray(alpha), (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        canvas = np.dstack([canvas, a.astype(canvas.dtype)])
    timings["paste"] = timings.get("paste", 0.0) + time.perf_counter() - tick
    return canvas, records


# --------------------------------------------------------------------------- files


@dataclass
class PhotoReport:
    """What `restore_photo_files` did: outputs written, inputs that failed (path, one line), photos with no face,
    faces left as they are (path, one line), faces restored, seconds per stage and in all."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    no_face: list[Path] = field(default_factory=list)
    left: list[tuple[Path, str]] = field(default_factory=list)
    faces_restored: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _save_faces(out_dir: Path, stem: str, records: list[PhotoFace]) -> None:
    for j, r in enumerate(records):
        if r.restored is None:
            continue
        write_image(out_dir / "faces" / "lq" / f"{stem}_{j:02d}.png", r.crop)
        write_image(out_dir / "faces" / "restored" / f"{stem}_{j:02d}.png", r.restored)
        scale = max(1, 256 // r.crop.shape[0])
        write_image(out_dir / "faces" / "compare" / f"{stem}_{j:02d}.png", image_grid([[r.crop, r.restored]], scale=scale))


def restore_photo_files(
    restorer: Restorer,
    inputs: list[Path],
    out_dir: Path,
    detector: FaceDetector | str = "cnn",
    save_faces: bool = False,
    progress: bool = True,
    **options: Any,
) -> PhotoReport:
    """Each photo to OUT/NAME.png (alpha kept), OUT/photos.json listing every face; bad files reported and skipped.

    `options` are `restore_photo`'s (steps, eta, seed, sampler, upscale, background, only_center_face, min_face, max_faces,
    batch_size). With `save_faces`: OUT/faces/{lq,restored,compare}/NAME_JJ.png. A photo with no face is written upscaled.
    """
    unknown = set(options) - set(inspect.signature(restore_photo).parameters) | ({"photo_index", "timings", "faces"} & set(options))
    if unknown:
        raise TypeError(f"restore_photo_files: unknown options {sorted(unknown)}")
    out_dir = Path(out_dir)
    report = PhotoReport(timings={k: 0.0 for k in STAGES})
    det = detector if isinstance(detector, FaceDetector) else FaceDetector(detector)
    manifest: dict[str, dict] = {}
    start = time.perf_counter()
    bar = tqdm(inputs, desc="restore photos", unit="photo", disable=not progress, dynamic_ncols=True)
    for i, path in enumerate(bar):
        try:
            photo = read_photo(path)
        except ImageError as err:
            report.failed.append((path, str(err)))
            continue
        image = photo.rgb if photo.alpha is None else np.dstack([photo.rgb, photo.alpha])
        del photo
        out, records = restore_photo(restorer, image, det, photo_index=i, timings=report.timings, **options)
        del image
        target = out_dir / f"{path.stem}.png"
        write_image(target, out)
        del out
        report.written.append(target)
        restored = [r for r in records if r.restored is not None]
        report.faces_restored += len(restored)
        if not records:
            report.no_face.append(path)
        for r in records:
            if r.restored is None:
                report.left.append((path, f"{r.describe()} left as it is: {r.status}"))
        if save_faces:
            _save_faces(out_dir, path.stem, records)
        manifest[path.name] = {"output": target.name, "faces": [r.to_json() for r in records]}
    bar.close()
    if manifest:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "photos.json").write_text(json.dumps(manifest, indent=1))
    report.seconds = time.perf_counter() - start
    return report
