"""Image files in and out, with one-line errors that name the file and the problem.

Images inside facereward are float32 arrays, HWC, RGB, values in [0, 1] (numpy), or
float tensors BCHW in [0, 1] (torch). Only these helpers touch files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from facereward.atomic import atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageError(ValueError):
    """A bad image file; the message is one line: '<path>: <problem>'."""


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name; a clear error if the folder is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_image(
    path: str | Path,
    size: int | tuple[int, int] | None = None,
    convert: bool = False,
) -> np.ndarray:
    """Read an RGB image as float32 HWC in [0, 1].

    `size` (an int for square, or (height, width)) is checked, not resized to: a mismatch is an
    error. Grayscale and alpha images are errors unless `convert` is set, which replicates gray
    channels and composites alpha onto white.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("RGB",):
                rgb = im.copy()
            elif mode in ("L", "LA", "I", "I;16", "F", "1"):
                if not convert:
                    raise ImageError(f"{path}: grayscale image (mode {mode}); expected RGB (use --convert to accept it)")
                rgb = im.convert("RGB")
            elif mode in ("RGBA", "PA") or (mode == "P" and "transparency" in im.info):
                if not convert:
                    raise ImageError(f"{path}: image has an alpha channel (mode {mode}); expected RGB (use --convert to accept it)")
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(background, rgba).convert("RGB")
            elif mode in ("P", "CMYK", "YCbCr"):
                rgb = im.convert("RGB")
            else:
                raise ImageError(f"{path}: unsupported image mode {mode}")
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: corrupt or truncated image ({err.__class__.__name__}: {err})") from None
    arr = np.asarray(rgb, dtype=np.uint8)
    if size is not None:
        want = (size, size) if isinstance(size, int) else tuple(size)
        if arr.shape[:2] != want:
            raise ImageError(f"{path}: wrong size {arr.shape[1]}x{arr.shape[0]} (width x height); expected {want[1]}x{want[0]}")
    return arr.astype(np.float32) / 255.0


@dataclass
class Photo:
    """A photo as read from a file: `rgb` uint8 HxWx3, `alpha` uint8 HxW or None, the file's `mode`, `exif_rotated`."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    mode: str
    exif_rotated: bool = False


def _deep_to_uint8(arr: np.ndarray) -> np.ndarray:
    """16-bit (or 32-bit int / float) gray pixels -> uint8 by scaling, not clipping (PIL's convert clips at 255)."""
    if np.issubdtype(arr.dtype, np.floating):
        peak = 1.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 255.0
        return np.clip(np.round(np.nan_to_num(arr) * (255.0 / peak)), 0, 255).astype(np.uint8)
    if arr.dtype == np.uint8:
        return arr
    wide = arr.dtype.itemsize > 1 and (arr.dtype in (np.uint16, np.int16) or int(arr.max(initial=0)) > 255)
    scaled = arr.astype(np.float64) / 257.0 if wide else arr.astype(np.float64)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def read_photo(path: str | Path) -> Photo:
    """Read a photo of any size and mode as uint8 RGB (+ alpha): EXIF orientation applied, gray/16-bit/palette/CMYK converted.

    16-bit pixels are scaled to 8 bits; an alpha channel (RGBA, LA, PA, palette transparency) is returned
    apart, the colour left as it is. Bad files raise `ImageError` with one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            rotated = _has_orientation(im)
            im2 = ImageOps.exif_transpose(im) if rotated else im
            alpha = None
            if im2.mode in ("RGBA", "LA", "PA") or (im2.mode == "P" and "transparency" in im2.info):
                rgba = im2.convert("RGBA")
                alpha = np.asarray(rgba.getchannel("A"), dtype=np.uint8).copy()
                rgb = np.asarray(rgba.convert("RGB"), dtype=np.uint8).copy()
            elif im2.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
                gray = _deep_to_uint8(np.asarray(im2))
                rgb = np.repeat(gray[..., None], 3, axis=2)
            elif im2.mode == "RGB":
                rgb = np.asarray(im2, dtype=np.uint8).copy()
            else:  # L, 1, P, CMYK, YCbCr, LAB, HSV, ...
                rgb = np.asarray(im2.convert("RGB"), dtype=np.uint8).copy()
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"{path}: image too large ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError) as err:
        raise ImageError(f"{path}: corrupt or truncated image ({err.__class__.__name__}: {err})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"{path}: unsupported image layout {rgb.shape} (mode {mode})")
    return Photo(rgb=np.ascontiguousarray(rgb), alpha=alpha, mode=mode, exif_rotated=bool(rotated))


def _has_orientation(im: Image.Image) -> bool:
    try:
        return int(im.getexif().get(0x0112, 1)) not in (0, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF is simply no orientation
        return False


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] HWC -> uint8 HWC, rounded like BasicSR's tensor2img."""
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write float [0, 1] (or uint8) HWC RGB atomically; the format follows the suffix."""
    arr = image if image.dtype == np.uint8 else to_uint8(image)
    with atomic_path(path, suffix=Path(path).suffix) as tmp:  # the suffix picks the format
        Image.fromarray(arr).save(tmp)


def image_to_tensor(image: np.ndarray):
    """HWC [0, 1] numpy -> 1CHW float tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).unsqueeze(0).float()


