"""The fixed toy batch and fabricated LPIPS weights of the golden measure values (tests/golden_measures.json)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors.torch import save_file

from facereward.data.toyfaces import ToyFaceWorld

GOLDEN = Path(__file__).with_name("golden_measures.json")
GOLDEN_LQ = Path(__file__).with_name("golden_lq.png")  # the 4 faces' LQ side by side: degrade(face, "diffbir", seed=7, index=i)


def golden_batch() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images, gt, captions): 4 held-out toy faces at 64 px and restorations of two qualities (LQ, LQ/GT mix)."""
    faces = ToyFaceWorld(seed=0, n_identities=200).sample(4, size=64, split="test", seed=7)
    hq = np.stack([f.image for f in faces])
    # the LQ as the degradation made it when the values were recorded, frozen in a PNG (8-bit, so exact): later changes
    # to the degradation (issue 29's JPEG range and sizes) do not move the measures' inputs
    tiled = cv2.cvtColor(cv2.imread(str(GOLDEN_LQ), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    lq = np.stack(np.split(tiled, len(faces), axis=1))
    to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy()).float()  # noqa: E731
    gt, images = to_t(hq), to_t(lq)
    images[2:] = 0.5 * images[2:] + 0.5 * gt[2:]
    return images, gt, [f.caption for f in faces]


def golden_lpips_files(folder: Path) -> tuple[str, str]:
    """Seeded AlexNet-layout LPIPS backbone and heads (safetensors) in `folder`: (backbone_path, heads_path)."""
    g = torch.Generator().manual_seed(0)
    feats = {}
    for i, cout, cin, k in [(0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3), (10, 256, 256, 3)]:
        feats[f"{i}.weight"] = torch.randn(cout, cin, k, k, generator=g) * math.sqrt(2.0 / (cin * k * k))
        feats[f"{i}.bias"] = torch.zeros(cout)
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate([64, 192, 384, 256, 256])}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(feats, str(folder / "alex.safetensors"))
    save_file(heads, str(folder / "heads.safetensors"))
    return str(folder / "alex.safetensors"), str(folder / "heads.safetensors")


def encode(values) -> list[str]:
    """Exact float values as hex strings (bit-for-bit comparison)."""
    return [float(v).hex() for v in torch.as_tensor(values).reshape(-1).tolist()]
