"""The procedural face world: determinism, shapes, landmarks, splits, detail and the dataset writer."""

from __future__ import annotations

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest

from facereward.data.imageio import read_image
from facereward.data.datasets import HQFolderDataset
from facereward.data.toyfaces import (
    TOY_MARKER,
    ToyFaceWorld,
    is_toy_folder,
    read_toy_marker,
    write_toy_marker,
    write_toyfaces,
)


@pytest.fixture(scope="module")
def world() -> ToyFaceWorld:
    return ToyFaceWorld(seed=0, n_identities=50, test_fraction=0.2)


def _hair_colour(face) -> np.ndarray:
    """Chromaticity and luminance of a patch on the top of the head, found from the eye and chin landmarks."""
    eyes, chin = face.landmarks[36:48].mean(0), face.landmarks[8]
    x, y = np.round(eyes + (eyes - chin) * 0.82).astype(int)
    rgb = np.median(face.image[y - 2 : y + 3, x - 5 : x + 6].reshape(-1, 3), 0)
    return np.append(rgb / (rgb.sum() + 1e-6), _luminance(rgb))


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def test_same_arguments_give_identical_faces(world):
    a = world.face(3, 5, 64)
    b = world.face(3, 5, 64)
    c = ToyFaceWorld(seed=0, n_identities=50).face(3, 5, 64)
    for other in (b, c):
        np.testing.assert_array_equal(a.image, other.image)
        np.testing.assert_array_equal(a.landmarks, other.landmarks)
        assert a.caption == other.caption
    d = ToyFaceWorld(seed=1, n_identities=50).face(3, 5, 64)
    assert np.abs(a.image - d.image).mean() > 0.02


def test_images_of_one_identity_differ_but_keep_its_hair_colour(world):
    def first(name: str) -> int:
        traits = [world.traits(i) for i in world.identities("train")]
        return next(t.identity for t in traits if t.hair_name == name and t.hair_style != "buzz")

    ids = [first("black"), first("blonde"), first("red")]
    faces = {i: [world.face(i, k, 128) for k in range(4)] for i in ids}
    assert np.abs(faces[ids[0]][0].image - faces[ids[0]][1].image).mean() > 0.01
    colours = {i: np.stack([_hair_colour(f) for f in fs]) for i, fs in faces.items()}
    for i in ids:  # every image is nearest to the other images of its own identity
        for k in range(4):
            own = np.delete(colours[i], k, 0).mean(0)
            d_own = np.abs(colours[i][k] - own).sum()
            assert all(d_own < np.abs(colours[i][k] - colours[j].mean(0)).sum() for j in ids if j != i)


@pytest.mark.parametrize("size", [32, 128])
def test_range_dtype_and_shape(world, size):
    face = world.face(7, 2, size)
    assert face.image.dtype == np.float32 and face.image.shape == (size, size, 3)
    assert face.image.min() >= 0.0 and face.image.max() <= 1.0
    assert face.image.std() > 0.05
    assert face.landmarks.dtype == np.float32 and face.landmarks.shape == (68, 2)
    assert face.identity == 7 and face.split == world.split_of(7)
    assert isinstance(face.caption, str) and face.caption.startswith("a ") and face.caption.endswith(".")
    assert "\n" not in face.caption


def test_landmarks_inside_image_and_scale_with_size(world):
    for identity, index in [(0, 0), (5, 3), (11, 9), (20, 1)]:
        small = world.face(identity, index, 64).landmarks
        large = world.face(identity, index, 128).landmarks
        for lm, size in ((small, 64), (large, 128)):
            assert np.isfinite(lm).all()
            assert (lm >= 0).all() and (lm <= size - 1).all()
        assert np.abs(large - 2 * small).max() < 1.5


def test_landmarks_follow_the_68_point_order(world):
    for identity in range(6):
        lm = world.face(identity, 1, 128).landmarks
        x, y = lm[:, 0], lm[:, 1]
        assert np.argmax(y[0:17]) in (7, 8, 9)  # chin at the bottom of the jaw line
        assert x[0] < x[8] < x[16]
        assert x[17:22].mean() < x[22:27].mean() and x[36:42].mean() < x[42:48].mean()
        assert y[17:27].mean() < y[36:48].mean() < y[30] < y[48:68].mean() < y[8]
        assert x[36] < x[39] < x[42] < x[45]  # corners: outer-left, inner-left, inner-right, outer-right
        assert y[51] < y[62] <= y[66] < y[57]  # lips from top to bottom
        assert x[48] < x[51] < x[54]


def test_landmarks_match_the_drawing(world):
    spec = replace(world.spec(4, 0), eye_open=1.0, gaze=(0.0, 0.0), yaw=0.0, mouth_open=0.0)
    face = world.render(spec, 256)
    for eye in (face.landmarks[36:42], face.landmarks[42:48]):
        cx, cy = np.round(eye.mean(0)).astype(int)
        assert _luminance(face.image[cy, cx]) < 0.2  # the pupil sits between the eye landmarks
    cheek = np.round(face.landmarks[[1, 31]].mean(0)).astype(int)
    assert _luminance(face.image[cheek[1], cheek[0]]) > _luminance(face.image[cy, cx]) + 0.1


def test_smile_raises_the_mouth_corners(world):
    spec = world.spec(2, 0)
    calm = world.render(replace(spec, smile=0.0), 128).landmarks
    smile = world.render(replace(spec, smile=1.0), 128).landmarks
    lift = lambda lm: lm[[51, 57], 1].mean() - lm[[48, 54], 1].mean()  # noqa: E731
    assert lift(smile) > lift(calm) + 1.0


