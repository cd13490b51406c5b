"""DataConfig: the training data every trainer reads (HQ folder with on-the-fly LQ, or toy faces), and the dataset it builds."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from facereward.data.datasets import HQFolderDataset, InMemoryHQDataset


@dataclass
class DataConfig:
    """Training faces: a folder of HQ images, or `toy_faces` procedural faces (train split); LQ made on the fly."""

    hq_dir: str | None = None
    toy_faces: int = 0
    toy_seed: int = 0
    toy_identities: int | None = None
    size: int = 64
    preset: str = "diffbir"  # a built-in preset, or one a plugin module of the command's `imports` registers
    seed: int = 0
    random_flip: bool = True
    quantize_lq: bool = True  # the LQ rounded to 8-bit levels, as an LQ file is (the seeds' data is not: false)
    num_workers: int = 0


def build_dataset(data: DataConfig) -> Dataset:
    """The HQ dataset `data` names; exactly one of hq_dir / toy_faces must be set."""
    if (data.hq_dir is None) == (data.toy_faces <= 0):
        raise ValueError("data: set exactly one of data.hq_dir (a folder of HQ faces) or data.toy_faces (a count)")
    resolve_preset(data)
    if data.hq_dir is not None:
        return HQFolderDataset(data.hq_dir, size=data.size, preset=data.preset, seed=data.seed, random_flip=data.random_flip,
                               quantize=data.quantize_lq)
    faces = toy_world(data).sample(data.toy_faces, size=data.size, split="train", seed=data.seed)
    return InMemoryHQDataset(
        [f.image for f in faces], [f.caption for f in faces], [f"toy{i:06d}" for i in range(len(faces))],
        preset=data.preset, seed=data.seed, random_flip=data.random_flip, quantize=data.quantize_lq,
    )


def resolve_preset(data: DataConfig) -> None:
    """Check `data.preset` names a registered degradation (one line naming it if not); plugin modules are imported
    before, from the command's `imports`."""
    from facereward.data.degradation import get_degradation, list_degradations

    try:
        get_degradation(data.preset)
    except (KeyError, ValueError):
        raise ValueError(f"data.preset: unknown degradation {data.preset!r} (known: {', '.join(list_degradations())}; "
                         "register your own in a module given with --degradation-module)") from None


def toy_world(data: DataConfig):
    """The procedural world `data.toy_faces` trains on (its test identities are the held-out faces)."""
    from facereward.data.toyfaces import ToyFaceWorld

    return ToyFaceWorld(seed=data.toy_seed, n_identities=data.toy_identities or max(10, data.toy_faces // 10))