def tensor_to_image(tensor) -> np.ndarray:
    """CHW or 1CHW tensor in [0, 1] -> HWC float32 numpy (clamped)."""
    t = tensor.detach().float().cpu().clamp(0, 1)
    if t.ndim == 4:
        t = t[0]
    return t.permute(1, 2, 0).numpy()


_TITLE_SCALES = (0.35, 0.3, 0.25)  # Hershey simplex font scales, largest first; below 0.25 it is no longer legible
_TITLE_MARGIN = 2  # px kept free on each side of a column's title


def _text_size(text: str, font_scale: float) -> tuple[int, int, int]:
    """(width, height above the baseline, depth below it) of `text` in px, as cv2.putText draws it (thickness 1)."""
    import cv2

    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    return width, height, baseline


def _split_word(word: str, width: int, font_scale: float) -> list[str]:
    """`word` in pieces of at most `width` px (at least one character each)."""
    pieces: list[str] = []
    while word:
        n = len(word)
        while n > 1 and _text_size(word[:n], font_scale)[0] > width:
            n -= 1
        pieces.append(word[:n])
        word = word[n:]
    return pieces


def wrap_title(title: str, width: int, font_scale: float) -> list[str]:
    """Greedy word wrap of `title` into lines at most `width` px wide at `font_scale`.

    Every character is kept: a word wider than a line is split between characters. "" gives [].
    """
    lines: list[str] = []
    for word in title.split():
        if lines and _text_size(f"{lines[-1]} {word}", font_scale)[0] <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines += _split_word(word, width, font_scale)
    return lines


def layout_titles(titles: list[str], width: int) -> tuple[float, list[list[str]]]:
    """The font scale and lines of column titles for columns `width` px wide.

    The largest scale in `_TITLE_SCALES` at which every word of every title fits the column (less
    its margins), then each title wrapped at it; one scale for all, so the header reads evenly.
    """
    room = max(1, width - 2 * _TITLE_MARGIN)
    words = [word for title in titles for word in title.split()]
    scale = next((s for s in _TITLE_SCALES if all(_text_size(w, s)[0] <= room for w in words)), _TITLE_SCALES[-1])
    return scale, [wrap_title(title, room, scale) for title in titles]


def image_grid(rows: list[list[np.ndarray]], column_titles: list[str] | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile equal-sized HWC [0, 1] images into one image (white gaps), with optional column titles on top.

    Titles are black on white, left-aligned in their own column and never wider than it: long ones wrap
    onto more lines (the header grows) and, where a single word is wider than the column, shrink.
    """
    import cv2

    if not rows or not rows[0]:
        raise ValueError("image_grid: no images")
    h, w = rows[0][0].shape[:2]
    h, w = h * scale, w * scale
    n_cols = max(len(r) for r in rows)
    font_scale, lines = layout_titles(list(column_titles or []), w)
    _, ascent, descent = _text_size("Ag", font_scale)
    n_lines = max((len(t) for t in lines), default=0)
    top = 3  # px above the first line
    title_h = 2 * top + n_lines * (ascent + descent) - descent if n_lines else 0
    grid = np.ones((title_h + pad + len(rows) * (h + pad), pad + n_cols * (w + pad), 3), dtype=np.float32)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            if scale != 1:
                img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
            y, x = title_h + pad + r * (h + pad), pad + c * (w + pad)
            grid[y : y + h, x : x + w] = img[..., :3]
    for c, title_lines in enumerate(lines[:n_cols]):
        for k, line in enumerate(title_lines):
            origin = (pad + c * (w + pad) + _TITLE_MARGIN, top + ascent + k * (ascent + descent))
            cv2.putText(grid, line, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    return grid
