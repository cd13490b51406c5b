"""Image-folder datasets for restoration training and evaluation.

Items are dicts: "hq" / "lq" float CHW tensors in [0, 1], "caption" (str, "" without a sidecar
NAME.txt) and "name" (the file stem). `collate_batch` stacks them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .degradation import DegradationFn, DegradationPreset, degrade
from .imageio import IMAGE_EXTENSIONS, ImageError, list_images, read_image

__all__ = ["DegradedHQDataset", "HQFolderDataset", "InMemoryHQDataset", "PairedFolderDataset", "collate_batch", "read_caption"]

_FLIP_STREAM = 1  # third seed word: the flip decision gets its own stream, apart from the degradation's


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()


def read_caption(image_path: Path) -> str | None:
    """The stripped text of the sidecar NAME.txt beside `image_path`, or None if there is none."""
    sidecar = image_path.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    return sidecar.read_text(encoding="utf-8").strip()


def _image_files(folder: Path) -> list[Path]:
    """Images in `folder` (sorted); errors for an empty folder or two files with the same stem."""
    files = list_images(folder)
    if not files:
        kinds = ", ".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
        raise FileNotFoundError(f"{folder}: no images ({kinds})")
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise ValueError(f"{folder}: two images share the name {path.stem!r} ({seen[path.stem].name}, {path.name})")
        seen[path.stem] = path
    return files


def _preview(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


class DegradedHQDataset(Dataset):
    """HQ images each paired with an LQ degraded on the fly; subclasses say where the HQ comes from.

    Item i of epoch e uses `degrade(hq, preset, seed, index=e * len(self) + i)`: fresh degradations
    every epoch, yet reproducible. Call `set_epoch` before each epoch (with DataLoader workers,
    not persistent ones, so that workers see it). `random_flip` flips HQ (and so LQ) horizontally
    with p=0.5, drawn from the same (seed, index). `quantize`: the LQ rounded to 8-bit levels (presets).
    """

    def __init__(
        self,
        preset: str | DegradationPreset | DegradationFn = "diffbir",
        seed: int = 0,
        random_flip: bool = False,
        quantize: bool = True,
    ) -> None:
        self.preset = preset
        self.seed = seed
        self.random_flip = random_flip
        self.quantize = quantize
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the degradations of `epoch` (indices epoch * len + i)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        raise NotImplementedError

    def load_hq(self, i: int) -> tuple[np.ndarray, str, str]:
        """(HQ image HWC [0, 1], caption, name) of item i."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.item(i)

    def item(self, i: int, noise_variant: int = 0) -> dict[str, Any]:
        """Item i; `noise_variant` > 0: the same degradation parameters (and flip) with its own noise draw (`degrade`)."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        hq, caption, name = self.load_hq(i)
        index = self.epoch * len(self) + i
        if self.random_flip and np.random.default_rng([self.seed, index, _FLIP_STREAM]).random() < 0.5:
            hq = np.ascontiguousarray(hq[:, ::-1])
        lq, _ = degrade(hq, self.preset, seed=self.seed, index=index, noise_variant=noise_variant, quantize=self.quantize)
        return {"hq": _to_tensor(hq), "lq": _to_tensor(lq), "caption": caption, "name": name}


class HQFolderDataset(DegradedHQDataset):
    """HQ faces from a folder (png, jpg, webp), degraded on the fly; captions from NAME.txt sidecars."""

    def __init__(
        self,
        folder: str | Path,
        size: int | tuple[int, int] | None = None,
        preset: str | DegradationPreset | DegradationFn = "diffbir",
        seed: int = 0,
        captions: bool = True,
        convert: bool = False,
        random_flip: bool = False,
        quantize: bool = True,
    ) -> None:
        super().__init__(preset, seed, random_flip, quantize)
        self.folder = Path(folder)
        self.files = _image_files(self.folder)
        self.size = size
        self.captions = captions
        self.convert = convert

    def __len__(self) -> int:
        return len(self.files)

    def load_hq(self, i: int) -> tuple[np.ndarray, str, str]:
        path = self.files[i]
        hq = read_image(path, size=self.size, convert=self.convert)
        caption = (read_caption(path) or "") if self.captions else ""
        return hq, caption, path.stem


class InMemoryHQDataset(DegradedHQDataset):
    """HQ images already in memory (e.g. procedural toy faces), degraded on the fly."""

    def __init__(
        self,
        images: list[np.ndarray],
        captions: list[str] | None = None,
        names: list[str] | None = None,
        preset: str | DegradationPreset | DegradationFn = "diffbir",
        seed: int = 0,
        random_flip: bool = False,
        quantize: bool = True,
    ) -> None:
        super().__init__(preset, seed, random_flip, quantize)
        if not images:
            raise ValueError("InMemoryHQDataset: no images")
        self.images = images
        self.captions = captions if captions is not None else [""] * len(images)
        self.names = names if names is not None else [f"{i:06d}" for i in range(len(images))]
        if not len(self.captions) == len(self.names) == len(images):
            raise ValueError("InMemoryHQDataset: images, captions and names differ in length")

    def __len__(self) -> int:
        return len(self.images)

    def load_hq(self, i: int) -> tuple[np.ndarray, str, str]:
        return self.images[i], self.captions[i], self.names[i]


class PairedFolderDataset(Dataset):
    """Fixed LQ/HQ pairs: ROOT/lq and ROOT/hq matched by file stem; ROOT/hq is optional.

    Without ROOT/hq items have no "hq" (real-world LQ sets). A caption comes from a sidecar .txt
    beside the HQ image, else beside the LQ image.
    """

    def __init__(
        self,
        root: str | Path,
        size: int | tuple[int, int] | None = None,
        captions: bool = True,
        convert: bool = False,
    ) -> None:
        self.root = Path(root)
        if not (self.root / "lq").is_dir():
            raise FileNotFoundError(f"{self.root}: no lq/ folder (expected ROOT/lq and, optionally, ROOT/hq)")
        self.lq_files = _image_files(self.root / "lq")
        self.hq_files: list[Path] | None = None
        if (self.root / "hq").is_dir():
            hq_by_stem = {p.stem: p for p in list_images(self.root / "hq")}
            missing = [p.name for p in self.lq_files if p.stem not in hq_by_stem]
            if missing:
                raise ValueError(f"{self.root}: {len(missing)} LQ images have no HQ partner ({_preview(missing)})")
            self.hq_files = [hq_by_stem[p.stem] for p in self.lq_files]
        self.size = size
        self.captions = captions
        self.convert = convert

    @property
    def has_hq(self) -> bool:
        return self.hq_files is not None

    def __len__(self) -> int:
        return len(self.lq_files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self.lq_files):
            raise IndexError(f"index {i} out of range for {len(self.lq_files)} images")
        lq_path = self.lq_files[i]
        lq = read_image(lq_path, size=self.size, convert=self.convert)
        item: dict[str, Any] = {"lq": _to_tensor(lq)}
        caption = None
        if self.hq_files is not None:
            hq_path = self.hq_files[i]
            hq = read_image(hq_path, size=self.size, convert=self.convert)
            if hq.shape != lq.shape:
                raise ImageError(
                    f"{lq_path}: size {lq.shape[1]}x{lq.shape[0]} differs from its HQ partner {hq_path.name} "
                    f"({hq.shape[1]}x{hq.shape[0]}); resize LQ to the HQ size first"
                )
            item["hq"] = _to_tensor(hq)
            if self.captions:
                caption = read_caption(hq_path)
        if self.captions and caption is None:
            caption = read_caption(lq_path)
        item["caption"] = caption or ""
        item["name"] = lq_path.stem
        return item


def collate_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensor fields into a batch (B, ...); other fields become lists. All items need the same keys."""
    if not items:
        raise ValueError("collate_batch: empty batch")
    keys = list(items[0])
    for item in items[1:]:
        if set(item) != set(keys):
            raise ValueError(f"collate_batch: items have different keys ({sorted(keys)} vs {sorted(item)})")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                names = [item.get("name", "?") for item in items]
                detail = ", ".join(f"{n}: {'x'.join(map(str, v.shape))}" for n, v in zip(names, values))
                raise ValueError(f"collate_batch: {key!r} tensors differ in shape ({detail})")
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