def test_split_is_by_identity(world):
    train, test = set(world.identities("train")), set(world.identities("test"))
    assert train.isdisjoint(test)
    assert train | test == set(range(50))
    assert len(test) == 10
    assert all(world.split_of(i) == "test" for i in test)
    faces = world.sample(12, size=32, split="test", seed=3)
    assert {f.identity for f in faces} <= test
    assert all(f.split == "test" for f in faces)
    assert len({f.identity for f in faces}) == 10  # spread over the split's identities
    again = world.sample(12, size=32, split="test", seed=3)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(faces, again))
    other = world.sample(12, size=32, split="test", seed=4)
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(faces, other))
    with pytest.raises(ValueError):
        world.identities("val")


def test_fine_detail_is_destroyed_by_blur(world):
    """Skin grain and hair strands, not just feature edges: a flat cartoon fails the patch checks."""

    def lap(img: np.ndarray, centre: np.ndarray | None = None, r: int = 3) -> float:
        energy = np.abs(cv2.Laplacian(img.mean(-1), cv2.CV_32F))
        if centre is None:
            return float(energy.mean())
        x, y = np.round(centre).astype(int)
        return float(energy[y - r : y + r + 1, x - r : x + r + 1].mean())

    skin, hair = [], []
    for identity in (1, 3, 9, 11):
        face = world.face(identity, 0, 128)
        blurred = cv2.GaussianBlur(face.image, (0, 0), 2)
        assert lap(face.image) > 3 * lap(blurred)
        cheek = (face.landmarks[3] + face.landmarks[31]) / 2
        eyes, chin = face.landmarks[36:48].mean(0), face.landmarks[8]
        top = eyes + (eyes - chin) * 0.82
        skin.append(lap(face.image, cheek) / lap(blurred, cheek))
        hair.append(lap(face.image, top) / lap(blurred, top))
    assert np.mean(skin) > 4 and np.mean(hair) > 4


def test_identities_differ_more_than_images_of_one_identity(world):
    s = 64
    box = (slice(int(0.25 * s), int(0.8 * s)), slice(int(0.28 * s), int(0.72 * s)))
    ids = world.identities("train")[:6]
    same = [np.abs(world.face(i, 0, s).image[box] - world.face(i, 1, s).image[box]).mean() for i in ids]
    diff = [np.abs(world.face(a, 0, s).image[box] - world.face(b, 0, s).image[box]).mean() for a, b in zip(ids, ids[1:])]
    assert np.mean(diff) > 1.3 * np.mean(same)


def test_write_toyfaces_layout(tmp_path):
    manifest = write_toyfaces(tmp_path, n=20, size=32, seed=0, progress=False)
    assert manifest == json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["n"] == 20 and manifest["size"] == 32 and manifest["n_identities"] == 10
    assert manifest["train"] + manifest["test"] == 20 and 2 <= manifest["test"] <= 6
    seen = {}
    for split in ("train", "test"):
        pngs = sorted((tmp_path / split / "images").glob("*.png"))
        assert len(pngs) == manifest[split]
        landmarks = json.loads((tmp_path / split / "landmarks.json").read_text())
        identities = json.loads((tmp_path / split / "identities.json").read_text())
        assert sorted(landmarks) == sorted(identities) == [p.stem for p in pngs]
        for p in pngs:
            assert read_image(p, size=32).shape == (32, 32, 3)
            caption = p.with_suffix(".txt").read_text()
            assert caption.count("\n") == 1 and len(caption) > 20
            assert np.array(landmarks[p.stem]).shape == (68, 2)
        seen[split] = set(identities.values())
    assert seen["train"] and seen["test"] and seen["train"].isdisjoint(seen["test"])


def test_write_toyfaces_workers_give_the_same_files(tmp_path):
    write_toyfaces(tmp_path / "one", n=6, size=16, seed=2, n_identities=3, progress=False)
    write_toyfaces(tmp_path / "two", n=6, size=16, seed=2, n_identities=3, progress=False, workers=2)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) == 6 * 2 + 5 + 3  # images, captions; manifest, landmarks, identities; 3 toy markers
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f


def test_write_toyfaces_marks_each_images_folder_as_toy(tmp_path):
    write_toyfaces(tmp_path, n=12, size=16, seed=3, n_identities=4, test_fraction=0.25, progress=False)
    for split in ("train", "test"):
        folder = tmp_path / split / "images"
        assert is_toy_folder(folder)
        marker = read_toy_marker(folder)
        assert {k: marker[k] for k in ("world_seed", "n_identities", "test_fraction", "size", "split", "sample_seed")} == \
            {"world_seed": 3, "n_identities": 4, "test_fraction": 0.25, "size": 16, "split": split, "sample_seed": 3}
        assert marker["count"] == len(list(folder.glob("*.png")))
        # the marker is not an image: the folder still lists and loads as its faces only
        assert len(HQFolderDataset(folder, size=16)) == len(list(folder.glob("*.png")))
    assert read_toy_marker(tmp_path)["split"] is None


def test_toy_marker_round_trip_and_plain_folders(tmp_path):
    assert not is_toy_folder(tmp_path) and read_toy_marker(tmp_path) is None
    path = write_toy_marker(tmp_path / "new", {"world_seed": 0, "split": "test"})
    assert path == tmp_path / "new" / TOY_MARKER and is_toy_folder(tmp_path / "new")
    assert read_toy_marker(tmp_path / "new") == {"world_seed": 0, "split": "test"}


def test_bad_arguments_raise(tmp_path, world):
    with pytest.raises(ValueError, match="size"):
        world.face(0, 0, 8)
    with pytest.raises(ValueError, match="size"):
        write_toyfaces(tmp_path, n=4, size=15, progress=False)
    with pytest.raises(ValueError, match="n must"):
        write_toyfaces(tmp_path, n=0, progress=False)
    with pytest.raises(ValueError, match="identity"):
        world.face(50, 0)
