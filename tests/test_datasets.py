"""HQ-folder and paired datasets, batching, and the written synthetic test set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facereward.data.datasets import HQFolderDataset, PairedFolderDataset, collate_batch
from facereward.data.degradation import degrade
from facereward.data.imageio import ImageError, read_image
from facereward.data.testset import write_degraded_testset
from facereward.data.toyfaces import is_toy_folder, read_toy_marker, write_toyfaces


def save_rgb(path: Path, size: int = 32, seed: int = 0, width: int | None = None) -> np.ndarray:
    """A random-ish structured RGB image written with PIL; returns it as uint8."""
    rng = np.random.default_rng(seed)
    w = width or size
    base = rng.integers(0, 256, (size // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(base).resize((w, size), Image.NEAREST))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


@pytest.fixture
def hq_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "hq"
    save_rgb(folder / "a.png", seed=1)
    save_rgb(folder / "b.jpg", seed=2)
    save_rgb(folder / "c.webp", seed=3)
    (folder / "a.txt").write_text("a face with glasses\n", encoding="utf-8")
    (folder / "notes.md").write_text("not an image")
    return folder


def test_hq_folder_items_and_captions(hq_folder):
    ds = HQFolderDataset(hq_folder, size=32, preset="diffbir", seed=5)
    assert len(ds) == 3
    item = ds[0]
    assert item["name"] == "a" and item["caption"] == "a face with glasses"
    assert ds[1]["caption"] == "" and ds[1]["name"] == "b"
    for key in ("hq", "lq"):
        t = item[key]
        assert t.shape == (3, 32, 32) and t.dtype == torch.float32
        assert float(t.min()) >= 0 and float(t.max()) <= 1
    assert torch.allclose(item["hq"], torch.from_numpy(read_image(hq_folder / "a.png")).permute(2, 0, 1))
    # LQ is exactly degrade(hq, preset, seed, index=i) in epoch 0
    lq, _ = degrade(read_image(hq_folder / "b.jpg"), "diffbir", seed=5, index=1)
    assert torch.equal(ds[1]["lq"], torch.from_numpy(lq).permute(2, 0, 1))
    assert HQFolderDataset(hq_folder, captions=False)[0]["caption"] == ""


def test_set_epoch_changes_lq_deterministically(hq_folder):
    ds = HQFolderDataset(hq_folder, seed=0)
    e0 = [ds[i]["lq"] for i in range(len(ds))]
    ds.set_epoch(1)
    e1 = [ds[i]["lq"] for i in range(len(ds))]
    assert all(not torch.equal(a, b) for a, b in zip(e0, e1))
    # epoch 1, item i uses index len + i, so it matches a fresh dataset's computation
    lq, _ = degrade(read_image(hq_folder / "a.png"), "diffbir", seed=0, index=len(ds) + 0)
    assert torch.equal(e1[0], torch.from_numpy(lq).permute(2, 0, 1))
    other = HQFolderDataset(hq_folder, seed=0)
    other.set_epoch(1)
    assert all(torch.equal(other[i]["lq"], e1[i]) for i in reversed(range(len(ds))))
    ds.set_epoch(0)
    assert torch.equal(ds[2]["lq"], e0[2])


def test_random_flip_is_deterministic(hq_folder):
    ds = HQFolderDataset(hq_folder, seed=0, random_flip=True)
    plain = HQFolderDataset(hq_folder, seed=0)
    flipped = 0
    for epoch in range(4):
        ds.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(len(ds)):
            a, b = ds[i]["hq"], plain[i]["hq"]
            assert torch.equal(a, ds[i]["hq"])
            if not torch.equal(a, b):
                assert torch.equal(a, b.flip(-1))
                flipped += 1
    assert 0 < flipped < 12


def test_wrong_size_raises_naming_file(hq_folder):
    save_rgb(hq_folder / "d.png", size=32, width=40, seed=4)
    ds = HQFolderDataset(hq_folder, size=32)
    with pytest.raises(ImageError, match=r"d\.png: wrong size 40x32"):
        ds[3]
    ds[0]  # the good files still load


def test_bad_file_and_empty_folder(tmp_path, hq_folder):
    (hq_folder / "broken.png").write_bytes(b"not a png")
    ds = HQFolderDataset(hq_folder)
    with pytest.raises(ImageError, match=r"broken\.png: corrupt"):
        ds[[p.name for p in ds.files].index("broken.png")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no images \(png, jpg"):
        HQFolderDataset(tmp_path / "empty")
    save_rgb(hq_folder / "a.jpg")
    with pytest.raises(ValueError, match="share the name 'a'"):
        HQFolderDataset(hq_folder)


def test_collate_batch(hq_folder):
    ds = HQFolderDataset(hq_folder, size=32)
    batch = collate_batch([ds[0], ds[1]])
    assert batch["hq"].shape == (2, 3, 32, 32) and batch["lq"].shape == (2, 3, 32, 32)
    assert batch["name"] == ["a", "b"] and batch["caption"] == ["a face with glasses", ""]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_batch)
    assert next(iter(loader))["lq"].shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="different keys"):
        collate_batch([ds[0], {"lq": ds[1]["lq"]}])
    odd = dict(ds[1], hq=torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="'hq' tensors differ in shape"):
        collate_batch([ds[0], odd])


def make_paired(root: Path, lq_names, hq_names) -> None:
    for i, name in enumerate(lq_names):
        save_rgb(root / "lq" / name, seed=10 + i)
    for i, name in enumerate(hq_names):
        save_rgb(root / "hq" / name, seed=20 + i)


def test_paired_matching_by_stem(tmp_path):
    make_paired(tmp_path, ["x.png", "y.jpg"], ["y.png", "x.png", "z.png"])
    (tmp_path / "hq" / "x.txt").write_text("caption of x")
    (tmp_path / "lq" / "y.txt").write_text("lq caption of y")
    ds = PairedFolderDataset(tmp_path, size=32)
    assert len(ds) == 2 and ds.has_hq
    x, y = ds[0], ds[1]
    assert x["name"] == "x" and y["name"] == "y"
    assert x["caption"] == "caption of x" and y["caption"] == "lq caption of y"
    # y.jpg (LQ) is paired with y.png (HQ), not with x.png
    assert torch.allclose(y["hq"], torch.from_numpy(read_image(tmp_path / "hq" / "y.png")).permute(2, 0, 1))
    assert torch.allclose(y["lq"], torch.from_numpy(read_image(tmp_path / "lq" / "y.jpg")).permute(2, 0, 1))


def test_paired_unmatched_error(tmp_path):
    make_paired(tmp_path, ["a.png", "b.png", "c.png", "d.png"], ["d.png"])
    with pytest.raises(ValueError, match=r": 3 LQ images have no HQ partner \(a\.png, b\.png, c\.png\)"):
        PairedFolderDataset(tmp_path)


def test_paired_without_hq_and_missing_lq(tmp_path):
    make_paired(tmp_path / "real", ["p.png", "q.png"], [])
    ds = PairedFolderDataset(tmp_path / "real")
    assert not ds.has_hq and "hq" not in ds[0] and ds[0]["lq"].shape == (3, 32, 32)
    assert collate_batch([ds[0], ds[1]])["lq"].shape == (2, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="no lq/ folder"):
        PairedFolderDataset(tmp_path / "nothing")


def test_write_degraded_testset(tmp_path, hq_folder):
    entries = write_degraded_testset(hq_folder, tmp_path / "out1", preset="codeformer", seed=7, size=32, progress=False)
    out = tmp_path / "out1"
    assert [e["name"] for e in entries] == ["a", "b", "c"] and [e["index"] for e in entries] == [0, 1, 2]
    for name in "abc":
        assert (out / "hq" / f"{name}.png").is_file() and (out / "lq" / f"{name}.png").is_file()
    assert (out / "hq" / "a.txt").read_text().strip() == "a face with glasses"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preset"] == "codeformer" and manifest["seed"] == 7
    assert manifest["images"][1]["params"]["preset"] == "codeformer" and manifest["images"] == entries
    # the written LQ is the seeded degradation of the HQ, and the HQ copy is lossless
    assert np.array_equal(read_image(out / "hq" / "b.png"), read_image(hq_folder / "b.jpg"))
    lq, _ = degrade(read_image(hq_folder / "b.jpg"), "codeformer", seed=7, index=1)
    assert np.array_equal(read_image(out / "lq" / "b.png"), lq)
    # the written set reads back as a paired dataset
    assert len(PairedFolderDataset(out, size=32)) == 3

    write_degraded_testset(hq_folder, tmp_path / "out2", preset="codeformer", seed=7, size=32, progress=False)
    for name in "abc":
        assert (out / "lq" / f"{name}.png").read_bytes() == (tmp_path / "out2" / "lq" / f"{name}.png").read_bytes()
    write_degraded_testset(hq_folder, tmp_path / "out3", preset="codeformer", seed=8, size=32, progress=False)
    assert (out / "lq" / "a.png").read_bytes() != (tmp_path / "out3" / "lq" / "a.png").read_bytes()


def test_testset_of_toy_faces_carries_the_toy_marker(tmp_path, hq_folder):
    write_toyfaces(tmp_path / "toys", n=10, size=16, seed=1, n_identities=5, progress=False)
    write_degraded_testset(tmp_path / "toys" / "test" / "images", tmp_path / "toy-test", preset="codeformer", seed=4,
                           progress=False)
    info = read_toy_marker(tmp_path / "toy-test")
    assert info["world_seed"] == 1 and info["split"] == "test" and info["size"] == 16
    assert info["preset"] == "codeformer" and info["degradation_seed"] == 4
    # a plain HQ folder gives a plain set, even written over an old toy set
    write_degraded_testset(hq_folder, tmp_path / "plain", progress=False)
    assert not is_toy_folder(tmp_path / "plain")
    write_degraded_testset(hq_folder, tmp_path / "toy-test", size=32, progress=False)
    assert not is_toy_folder(tmp_path / "toy-test")


def test_testset_skips_bad_files(tmp_path, hq_folder):
    (hq_folder / "bad.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"bad\.png"):
        entries = write_degraded_testset(hq_folder, tmp_path / "out", progress=False)
    assert [e["name"] for e in entries] == ["a", "b", "c"]
    # indices stay the positions in the full sorted listing, so one bad file does not shift the others
    assert [e["index"] for e in entries] == [0, 1, 3]  # sorted: a.png, b.jpg, bad.png, c.webp
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"][0]["name"] == "bad.png"

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(ImageError, match="none of 1 images"):
        write_degraded_testset(only_bad, tmp_path / "out_bad", progress=False)
